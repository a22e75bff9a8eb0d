#!/usr/bin/env python
"""Build the real-image benchmark data: Kermany pediatric chest X-rays paired with real Open-i reports
of the matching finding, as pretraining shards, plus two class-per-folder probe trees.

    python tools/real_pairs.py --data ../shared/data --out /work/realbench [--seed 0] [--image-size 128]
        [--format jpg] [--workers 2] [--samples-per-shard 512] [--overwrite]

Inputs (read only; see PROVENANCE.md in --data):
  * kermany_pneumonia_224/labels.csv (path,split,label,class_name,pneumonia_type) and its JPEGs;
  * openi_reports/openi_reports.jsonl (3,955 reports: uid, findings, impression, mesh_major, ...).

Report pools (``classify_report``):
  * normal: MeSH major terms exactly ["normal"] and some findings / impression text;
  * pneumonia: at least one sentence of the findings + impression mentions pneumonia / pneumonias /
    pneumonic, not negated in that sentence (no, without, negative for, clear of, exclude, ... before
    the mention; "not seen", "resolved" after it), not historical (history of, previous, prior, ...),
    and not only a recommendation ("correlate clinically for pneumonia"); or a MeSH major term
    "Pneumonia..." (3 more reports, which say "consolidation ... consistent with pneumonitis"). Hedged
    mentions ("may represent pneumonia", "atelectasis or pneumonia") count: that is how radiologists
    report it. MeSH "normal" reports are never in this pool.
  * A report that would join either pool but names a pneumonia type (bacterial, viral, virus,
    atypical, mycoplasma) is left out: the bacteria-vs-virus probe label must be one the reports never
    mention.

Pairs: every Kermany TRAIN image (sorted by path) gets a report of its finding (NORMAL -> normal pool,
PNEUMONIA -> pneumonia pool); the pool is shuffled by ``--seed`` and dealt out in turn, reshuffled after
each pass, so each report is used equally often (+-1). Written to OUT/pairs.csv in an order shuffled by
the seed (so every shard holds both classes) and made into shards by
``tools/make_shards.py csv ... --link`` (the knowledge linker fills the entities MLIP needs) in
OUT/shards/pretrain.

Probe trees (symlinks to the JPEGs, nothing copied):
  * OUT/probe/pneumonia/{train,test}/{NORMAL,PNEUMONIA}/ (Kermany's own split);
  * OUT/probe/bacteria_virus/{train,test}/{BACTERIA,VIRUS}/ (pneumonia images only, by pneumonia_type).

Also OUT/report_pools.json (every pooled report with the sentence that put it there, every rejected
pneumonia mention with its reason: for checking by eye) and OUT/real_pairs.json (counts, settings,
timings, the make_shards command and a tools/ablate.py command for the benchmark). Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERMANY = "kermany_pneumonia_224"
KERMANY_LABELS = f"{KERMANY}/labels.csv"
OPENI_JSONL = "openi_reports/openi_reports.jsonl"
CLASS_DIRS = {"pneumonia": ("NORMAL", "PNEUMONIA"), "bacteria_virus": ("BACTERIA", "VIRUS")}
PNEUMONIA_TYPES = {"bacteria": "BACTERIA", "virus": "VIRUS"}

_MENTION = re.compile(r"\bpneumoni(?:a|as|c)\b", re.I)
_NEG_BEFORE = re.compile(r"\b(?:no|not|without|negative for|clear of|free of|exclude[sd]?|excluding|absence of|"
                         r"resolution of|resolved|rather than|never|nor)\b", re.I)
_NEG_AFTER = re.compile(r"\b(?:is not seen|not seen|not identified|not present|has resolved|have resolved|"
                        r"resolved|excluded|ruled out)\b", re.I)
_HISTORICAL = re.compile(r"\b(?:history of|previous|prior|old|remote|healed)\b", re.I)
_RECOMMEND = re.compile(r"^\W*(?:please\s+)?(?:clinical(?:ly)?\s+)?correlat", re.I)
_SCOPE_RESET = re.compile(r"\b(?:but|however|although|though)\b", re.I)
_TYPE_WORDS = re.compile(r"\b(?:bacteri\w*|viral|virus\w*|atypical|mycoplasma\w*)\b", re.I)
_SENTENCE_END = re.compile(r"(?<=[.;!?])\s+|\n+")


class RealPairsError(RuntimeError):
    """A user-facing error (missing input, existing output); the CLI exits 2."""


# ---------------------------------------------------------------------------------------------
# report pools


def report_text(rec: dict) -> str:
    """``FINDINGS: ...`` / ``IMPRESSION: ...`` (empty sections left out), as tools/make_shards.py's
    Open-i source composes it, so the linker sees the sections."""
    from mlip_ds.sources.csv_source import compose_report
    return compose_report({"findings": rec.get("findings") or "", "impression": rec.get("impression") or ""})


def mention_status(sentence: str) -> str | None:
    """None (no pneumonia mention), else 'positive', 'negated', 'historical' or 'recommendation' for the
    sentence's first mention that is positive (or the first mention's status when none is)."""
    if _RECOMMEND.search(sentence) and _MENTION.search(sentence):
        return "recommendation"
    statuses = []
    for m in _MENTION.finditer(sentence):
        before = sentence[:m.start()]
        resets = list(_SCOPE_RESET.finditer(before))
        if resets:
            before = before[resets[-1].end():]
        after = sentence[m.end():]
        if _NEG_BEFORE.search(before) or _NEG_AFTER.search(after):
            statuses.append("negated")
        elif _HISTORICAL.search(before):
            statuses.append("historical")
        else:
            statuses.append("positive")
    if not statuses:
        return None
    return "positive" if "positive" in statuses else statuses[0]


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def classify_report(rec: dict) -> tuple[str | None, str]:
    """(pool, why): pool 'normal', 'pneumonia' or None; why = the deciding sentence or the reason."""
    body = " ".join(x for x in (rec.get("findings") or "", rec.get("impression") or "") if x.strip())
    if not body.strip():
        return None, "no findings or impression text"
    mesh = [m.strip().lower() for m in rec.get("mesh_major") or []]
    if mesh == ["normal"]:
        pool, why = "normal", "MeSH major: normal"
    else:
        found = [(s, mention_status(s)) for s in sentences(body)]
        found = [(s, st) for s, st in found if st is not None]
        pos = [s for s, st in found if st == "positive"]
        mesh_pn = [m for m in rec.get("mesh_major") or [] if m.strip().lower().startswith("pneumonia")]
        if pos:
            pool, why = "pneumonia", pos[0]
        elif mesh_pn:
            pool, why = "pneumonia", f"MeSH major: {mesh_pn[0]}"
        elif found:
            return None, f"pneumonia mention {found[0][1]}: {found[0][0]}"
        else:
            return None, "neither MeSH normal nor a pneumonia mention"
    typed = _TYPE_WORDS.search(body)
    if typed:
        return None, f"names a pneumonia type ({typed.group(0)}), else {pool}: {why}"
    return pool, why


def build_pools(reports: list[dict]) -> dict:
    """{'normal': [rec...], 'pneumonia': [rec...], 'evidence': {uid: why}, 'rejected_mentions': {uid: why},
    'rejected_typed': {uid: why}} (pools in file order)."""
    pools = {"normal": [], "pneumonia": [], "evidence": {}, "rejected_mentions": {}, "rejected_typed": {}}
    for rec in reports:
        pool, why = classify_report(rec)
        if pool is not None:
            pools[pool].append(rec)
            pools["evidence"][rec["uid"]] = why
        elif why.startswith("pneumonia mention"):
            pools["rejected_mentions"][rec["uid"]] = why
        elif why.startswith("names a pneumonia type"):
            pools["rejected_typed"][rec["uid"]] = why
    return pools


def read_reports(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError as e:
                    raise RealPairsError(f"{path} line {n}: not JSON ({e})") from e
    return out


# ---------------------------------------------------------------------------------------------
# images and pairs


def read_kermany(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    need = {"path", "split", "class_name", "pneumonia_type"}
    if rows and not need <= set(rows[0]):
        raise RealPairsError(f"{path}: needs the columns {sorted(need)}, has {sorted(rows[0])}")
    return sorted(rows, key=lambda r: r["path"])


def deal(pool: list, n: int, rng: random.Random) -> list:
    """n items from the pool, each used equally often (+-1): shuffled passes over the pool."""
    out: list = []
    while len(out) < n:
        order = list(pool)
        rng.shuffle(order)
        out += order[:n - len(out)]
    return out


def assign_reports(images: list[dict], pools: dict, seed: int) -> list[tuple[dict, dict]]:
    """[(image row, report)] for every train image, the report from its class's pool; deterministic."""
    out = []
    for cls, pool_name in (("NORMAL", "normal"), ("PNEUMONIA", "pneumonia")):
        rows = [r for r in images if r["split"] == "train" and r["class_name"] == cls]
        if rows and not pools[pool_name]:
            raise RealPairsError(f"the {pool_name} report pool is empty: no report to pair with the {cls} images")
        rng = random.Random(f"{seed}:{cls}")
        out += list(zip(rows, deal(pools[pool_name], len(rows), rng)))
    out.sort(key=lambda p: p[0]["path"])
    random.Random(f"{seed}:order").shuffle(out)  # shards in CSV order: mix the classes in every shard
    return out


