"""Image-report retrieval on WebDataset shards: image-to-report and report-to-image Recall@K.

Protocol (what the numbers mean):

* Every sample of the shard set (or its first ``--max-samples``) is both a query and a candidate:
  image i is embedded by the image tower, report i (the sample's ``txt``, or one section of its
  json with ``--text findings|impression``) by the text tower, both L2-normalised; the similarity
  is the cosine.
* Exact variant (the headline): a sample's own report is the only match of its image and vice
  versa. R@K = the fraction of queries whose match is among the K most similar candidates.
* ``--same-labels`` variant (reported separately): any candidate whose label set equals the
  query's (the set of positive labels, uncertain ones counted per ``--uncertain``; a normal study
  has ``{no_finding}`` or the empty set) counts as a hit. Easier, and its chance level is much
  higher, so both are printed with their chance level.
* Ties (identical reports get bit-identical embeddings: a templated normal report can occur many
  times) are broken at random *in expectation*: R@K is the exact probability of a hit under a
  uniformly random order of the tied candidates, not an optimistic or pessimistic count.
* Also reported: the median and mean rank of the first hit (expected under random tie-breaking),
  the number of distinct reports, and the chance level of each R@K (a random ranking).

CLI: ``python -m mlip_ds.eval.retrieval --model NAME=EXPORT_DIR --data SHARDS [...]`` (``--help``);
writes ``retrieval.json`` and ``retrieval.md`` into ``--out`` and prints the table. A missing
input exits with code 2 and the path named.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

import numpy as np
import torch

from mlip_ds.eval.datasets import Skipped
from mlip_ds.eval.zero_shot import (EvalError, ImageEmbedder, encode_texts, eval_transform_for, load_export,
                                    resolve_device)

DEFAULT_KS = (1, 5, 10)
TEXT_FIELDS = ("report", "findings", "impression")


# ---------------------------------------------------------------------------------------------
# metrics


def _hit_probability(g: int, t_rel: int, t_non: int, k: int) -> float:
    """P(a relevant item is in the top k) when g items rank strictly above the best relevant score
    and t_rel relevant + t_non other items tie at it, in a uniformly random order."""
    m = min(k - g, t_rel + t_non)
    if m <= 0:
        return 0.0
    if m > t_non:
        return 1.0
    p_miss = 1.0
    for i in range(m):  # all m slots taken by non-relevant tied items
        p_miss *= (t_non - i) / (t_rel + t_non - i)
    return 1.0 - p_miss


def rank_stats(sim: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict:
    """Recall@K (expected under random tie-breaking) and first-hit ranks for each query row.

    ``sim`` (Q, C) similarities, ``relevant`` (Q, C) bool (at least one True per row; a row with
    none counts as a miss at every K). Returns ``{"recall": {k: float}, "median_rank",
    "mean_rank", "per_query_rank" (Q,)}`` (1-based expected rank of the first hit).
    """
    sim = np.asarray(sim, dtype=np.float64)
    rel = np.asarray(relevant, dtype=bool)
    if sim.shape != rel.shape or sim.ndim != 2:
        raise ValueError(f"sim and relevant must be (Q, C) of one shape, got {sim.shape} and {rel.shape}")
    hits = {int(k): np.zeros(len(sim)) for k in ks}
    ranks = np.full(len(sim), np.nan)
    for q in range(len(sim)):
        r = rel[q]
        if not r.any():
            continue
        best = sim[q][r].max()
        row = sim[q]
        g = int((row > best).sum())
        tie = row == best
        t_rel = int((tie & r).sum())
        t_non = int((tie & ~r).sum())
        for k in hits:
            hits[k][q] = _hit_probability(g, t_rel, t_non, k)
        ranks[q] = g + 1 + t_non / (t_rel + 1)
    finite = ranks[~np.isnan(ranks)]
    return {"recall": {k: float(v.mean()) for k, v in hits.items()},
            "median_rank": float(np.median(finite)) if len(finite) else None,
            "mean_rank": float(finite.mean()) if len(finite) else None,
            "per_query_rank": ranks}


def chance_recall(relevant: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict:
    """R@K of a uniformly random ranking: per query 1 - C(N-m, K) / C(N, K), m = relevant count."""
    rel = np.asarray(relevant, dtype=bool)
    n = rel.shape[1]
    out = {}
    for k in ks:
        vals = [_hit_probability(0, int(m), n - int(m), int(k)) if m else 0.0 for m in rel.sum(1)]
        out[int(k)] = float(np.mean(vals))
    return out


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, label_sets: Sequence | None = None,
                      ks: Sequence[int] = DEFAULT_KS) -> dict:
    """Both directions, exact match (and the same-label-set variant when ``label_sets`` is given)."""
    sim = np.asarray(image_emb, dtype=np.float64) @ np.asarray(text_emb, dtype=np.float64).T  # (N images, N reports)
    n = len(sim)
    exact = np.eye(n, dtype=bool)
    out = {"n": n, "exact": {}, "chance": {"exact": chance_recall(exact, ks)}}
    for direction, s in (("image_to_report", sim), ("report_to_image", sim.T)):
        st = rank_stats(s, exact, ks)
        st.pop("per_query_rank")
        out["exact"][direction] = st
    if label_sets is not None:
        keys = [frozenset(x) for x in label_sets]
        ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        code = np.array([ids[k] for k in keys])
        same = code[:, None] == code[None, :]
        out["same_labels"] = {}
        for direction, s in (("image_to_report", sim), ("report_to_image", sim.T)):
            st = rank_stats(s, same, ks)
            st.pop("per_query_rank")
            out["same_labels"][direction] = st
        out["chance"]["same_labels"] = chance_recall(same, ks)
        out["n_label_sets"] = len(ids)
    return out


# ---------------------------------------------------------------------------------------------
# data: images + reports + label sets from shards


def label_set(raw: dict, uncertain: str = "ones") -> frozenset:
    """Positive labels of a sample's json ``labels`` (-1 counts as positive with ``ones``)."""
    pos = {1, -1} if uncertain == "ones" else {1}
    return frozenset(k for k, v in (raw or {}).items() if v in pos)


