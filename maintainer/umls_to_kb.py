#!/usr/bin/env python
"""Make a knowledge-base file (the packaged KB's JSONL format) from a licensed UMLS release.

    python maintainer/umls_to_kb.py --umls-dir UMLS/2024AA/META --out data/kb/umls_cxr.jsonl
        [--tui T047,T033,... | --all-tuis] [--sab SNOMEDCT_US,MSH,...] [--lang ENG]
        [--no-relations] [--max-aliases N] [--merge-packaged | --merge KB.jsonl]
        [--release NAME] [--quiet]

Streams MRSTY.RRF, MRCONSO.RRF, MRDEF.RRF and MRREL.RRF (see mlip_ds/knowledge/umls.py for the
column orders, filters and relation mapping); keeps English, non-suppressed rows of the selected
semantic types (default: a chest-radiograph set, see --help) and source vocabularies (default all).
Writes OUT and OUT's ``<stem>.meta.json`` (filters, counts, release); --merge-packaged merges the
result with the packaged KB (its names, definitions and labels win). Load with
``mlip_ds.knowledge.kb.load_kb(OUT)``. The output holds UMLS content: keep it out of the repository.

Exit codes: 0 ok; 2 bad arguments, missing RRF file or malformed line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mlip_ds.knowledge.kb import (DEFAULT_KB_PATH, KBFormatError, KnowledgeBase, meta_path_for,
                                  read_kb_concepts, write_atomic, write_kb)
from mlip_ds.knowledge.umls import DEFAULT_TUIS, TUI_SEMANTIC_TYPE, UMLSError, merge_concepts, read_umls


def _csv(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _release_name(umls_dir: Path) -> str | None:
    for cand in (umls_dir / "release.dat", umls_dir.parent / "release.dat"):
        if cand.is_file():
            for line in cand.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.startswith("umls.release.name="):
                    return line.split("=", 1)[1].strip() or None
    return None


def build_parser() -> argparse.ArgumentParser:
    known = sorted(TUI_SEMANTIC_TYPE.items())
    epilog = "\n".join(
        [f"default --tui: {','.join(DEFAULT_TUIS[:10])},", f"               {','.join(DEFAULT_TUIS[10:])}",
         "semantic types and the KB type they map to:"]
        + ["  " + "  ".join(f"{t}={k}" for t, k in known[i:i + 5]) for i in range(0, len(known), 5)])
    p = argparse.ArgumentParser(
        prog="umls_to_kb.py", description="Make a KB JSONL file from a licensed UMLS release (RRF files).",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--umls-dir", type=Path, required=True,
                   help="the release's META directory (or its parent) with MRCONSO/MRSTY/MRREL/MRDEF.RRF")
    p.add_argument("--out", type=Path, required=True, help="KB file to write (JSONL)")
    types = p.add_mutually_exclusive_group()
    types.add_argument("--tui", type=_csv, default=list(DEFAULT_TUIS),
                       help="semantic types to keep, comma-separated (default: a chest-radiograph set)")
    types.add_argument("--all-tuis", action="store_true", help="keep every semantic type with a KB type")
    p.add_argument("--sab", type=_csv, default=None,
                   help="source vocabularies to keep, comma-separated, e.g. SNOMEDCT_US,MSH (default: all)")
    p.add_argument("--lang", type=_csv, default=["ENG"], help="languages (MRCONSO LAT) to keep (default: ENG)")
    p.add_argument("--no-relations", action="store_true", help="skip MRREL.RRF (no relations)")
    p.add_argument("--max-aliases", type=int, default=None, help="keep at most N aliases per concept")
    merge = p.add_mutually_exclusive_group()
    merge.add_argument("--merge-packaged", action="store_true", help="merge with the packaged KB (it wins)")
    merge.add_argument("--merge", type=Path, default=None, help="merge with this KB file (it wins)")
    p.add_argument("--release", default=None, help="release name for the meta file (default: from release.dat)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"umls_to_kb: {msg}", file=sys.stderr))
    if args.max_aliases is not None and args.max_aliases < 0:
        print("umls_to_kb: error: --max-aliases must be >= 0", file=sys.stderr)
        return 2
    try:
        result = read_umls(args.umls_dir, tuis=None if args.all_tuis else args.tui, sabs=args.sab,
                           languages=args.lang, relations=not args.no_relations, max_aliases=args.max_aliases,
                           progress=say)
        concepts, merged = result.concepts, None
        merge_path = DEFAULT_KB_PATH if args.merge_packaged else args.merge
        if merge_path is not None:
            base, _ = read_kb_concepts(merge_path)
            KnowledgeBase(base)
            concepts, merged = merge_concepts(base, concepts)
            merged["with"] = str(merge_path)
        sha = write_kb(concepts, args.out)
    except (UMLSError, KBFormatError, FileNotFoundError) as e:
        print(f"umls_to_kb: error: {e}", file=sys.stderr)
        return 2
    kb = KnowledgeBase(concepts)
    release = args.release or _release_name(args.umls_dir)
    meta = {"kb_name": args.out.stem, "kb_version": f"umls-{release}" if release else "umls",
            "format_version": 1, "file": args.out.name, "sha256": sha, "n_concepts": len(kb),
            "by_semantic_type": kb.counts(), "built_by": "maintainer/umls_to_kb.py", "umls_release": release,
            "filters": {"tuis": result.stats["tuis"], "sabs": result.stats["sabs"],
                        "languages": result.stats["languages"], "relations": not args.no_relations,
                        "max_aliases": args.max_aliases},
            "stats": result.stats, "alias_clashes_sample": result.clashes[:100], "merge": merged,
            "license": "Contains UMLS Metathesaurus content: use under your UMLS license; do not redistribute."}
    write_atomic(meta_path_for(args.out), (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    say(f"wrote {len(kb)} concepts ({kb.counts()}) to {args.out}; {result.stats['relations']} relations, "
        f"{result.stats['alias_clashes']} alias clashes resolved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