def write_pairs_csv(pairs: list[tuple[dict, dict]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", "report", "class_name", "pneumonia_type", "report_uid"])
        for img, rep in pairs:
            w.writerow([Path(img["path"]).stem, img["path"], report_text(rep), img["class_name"],
                        img["pneumonia_type"], rep["uid"]])
    os.replace(tmp, path)


def build_probe_trees(images: list[dict], kermany_root: Path, out: Path) -> dict:
    """Symlink trees for the two probe tasks; returns {task: {split: {class: n}}}."""
    counts: dict = {}
    for task in CLASS_DIRS:
        shutil.rmtree(out / task, ignore_errors=True)
    for r in images:
        src = (kermany_root / r["path"]).resolve()
        name = Path(r["path"]).name
        targets = [("pneumonia", r["class_name"])]
        if r["class_name"] == "PNEUMONIA":
            t = PNEUMONIA_TYPES.get(r["pneumonia_type"])
            if t is None:
                raise RealPairsError(f"{r['path']}: pneumonia_type {r['pneumonia_type']!r} is neither bacteria "
                                     "nor virus")
            targets.append(("bacteria_virus", t))
        for task, cls in targets:
            d = out / task / r["split"] / cls
            d.mkdir(parents=True, exist_ok=True)
            os.symlink(src, d / name)
            c = counts.setdefault(task, {}).setdefault(r["split"], {})
            c[cls] = c.get(cls, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------
# the whole build


def check_inputs(data: Path) -> tuple[Path, Path, Path]:
    """(labels.csv, the Kermany folder, openi_reports.jsonl); RealPairsError naming the first missing path."""
    if not data.is_dir():
        raise RealPairsError(f"data folder not found: {data} (it should hold {KERMANY}/ and openi_reports/; "
                             "see ../shared/data/PROVENANCE.md; give it with --data)")
    labels, reports = data / KERMANY_LABELS, data / OPENI_JSONL
    for p in (labels, reports):
        if not p.is_file():
            raise RealPairsError(f"input file not found: {p} (expected under --data {data})")
    return labels, labels.parent, reports


def make_shards_command(csv_path: Path, kermany_root: Path, out: Path, image_size: int, fmt: str, workers: int,
                        samples_per_shard: int, overwrite: bool) -> list[str]:
    cmd = [sys.executable, str(ROOT / "tools" / "make_shards.py"), "csv", "--csv", str(csv_path),
           "--root", str(kermany_root), "--out", str(out), "--image-col", "image", "--report-col", "report",
           "--id-col", "id", "--meta-cols", "class_name,pneumonia_type,report_uid", "--link",
           "--image-size", str(image_size), "--format", fmt, "--workers", str(workers),
           "--samples-per-shard", str(samples_per_shard), "--strict", "--quiet"]
    return cmd + (["--overwrite"] if overwrite else [])


def build(data: str, out: str, seed: int = 0, image_size: int = 128, fmt: str = "jpg", workers: int = 1,
          samples_per_shard: int = 512, overwrite: bool = False, shards: bool = True,
          log=print) -> dict:
    t0 = time.time()
    data_p, out_p = Path(data).resolve(), Path(out).resolve()
    labels_csv, kermany_root, reports_path = check_inputs(data_p)
    if (out_p / "pairs.csv").exists() and not overwrite:
        raise RealPairsError(f"{out_p} already holds a build (pairs.csv): pass --overwrite to replace it")
    if out_p == ROOT or ROOT in out_p.parents:
        log(f"note: {out_p} is inside the repository; keep it out of commits")
    out_p.mkdir(parents=True, exist_ok=True)
    timings = {}

    reports = read_reports(reports_path)
    pools = build_pools(reports)
    images = read_kermany(labels_csv)
    missing = [r["path"] for r in images if not (kermany_root / r["path"]).is_file()]
    if missing:
        raise RealPairsError(f"{len(missing)} image(s) listed in {labels_csv} are missing, e.g. "
                             f"{kermany_root / missing[0]}")
    pairs = assign_reports(images, pools, seed)
    write_pairs_csv(pairs, out_p / "pairs.csv")
    (out_p / "report_pools.json").write_text(json.dumps({
        "rules": __doc__.split("Report pools")[1].split("Pairs:")[0].strip(),
        "normal": [r["uid"] for r in pools["normal"]],
        "pneumonia": {r["uid"]: pools["evidence"][r["uid"]] for r in pools["pneumonia"]},
        "rejected_pneumonia_mentions": pools["rejected_mentions"],
        "rejected_naming_a_type": pools["rejected_typed"]}, indent=1))
    trees = build_probe_trees(images, kermany_root, out_p / "probe")
    timings["pairs_and_trees_s"] = round(time.time() - t0, 2)
    log(f"[real_pairs] pools: {len(pools['normal'])} normal, {len(pools['pneumonia'])} pneumonia reports; "
        f"{len(pairs)} pairs -> {out_p / 'pairs.csv'}; probe trees in {out_p / 'probe'}")

    cmd = make_shards_command(out_p / "pairs.csv", kermany_root, out_p / "shards" / "pretrain", image_size, fmt,
                              workers, samples_per_shard, overwrite)
    manifest = None
    if shards:
        log("[real_pairs] " + " ".join(cmd[1:]))
        t1 = time.time()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]]
                                                                          if os.environ.get("PYTHONPATH") else [])))
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        timings["make_shards_s"] = round(time.time() - t1, 2)
        if r.returncode != 0:
            raise RealPairsError(f"tools/make_shards.py failed (exit {r.returncode}):\n"
                                 f"{r.stdout[-2000:]}{r.stderr[-2000:]}")
        log(r.stdout.strip())
        manifest = json.loads((out_p / "shards" / "pretrain" / "manifest.json").read_text())
    timings["total_s"] = round(time.time() - t0, 2)

    use = Counter(rep["uid"] for _, rep in pairs)
    per_pool_use = {}
    for name in ("normal", "pneumonia"):
        n = [use[r["uid"]] for r in pools[name] if r["uid"] in use]
        per_pool_use[name] = {"reports_used": len(n), "min_uses": min(n) if n else 0, "max_uses": max(n) if n else 0}
    ptree = out_p / "probe"
    summary = {
        "data": str(data_p), "out": str(out_p), "seed": seed, "image_size": image_size, "format": fmt,
        "reports_read": len(reports),
        "pools": {"normal": len(pools["normal"]), "pneumonia": len(pools["pneumonia"]),
                  "rejected_pneumonia_mentions": len(pools["rejected_mentions"]),
                  "rejected_naming_a_type": len(pools["rejected_typed"])},
        "pairs": dict(Counter(img["class_name"] for img, _ in pairs), total=len(pairs)),
        "pairs_by_type": dict(Counter(img["pneumonia_type"] or "normal" for img, _ in pairs)),
        "report_use": per_pool_use,
        "probe_trees": trees,
        "shards": None if manifest is None else {"num_samples": manifest.get("num_samples"),
                                                 "num_shards": len(manifest.get("shards", [])),
                                                 "bytes": sum(p.stat().st_size for p in
                                                              (out_p / "shards" / "pretrain").glob("*.tar"))},
        "make_shards_command": " ".join(["python"] + [os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c
                                                      for c in cmd[1:]]),
        "ablate_command": (f"python tools/ablate.py --train-shards {ptree.parent / 'shards' / 'pretrain'} "
                           f"--probe pneumonia={ptree / 'pneumonia' / 'train'},{ptree / 'pneumonia' / 'test'} "
                           f"--probe bacteria_virus={ptree / 'bacteria_virus' / 'train'},"
                           f"{ptree / 'bacteria_virus' / 'test'} --out OUT --steps STEPS --variants clip,mlip "
                           "--fractions 0.01,0.1,1.0 --probe-seeds 0,1,2,3,4,5,6,7,8,9"),
        "timings": timings,
    }
    (out_p / "real_pairs.json").write_text(json.dumps(summary, indent=2))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python tools/real_pairs.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"),
                   help="folder holding kermany_pneumonia_224/ and openi_reports/ (default: ../shared/data)")
    p.add_argument("--out", required=True, help="output folder (keep it outside the repository)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image -> report draw (default 0)")
    p.add_argument("--image-size", type=int, default=128,
                   help="shard images' short side (default 128: the tiny model crops 64 px from it)")
    p.add_argument("--format", default="jpg", choices=("jpg", "png"), help="shard image encoding (default jpg)")
    p.add_argument("--workers", type=int, default=1, help="make_shards worker processes (default 1)")
    p.add_argument("--samples-per-shard", type=int, default=512)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier build in --out")
    p.add_argument("--no-shards", action="store_true", help="only the CSV, the pools and the probe trees")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        s = build(a.data, a.out, seed=a.seed, image_size=a.image_size, fmt=a.format, workers=a.workers,
                  samples_per_shard=a.samples_per_shard, overwrite=a.overwrite, shards=not a.no_shards,
                  log=lambda m: print(m, flush=True))
    except RealPairsError as e:
        print(f"real_pairs: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: s[k] for k in ("pools", "pairs", "pairs_by_type", "report_use", "probe_trees", "shards",
                                        "timings")}, indent=1))
    print(f"wrote {Path(s['out']) / 'real_pairs.json'}\nbenchmark: {s['ablate_command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