class ShardImageTextDataset(torch.utils.data.IterableDataset):
    """(image tensor, report text, label set, key) per sample of a shard set, in shard order.

    Corrupt samples (bad image, json or text, no txt member) are skipped with a warning and a
    ``Skipped`` marker, as in ``mlip_ds.eval.datasets``. Single process (no worker split).
    """

    def __init__(self, spec: str, transform=None, text: str = "report", uncertain: str = "ones",
                 max_samples: int | None = None):
        from mlip_ds.eval.datasets import resolve_shards

        if text not in TEXT_FIELDS:
            raise ValueError(f"text must be one of {TEXT_FIELDS}, got {text!r}")
        self.spec = str(spec)
        self.shards, self.manifest = resolve_shards(self.spec)
        self.transform, self.text, self.uncertain = transform, text, uncertain
        self.max_samples = max_samples
        self.skipped = []

    def __iter__(self):
        import webdataset as wds

        from mlip_ds.eval.datasets import _warn_skip

        n = 0
        for shard in self.shards:
            pending = []

            def handler(exn, shard=shard, pending=pending):
                pending.append(_warn_skip(shard, "?", f"unreadable tar data: {type(exn).__name__}: {exn}"))
                return True

            pipe = wds.WebDataset([shard], shardshuffle=False, resampled=False, handler=handler,
                                  nodesplitter=None, workersplitter=None, empty_check=False)
            for sample in pipe:
                if self.max_samples and n >= self.max_samples:
                    return
                while pending:
                    self.skipped.append(pending.pop(0))
                item = self._decode(sample)
                if isinstance(item, Skipped):
                    self.skipped.append(item)
                else:
                    n += 1
                yield item
            self.skipped.extend(pending)

    def _decode(self, sample):
        from mlip_ds.eval.datasets import _SHARD_IMAGE_KEYS, _load_image, _warn_skip

        key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
        try:
            img_key = next((k for k in _SHARD_IMAGE_KEYS if k in sample), None)
            if img_key is None:
                raise KeyError("no image member")
            meta = json.loads(sample["json"]) if "json" in sample else {}
            if self.text == "report":
                if "txt" not in sample:
                    raise KeyError("no txt member")
                text = sample["txt"].decode("utf-8")
            else:
                text = (meta.get("sections") or {}).get(self.text) or ""
            if not text.strip():
                raise ValueError(f"empty {self.text}")
            image = _load_image(sample[img_key])
            if self.transform is not None:
                image = self.transform(image)
        except Exception as exn:  # noqa: BLE001 - skipped and counted, never fatal
            return _warn_skip(url, key, f"{type(exn).__name__}: {exn}")
        return image, text, (label_set(meta.get("labels"), self.uncertain), key)


