"""Link a JSON Lines file of reports to the knowledge base.

  python -m mlip_ds.knowledge.link --in reports.jsonl --out entities.jsonl [--workers N] [--kb PATH]
         [--overrides PATH] [--negation rules|negex] [--sections findings,impression,body|all]
         [--labels] [--chunk-size 64]

Each input line is {"id": ..., "text": ...} (other keys are ignored); each output line is
{"id": ..., "entities": [{"cui", "name", "start", "end", "negated", "uncertain"}, ...]} (plus
"labels" with --labels), in input order whatever the number of worker processes. Blank lines are
skipped. A line that is not a JSON object with a string "text" stops the run with its line number.
The output is written to a temporary file and renamed at the end.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Iterator

_WORKER = None  # the per-process ReportLinker


class InputError(ValueError):
    pass


def _read_records(path: Path) -> Iterator[tuple[int, object, str]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict) or "id" not in obj or not isinstance(obj.get("text"), str):
                raise InputError(f"{path}:{lineno}: expected an object with 'id' and a string 'text'")
            yield lineno, obj["id"], obj["text"]


def _chunks(records, size: int):
    chunk = []
    for rec in records:
        chunk.append(rec)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _make_linker(kb: str | None, overrides: str | None, negation: str, sections):
    from mlip_ds.knowledge.linker import ReportLinker
    return ReportLinker(kb, overrides=overrides, negation=negation, sections=sections)


def _init_worker(kb, overrides, negation, sections):
    global _WORKER
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER = _make_linker(kb, overrides, negation, sections)


def _link_chunk(args) -> list[str]:
    chunk, with_labels = args
    from mlip_ds.knowledge.linker import labels_from_entities
    texts = [text for _, _, text in chunk]
    out = []
    for (_, rid, _), ents in zip(chunk, _WORKER.link_many(texts)):
        rec = {"id": rid, "entities": ents}
        if with_labels:
            rec["labels"] = labels_from_entities(ents, _WORKER.kb)
        out.append(json.dumps(rec, ensure_ascii=False))
    return out


def _count_records(path: Path) -> int:
    """Validate every line up front (a bad line fails before any linking) and count them."""
    return sum(1 for _ in _read_records(path))


def link_file(in_path: str | os.PathLike, out_path: str | os.PathLike, workers: int = 1,
              kb: str | None = None, overrides: str | None = None, negation: str | None = None,
              sections="default", with_labels: bool = False, chunk_size: int = 64,
              progress: bool = True) -> int:
    """Link every report of ``in_path`` into ``out_path``; returns the number of reports.

    ``sections``: "default" (findings, impression and unheaded text), None (the whole text) or a
    sequence of section names (see mlip_ds.knowledge.sections)."""
    global _WORKER
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise FileNotFoundError(f"input file not found: {in_path}")
    total = _count_records(in_path)

    from tqdm import tqdm

    from mlip_ds.knowledge import negation as negation_mod
    from mlip_ds.knowledge.sections import CLINICAL_SECTIONS

    negation = negation or negation_mod.DEFAULT_METHOD
    if sections == "default":
        sections = CLINICAL_SECTIONS
    elif sections is not None:
        sections = tuple(sections)
    # build (or load from the cache) the index once here, so that workers only read the cache,
    # and fail early on a bad KB / curation file
    linker = _make_linker(kb, overrides, negation, sections)
    tmp = out_path.with_name(out_path.name + f".tmp-{os.getpid()}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tasks = ((chunk, with_labels) for chunk in _chunks(_read_records(in_path), chunk_size))
    bar = tqdm(total=total, unit="report", desc="linking", disable=not progress, file=sys.stderr)
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            if workers <= 1:
                _WORKER = linker
                results = map(_link_chunk, tasks)
                pool = None
            else:
                method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
                pool = mp.get_context(method).Pool(workers, initializer=_init_worker,
                                                   initargs=(kb, overrides, negation, sections))
                results = pool.imap(_link_chunk, tasks)  # imap keeps the input order
            try:
                for lines in results:
                    for line in lines:
                        out.write(line + "\n")
                    n += len(lines)
                    bar.update(len(lines))
            except BaseException:
                if pool is not None:  # a worker failed or the run was interrupted: stop the rest
                    pool.terminate()
                raise
            finally:
                if pool is not None:
                    pool.close()
                    pool.join()
        os.replace(tmp, out_path)
    finally:
        bar.close()
        if tmp.exists():
            tmp.unlink()
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mlip_ds.knowledge.link",
                                 description="Link report texts to the knowledge base (entities with "
                                             "negation/uncertainty).")
    ap.add_argument("--in", dest="inp", required=True, help="JSONL of {'id', 'text'}")
    ap.add_argument("--out", required=True, help="JSONL of {'id', 'entities'} (input order)")
    ap.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    ap.add_argument("--kb", default=None, help="KB file (default: the packaged cxr_kb_v1.jsonl)")
    ap.add_argument("--overrides", default=None,
                    help="linker curation file (default: the packaged linker_overrides.json; '' = none)")
    ap.add_argument("--negation", choices=("rules", "negex"), default=None,
                    help="negation/uncertainty method (default: rules)")
    ap.add_argument("--sections", default=None,
                    help="comma-separated sections to link (default findings,impression,body; 'all' = "
                         "the whole text)")
    ap.add_argument("--labels", action="store_true", help="also write CheXpert-style 'labels'")
    ap.add_argument("--chunk-size", type=int, default=64, help="reports per task (default 64)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    if args.sections is None:
        sections = "default"
    elif args.sections.strip() == "all":
        sections = None
    else:
        sections = tuple(x.strip() for x in args.sections.split(",") if x.strip())
    try:
        n = link_file(args.inp, args.out, workers=args.workers, kb=args.kb, overrides=args.overrides,
                      negation=args.negation, sections=sections, with_labels=args.labels,
                      chunk_size=max(1, args.chunk_size), progress=not args.no_progress)
    except (InputError, FileNotFoundError, ValueError) as e:
        print(f"link: error: {e}", file=sys.stderr)
        return 2
    print(f"linked {n} reports -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
