#!/usr/bin/env python
"""Benchmark the report linker on the real Open-i reports against NegBio's gold labels.

  python benchmarks/bench_linker.py [--data ../shared/data/openi_reports] [--negation rules|negex|both]
                               [--uncertain negative|positive|both] [--split all|negbio_test|negbio_rest]
                               [--ablate] [--sample N] [--markdown] [--show-errors FINDING]

Reads ``openi_reports.jsonl`` (3,955 reports) and ``openi_labels.csv`` (NegBio's Open-i gold
standard: 14 ChestX-ray14 findings + "normal", 0/1, from the reports' MeSH annotations; 3,851 reports
have gold labels). Each report is written as Open-i sections ("COMPARISON: ... INDICATION: ...
FINDINGS: ... IMPRESSION: ...") and linked; only findings and impression are linked (the
linker's default sections). A finding is predicted present when an entity of one of its concepts
(GOLD_TO_KB below) is affirmed. Uncertain mentions count as absent by default (``--uncertain
negative``): on this gold that measures 0.927 macro-F1 against 0.808 when they count as present
(the MeSH annotators left hedged findings, "possible X", "may represent X", unannotated). Per
finding precision / recall / F1; macro over the findings that have gold positives (Hernia has none
in this gold, although 47 reports mention a hernia); "normal" against ``no_finding`` is shown but
not in the macro (MeSH "normal" also excludes granulomas, degenerative changes, ...). Speed:
reports per second of ``nlp.pipe`` in one process after a 50-report warm-up, index build
excluded; run it under ``taskset -c 0`` with OMP_NUM_THREADS=1 for a one-core figure.
``--split negbio_test`` scores NegBio's 771-report test set only; ``--ablate`` rescores without
each change of the curation file; ``--show-errors FINDING`` prints error contexts to the terminal.
Prints tables; this is not a test. The data is CC BY-NC-ND: nothing from it is written anywhere.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "openi_reports"

# gold finding -> (KB labels whose concepts count, extra KB concept ids)
GOLD_TO_KB = {
    "Atelectasis": (("atelectasis",), ()),
    "Cardiomegaly": (("cardiomegaly",), ()),
    "Effusion": (("pleural_effusion",), ()),
    "Infiltration": ((), ("C0235896",)),                                   # pulmonary infiltrate
    "Mass": ((), ("C0577559", "MLIP:lung_mass", "MLIP:mediastinal_mass", "MLIP:pleural_mass")),
    "Nodule": (("nodule",), ()),
    "Pneumonia": (("pneumonia",), ("MLIP:pneumonitis",)),  # MeSH Pneumonia's entry terms hold Pneumonitis
    "Pneumothorax": (("pneumothorax",), ()),   # minus hydro-/hemopneumothorax (MeSH keeps them apart)
    "Consolidation": (("consolidation",), ()),
    "Edema": (("edema",), ()),
    "Emphysema": ((), ("C0034067",)),                                     # pulmonary emphysema
    "Fibrosis": ((), ("C0016059", "C0034069", "MLIP:ipf", "MLIP:radiation_fibrosis")),
    "Pleural_Thickening": ((), ("MLIP:pleural_thickening", "MLIP:apical_pleural_thickening")),
    "Hernia": ((), ("C0019270", "C0019291", "MLIP:diaphragmatic_hernia")),
}
# concepts of a KB label that the Open-i gold files under another MeSH heading
GOLD_EXCLUDE = {"Pneumothorax": {"MLIP:hydropneumothorax", "C0019077"}}
FINDINGS = tuple(GOLD_TO_KB)


def report_text(r: dict) -> str:
    parts = []
    for key, title in (("comparison", "COMPARISON"), ("indication", "INDICATION"),
                       ("findings", "FINDINGS"), ("impression", "IMPRESSION")):
        if (r.get(key) or "").strip():
            parts.append(f"{title}: {r[key].strip()}")
    return "\n".join(parts)


def load_data(data_dir: Path, split: str = "all"):
    """(reports, gold) — gold only for the reports of ``split``: all | negbio_test (NegBio's
    771-report test set) | negbio_rest (the others)."""
    reports = [json.loads(line) for line in open(data_dir / "openi_reports.jsonl", encoding="utf-8")]
    gold = {}
    with open(data_dir / "openi_labels.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["in_negbio_gold"] != "1":
                continue
            if split == "negbio_test" and row["negbio_testset"] != "1":
                continue
            if split == "negbio_rest" and row["negbio_testset"] == "1":
                continue
            gold[row["uid"]] = {k[5:]: int(v) for k, v in row.items() if k.startswith("gold_")}
    return reports, gold


def concept_sets(kb) -> dict[str, set[str]]:
    out = {}
    for finding, (labels, ids) in GOLD_TO_KB.items():
        s = set(ids)
        for lab in labels:
            s |= {c.id for c in kb.concepts_for_label(lab)}
        s -= GOLD_EXCLUDE.get(finding, set())
        missing = [i for i in s if i not in kb]
        if missing:
            raise SystemExit(f"bench: {finding}: ids not in the KB: {missing}")
        out[finding] = s
    return out


def predict(entities, sets, uncertain_positive: bool) -> dict[str, int]:
    pos = set()
    for e in entities:
        if e["negated"] or (e["uncertain"] and not uncertain_positive):
            continue
        pos.add(e["cui"])
    return {f: int(bool(pos & s)) for f, s in sets.items()}


def score(pairs):
    tp = sum(1 for g, p in pairs if g and p)
    fp = sum(1 for g, p in pairs if not g and p)
    fn = sum(1 for g, p in pairs if g and not p)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return tp, fp, fn, prec, rec, f1


def evaluate(uids, ents_by_uid, gold, sets, kb, uncertain_positive):
    from mlip_ds.knowledge.linker import labels_from_entities
    rows = {}
    for f in FINDINGS:
        pairs = []
        for uid in uids:
            if uid in gold:
                pairs.append((gold[uid][f], predict(ents_by_uid[uid], {f: sets[f]}, uncertain_positive)[f]))
        rows[f] = (sum(g for g, _ in pairs),) + score(pairs)
    normal = []
    for uid in uids:
        if uid in gold:
            labels = labels_from_entities(
                [e for e in ents_by_uid[uid] if uncertain_positive or not e["uncertain"]], kb)
            normal.append((gold[uid]["normal"], labels["no_finding"]))
    rows["normal (no_finding)"] = (sum(g for g, _ in normal),) + score(normal)
    scored = [rows[f][6] for f in FINDINGS if rows[f][0] > 0]
    macro = sum(scored) / len(scored)
    macro_p = sum(rows[f][4] for f in FINDINGS if rows[f][0] > 0) / len(scored)
    macro_r = sum(rows[f][5] for f in FINDINGS if rows[f][0] > 0) / len(scored)
    return rows, (macro_p, macro_r, macro), len(scored)


def print_table(rows, macro, n_scored, speed, title, markdown):
    head = ("finding", "gold+", "TP", "FP", "FN", "P", "R", "F1")
    lines = []
    if markdown:
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * 7) + "|")
    else:
        lines.append(f"{head[0]:<22}{head[1]:>6}{head[2]:>6}{head[3]:>6}{head[4]:>6}"
                     f"{head[5]:>8}{head[6]:>8}{head[7]:>8}")
    for name, (n, tp, fp, fn, p, r, f1) in rows.items():
        cells = [name, str(n), str(tp), str(fp), str(fn)]
        if n == 0:
            cells += ["n/a", "n/a", "n/a"]
        else:
            cells += [f"{p:.3f}", f"{r:.3f}", f"{f1:.3f}"]
        if markdown:
            lines.append("| " + " | ".join(cells) + " |")
        else:
            lines.append(f"{cells[0]:<22}{cells[1]:>6}{cells[2]:>6}{cells[3]:>6}{cells[4]:>6}"
                         f"{cells[5]:>8}{cells[6]:>8}{cells[7]:>8}")
    mp, mr, mf = macro
    label = f"macro ({n_scored} findings)"
    if markdown:
        lines.append(f"| **{label}** | | | | | **{mp:.3f}** | **{mr:.3f}** | **{mf:.3f}** |")
    else:
        lines.append(f"{label:<46}{mp:>8.3f}{mr:>8.3f}{mf:>8.3f}")
    print(f"\n{title}")
    print("\n".join(lines))
    print(f"speed: {speed[0]:.0f} reports/s wall, {speed[1]:.0f} reports per CPU-second (one process, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; the wall figure drops when "
          f"other jobs share the core)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--negation", choices=("rules", "negex", "both"), default="both")
    ap.add_argument("--uncertain", choices=("positive", "negative", "both"), default="negative")
    ap.add_argument("--split", choices=("all", "negbio_test", "negbio_rest"), default="all",
                    help="score on all gold reports, NegBio's test set (771), or the rest")
    ap.add_argument("--ablate", action="store_true",
                    help="also rescore without each change of the curation file, one at a time")
    ap.add_argument("--sample", type=int, default=0, help="link a random sample of N reports")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overrides", default=None, help="curation file ('' = none; default: packaged)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--show-errors", default=None, metavar="FINDING",
                    help="print FP/FN mention contexts for one finding (to the terminal only)")
    args = ap.parse_args(argv)

    if not (args.data / "openi_reports.jsonl").is_file():
        print(f"bench_linker: no Open-i data in {args.data}", file=sys.stderr)
        return 2
    from mlip_ds.knowledge.linker import ReportLinker

    reports, gold = load_data(args.data, args.split)
    if args.sample:
        reports = random.Random(args.seed).sample(reports, min(args.sample, len(reports)))
    texts = [report_text(r) for r in reports]
    uids = [r["uid"] for r in reports]
    methods = ("rules", "negex") if args.negation == "both" else (args.negation,)
    policies = {"positive": (True,), "negative": (False,), "both": (True, False)}[args.uncertain]
    summary = []
    for method in methods:
        t0 = time.perf_counter()
        linker = ReportLinker(negation=method, overrides=args.overrides)
        build = time.perf_counter() - t0
        linker.link_many(texts[:50])  # warm-up (memo of mention strings is part of steady state)
        t0, c0 = time.perf_counter(), time.process_time()
        ents = linker.link_many(texts)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        speed = (len(texts) / dt, len(texts) / cpu)
        by_uid = dict(zip(uids, ents))
        sets = concept_sets(linker.kb)
        for up in policies:
            rows, macro, n_scored = evaluate(uids, by_uid, gold, sets, linker.kb, up)
            title = (f"negation={method}, uncertain counted as {'positive' if up else 'negative'}, "
                     f"{sum(1 for u in uids if u in gold)} reports with gold (of {len(uids)} linked), "
                     f"pipeline built in {build:.1f}s (index {'cached' if linker.index_info['cached'] else 'built'})")
            print_table(rows, macro, n_scored, speed, title, args.markdown)
            summary.append((method, up, macro[2], speed))
        if args.show_errors:
            _show_errors(args.show_errors, uids, texts, by_uid, gold, sets, policies[0])
    if args.ablate:
        _ablate(args, texts, uids, gold, policies[0])
    if len(summary) > 1:
        print("\nsummary: " + "; ".join(f"{m}/uncertain={'pos' if u else 'neg'}: macro-F1 {f:.3f}, "
                                        f"{s[0]:.0f} rep/s wall, {s[1]:.0f} rep/CPU-s" for m, u, f, s in summary))
    return 0


def _ablate(args, texts, uids, gold, up):
    """Macro-F1 without each curation change (rules negation), against the full curation."""
    from mlip_ds.knowledge.linker import ReportLinker, load_overrides, override_change_names
    from mlip_ds.knowledge.kb import load_kb
    kb = load_kb()
    sets = concept_sets(kb)
    names = override_change_names(args.overrides or None)

    def macro_with(ov):
        linker = ReportLinker(kb, overrides=ov, negation="rules")
        by_uid = dict(zip(uids, linker.link_many(texts)))
        rows, macro, _ = evaluate(uids, by_uid, gold, sets, kb, up)
        return rows, macro[2]

    full_rows, full = macro_with(load_overrides(args.overrides or None, kb))
    _, none = macro_with(load_overrides("", kb))
    print(f"\nablation (negation=rules): macro-F1 with the whole curation file {full:.3f}; with none {none:.3f}")
    print(f"{'change left out':<40}{'macro-F1':>9}{'bought':>9}  findings that moved (F1 with -> without)")
    for name in names:
        rows, m = macro_with(load_overrides(args.overrides or None, kb, skip=[name]))
        moved = ", ".join(f"{f} {full_rows[f][6]:.3f}->{rows[f][6]:.3f}" for f in FINDINGS
                          if rows[f][0] and abs(rows[f][6] - full_rows[f][6]) >= 0.0005)
        print(f"{name:<40}{m:>9.3f}{full - m:>+9.3f}  {moved}")


def _show_errors(finding, uids, texts, by_uid, gold, sets, up):
    """FP: the contexts of the mentions that made the prediction; FN: the report's findings text."""
    print(f"\n--- errors for {finding} (terminal only) ---")
    for uid, text in zip(uids, texts):
        if uid not in gold:
            continue
        g = gold[uid][finding]
        p = predict(by_uid[uid], {finding: sets[finding]}, up)[finding]
        if g == p:
            continue
        if p:
            for e in by_uid[uid]:
                if e["cui"] in sets[finding] and not e["negated"] and (up or not e["uncertain"]):
                    ctx = text[max(0, e["start"] - 90):e["start"]] + "[[" + text[e["start"]:e["end"]] + "]]" \
                        + text[e["end"]:e["end"] + 60]
                    print(f"FP {uid} {'UNC' if e['uncertain'] else 'POS'}: {ctx!r}")
        else:
            ents = [(text[e["start"]:e["end"]], "NEG" if e["negated"] else "UNC" if e["uncertain"] else "POS")
                    for e in by_uid[uid] if e["cui"] in sets[finding]]
            body = text.split("FINDINGS:", 1)[-1] if "FINDINGS:" in text else text.split("IMPRESSION:", 1)[-1]
            print(f"FN {uid}: {ents} || {body[:300]!r}")


if __name__ == "__main__":
    raise SystemExit(main())