@torch.no_grad()
def embed_image_text(loaded, dataset: ShardImageTextDataset, batch_size: int = 64, device="cpu",
                     progress: bool = False):
    """-> (image_emb (N, E), text_emb (N, E), texts, label sets, keys)."""
    from tqdm.auto import tqdm

    embed = ImageEmbedder(loaded.model).eval().to(device)
    imgs, texts, sets, keys, batch = [], [], [], [], []

    def flush():
        if batch:
            imgs.append(embed(torch.stack([b[0] for b in batch]).to(device)).cpu().numpy())
            batch.clear()

    with tqdm(desc=f"{loaded.name} images", unit="img", disable=not progress, leave=False) as bar:
        for item in dataset:
            if isinstance(item, Skipped):
                continue
            image, text, (ls, key) = item
            batch.append((image,))
            texts.append(text)
            sets.append(ls)
            keys.append(key)
            if len(batch) >= batch_size:
                flush()
            bar.update(1)
        flush()
    if not imgs:
        raise EvalError(f"no readable samples in {dataset.spec} ({len(dataset.skipped)} skipped as corrupt)")
    image_emb = np.concatenate(imgs, 0).astype(np.float32)
    text_emb = encode_texts(loaded.model, loaded.tokenizer, texts, batch_size=batch_size, device=device)
    return image_emb, text_emb, texts, sets, keys


def run_retrieval(loaded, data: str, ks: Sequence[int] = DEFAULT_KS, same_labels: bool = False, text: str = "report",
                  uncertain: str = "ones", max_samples: int | None = None, batch_size: int = 64, device="cpu",
                  progress: bool = False) -> dict:
    from mlip_ds.eval.datasets import DataPathError

    t0 = time.time()
    if "{" not in str(data) and not os.path.exists(str(data)):
        raise EvalError(f"--data not found: {data}")
    try:
        ds = ShardImageTextDataset(data, eval_transform_for(loaded.preprocess), text=text, uncertain=uncertain,
                                   max_samples=max_samples)
    except DataPathError as exn:
        raise EvalError(str(exn)) from exn
    img, txt, texts, sets, keys = embed_image_text(loaded, ds, batch_size, device, progress)
    res = retrieval_metrics(img, txt, sets if same_labels else None, ks)
    res.update({"model": {"name": loaded.name, "export_dir": loaded.export_dir, "random_init": loaded.random_init},
                "data": str(data), "text": text, "ks": [int(k) for k in ks],
                "n_distinct_reports": len(set(texts)), "num_skipped": len(ds.skipped),
                "skipped_examples": [s._asdict() for s in ds.skipped[:20]], "seconds": round(time.time() - t0, 2)})
    notes = []
    if res["n_distinct_reports"] < len(texts):
        notes.append(f"{len(texts) - res['n_distinct_reports']} report(s) repeat another report word for word; "
                     "their ties are counted in expectation")
    if ds.skipped:
        notes.append(f"skipped {len(ds.skipped)} corrupt sample(s)")
    res["notes"] = notes
    return res


# ---------------------------------------------------------------------------------------------
# reports


def format_markdown(results: dict, digits: int = 3) -> str:
    names = list(results)
    first = results[names[0]]
    ks = first["ks"]
    lines = [f"**Image-report retrieval** on {first['data']}: {first['n']} images x {first['n']} reports "
             f"({first['n_distinct_reports']} distinct), R@K in %; a query's own pair is the only match"
             + (" (exact) or any pair with the same label set counts (same labels)." if "same_labels" in first
                else "."), ""]
    header = ["model", "variant", "direction"] + [f"R@{k}" for k in ks] + ["median rank"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(ks) + 1)) + "|"]

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.{max(digits - 2, 1)}f}"

    for variant in ("exact", "same_labels"):
        if variant not in first:
            continue
        for m in names:
            for direction in ("image_to_report", "report_to_image"):
                st = results[m][variant][direction]
                cells = [m, variant.replace("_", " "), direction.replace("_to_", " → ")]
                cells += [pct(st["recall"][k]) for k in ks] + [f"{st['median_rank']:.1f}"]
                lines.append("| " + " | ".join(cells) + " |")
        ch = first["chance"][variant]
        lines.append("| " + " | ".join(["chance", variant.replace("_", " "), "either"]
                                        + [pct(ch[k]) for k in ks] + [f"{(first['n'] + 1) / 2:.1f}"
                                                                     if variant == "exact" else ""]) + " |")
    notes = [(m, n) for m in names for n in results[m]["notes"]]
    if notes:
        lines += ["", "Notes:"] + [f"- {m}: {n}" for m, n in notes]
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, out_dir: str, extra: dict | None = None, digits: int = 3):
    md = format_markdown(results, digits)
    payload = dict(extra or {})
    payload["models"] = results
    from mlip_ds.eval.common import write_json_and_markdown
    json_path, md_path = write_json_and_markdown(out_dir, "retrieval", payload, md)
    return json_path, md_path, md


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlip_ds.eval.retrieval",
                                description="Image-to-report and report-to-image retrieval (Recall@K) on shards.")
    p.add_argument("--encoder", "--model", dest="model", action="append", required=True,
                   metavar="NAME=[random:]EXPORT_DIR",
                   help="an export to evaluate (repeatable); 'random:' = same architecture, random init")
    p.add_argument("--data", required=True, help="shard dir / brace pattern / single .tar")
    p.add_argument("--ks", default="1,5,10", help="K values (default 1,5,10)")
    p.add_argument("--same-labels", action="store_true",
                   help="also report the variant where a candidate with the query's label set counts as a hit")
    p.add_argument("--text", default="report", choices=TEXT_FIELDS,
                   help="what is retrieved: the whole report (txt, default) or one section of the json")
    p.add_argument("--uncertain", default="ones", choices=["ones", "zeros"],
                   help="label sets: an uncertain (-1) label counts as positive (ones, default) or not")
    p.add_argument("--max-samples", type=int, default=0, help="use the first N samples only (0 = all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--random-init-seed", type=int, default=0)
    p.add_argument("--out", default="runs/retrieval")
    p.add_argument("--digits", type=int, default=3)
    p.add_argument("--no-progress", action="store_true")
    return p


def run_cli(args):
    if "{" not in args.data and not os.path.exists(args.data):
        raise EvalError(f"--data not found: {args.data}")
    try:
        ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
    except ValueError as exn:
        raise EvalError(f"--ks: cannot parse {args.ks!r}") from exn
    if not ks or ks[0] < 1:
        raise EvalError(f"--ks must be positive integers, got {args.ks!r}")
    device = resolve_device(args.device)
    results = {}
    for spec in args.model:
        loaded = load_export(spec, args.random_init_seed)
        if loaded.name in results:
            raise EvalError(f"duplicate model name {loaded.name!r}")
        print(f"[retrieval] model '{loaded.name}': {loaded.export_dir}", file=sys.stderr)
        results[loaded.name] = run_retrieval(loaded, args.data, ks, args.same_labels, args.text, args.uncertain,
                                             args.max_samples or None, args.batch_size, device,
                                             not args.no_progress)
    extra = {"data": args.data, "device": device, "ks": ks, "same_labels": args.same_labels, "text": args.text}
    json_path, md_path, md = write_outputs(results, args.out, extra, args.digits)
    return results, json_path, md_path, md


def main(argv: Sequence[str] | None = None) -> int:
    from mlip_ds.eval.common import eval_main
    return eval_main("retrieval", build_parser, run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
