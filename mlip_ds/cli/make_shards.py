"""Write WebDataset shards (+ manifest.json) from the synthetic generator, a CSV, MIMIC-CXR or Open-i.

    python tools/make_shards.py synthetic --out DIR --num-samples 2000 [--seed 0] [--start-index 0]
        [--samples-per-shard 256] [--image-size 256] [--format png|jpg] [--workers N] [--prefix shard]
    python tools/make_shards.py csv --csv FILE --out DIR [--image-col image]
        [--report-col report | --report-file-col report_file] [--label-cols a,b,c] [--meta-cols x,y]
        [--id-col id] [--root DIR] [--image-size 256] [--format png|jpg] [--samples-per-shard 256]
        [--workers N] [--prefix shard] [--strict]
    python tools/make_shards.py mimic-cxr --root MIMIC_CXR_JPG --split train|validate|test --out DIR
        [--reports-dir DIR] [--views PA,AP | all] [--image-ext jpg|dcm] [--uncertain keep|positive|negative|drop]
        [--no-link] ...
    python tools/make_shards.py openi (--xml-dir ecgen-radiology | --annotation annotation.json --split train|val|test)
        --images DIR --out DIR [--image-ext png] [--no-link] ...
Any source: --resume finishes an interrupted or damaged run (verified shards are kept).

Exit codes: 0 ok; 1 nothing was written (every row skipped); 2 bad arguments, missing input/column,
existing output without --overwrite / --resume, or (with --strict) the first bad row.
The sample schema and the manifest are documented in docs/data.md ("Making shards").
Installed as the ``mlip-make-shards`` command; ``python tools/make_shards.py`` runs the same.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from functools import partial

from mlip_ds import __version__
from mlip_ds.data import shard_resume
from mlip_ds.data import shard_writer as sw
from mlip_ds.sources import csv_source, mimic_cxr, openi


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _non_negative(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def _quality(value: str) -> int:
    n = int(value)
    if not 1 <= n <= 100:
        raise argparse.ArgumentTypeError(f"must be 1..100, got {n}")
    return n


def _col_list(value: str) -> list:
    cols = [c.strip() for c in value.split(",") if c.strip()]
    if not cols:
        raise argparse.ArgumentTypeError("empty column list")
    return cols


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output folder (created if missing)")
    common.add_argument("--prefix", default="shard",
                        help="shard file prefix: PREFIX-000000.tar ...; the manifest is manifest.json for the "
                             "default 'shard', else PREFIX-manifest.json (default: shard)")
    common.add_argument("--samples-per-shard", type=_positive, default=256, help="samples per shard (default: 256)")
    common.add_argument("--image-size", type=_positive, default=256,
                        help="resize so the short side is this many pixels, down or up (default: 256)")
    common.add_argument("--format", choices=sw.IMAGE_FORMATS, default="png", help="image encoding (default: png)")
    common.add_argument("--jpeg-quality", type=_quality, default=sw.DEFAULT_JPEG_QUALITY,
                        help=f"JPEG quality for --format jpg (default: {sw.DEFAULT_JPEG_QUALITY})")
    common.add_argument("--workers", type=_positive, default=1,
                        help="processes for decode/resize/encode; output does not depend on it (default: 1)")
    common.add_argument("--resume", action="store_true",
                        help="finish an interrupted or damaged run in --out: shards already complete and verified "
                             "by their sha256 are kept, missing / partial / corrupt ones are rewritten (same options)")
    common.add_argument("--overwrite", action="store_true",
                        help="replace this prefix's shards and manifest if the folder already has them")
    common.add_argument("--quiet", action="store_true", help="no progress bar")

    p = argparse.ArgumentParser(prog="make_shards.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="source", required=True)

    s = sub.add_parser("synthetic", parents=[common], help="synthetic chest X-rays + reports (mlip_ds.sources.synthetic)")
    s.add_argument("--num-samples", type=_positive, required=True)
    s.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    s.add_argument("--start-index", type=_non_negative, default=0,
                   help="first sample index; e.g. a test set with --start-index 1000000 is disjoint from "
                        "a train set made from index 0 (default: 0)")
    s.add_argument("--gen-size", type=_positive, default=None,
                   help="size the generator draws at (default: --image-size, i.e. no resize)")

    c = sub.add_parser("csv", parents=[common], help="images + reports listed in a CSV")
    c.add_argument("--csv", required=True, help="the CSV file (UTF-8, header row)")
    c.add_argument("--root", default=None, help="folder relative paths are resolved against (default: the CSV's folder)")
    c.add_argument("--image-col", default="image", help="column with the image path (default: image)")
    rep = c.add_mutually_exclusive_group()
    rep.add_argument("--report-col", default=None, help="column with the report text (default: report)")
    rep.add_argument("--report-file-col", default=None, help="column with a path to a UTF-8 report file")
    c.add_argument("--label-cols", type=_col_list, default=None,
                   help="comma-separated label columns (values 1/0/-1, 1.0/0.0/-1.0, blank = not given); "
                        "default: every column that is not image/report/id/meta")
    c.add_argument("--meta-cols", type=_col_list, default=None,
                   help="comma-separated columns copied as strings into the sample's meta (e.g. Sex,Age)")
    c.add_argument("--id-col", default=None, help="column with the sample id (default: the image path without extension)")
    c.add_argument("--link", action="store_true",
                   help="link each report to the knowledge base: fills entities, and labels for rows without label values")
    c.add_argument("--strict", action="store_true",
                   help="stop with exit code 2 at the first bad row instead of skipping it")

    m = sub.add_parser("mimic-cxr", parents=[common], help="MIMIC-CXR-JPG (official layout) + MIMIC-CXR reports")
    m.add_argument("--root", required=True,
                   help="folder holding mimic-cxr-2.0.0-{metadata,split,chexpert}.csv(.gz) and files/pXX/...")
    m.add_argument("--split", required=True, choices=mimic_cxr.SPLITS, help="official split to write")
    m.add_argument("--reports-dir", default=None,
                   help="folder holding files/pXX/pSUBJECT/sSTUDY.txt (mimic-cxr-reports.zip; default: --root)")
    m.add_argument("--views", type=_col_list, default=list(mimic_cxr.FRONTAL_VIEWS),
                   help="ViewPosition values to keep, comma-separated, or 'all' (default: PA,AP)")
    m.add_argument("--image-ext", choices=("jpg", "dcm"), default="jpg",
                   help="jpg (MIMIC-CXR-JPG) or dcm (MIMIC-CXR DICOM, same folder layout) (default: jpg)")
    m.add_argument("--uncertain", choices=tuple(mimic_cxr.UNCERTAIN_POLICIES), default="keep",
                   help="CheXpert -1: keep as -1, or map to positive (U-Ones) / negative (U-Zeros) / drop (default: keep)")

    o = sub.add_parser("openi", parents=[common], help="Open-i / IU X-ray: report XML or R2Gen annotation.json")
    src = o.add_mutually_exclusive_group(required=True)
    src.add_argument("--xml-dir", help="folder of Open-i report XML files (ecgen-radiology/)")
    src.add_argument("--annotation", help="R2Gen-style annotation.json")
    o.add_argument("--images", required=True,
                   help="image folder: NLMCXR_png/ (XML: <parentImage id>.<ext>) or the R2Gen images/ root")
    o.add_argument("--image-ext", default="png", help="XML layout: image file extension (png, jpg, dcm; default: png)")
    o.add_argument("--split", choices=openi.ANNOTATION_SPLITS, default=None, help="annotation.json: split to write")
    for sp in (m, o):
        sp.add_argument("--no-link", action="store_true",
                        help="do not link reports to the knowledge base (entities stay empty, no derived labels)")
        sp.add_argument("--strict", action="store_true",
                        help="stop with exit code 2 at the first bad sample instead of skipping it")
    return p


def _mark_duplicates(jobs: list) -> list:
    """A second job with an already used key is skipped (reason 'duplicate id'), never overwritten."""
    seen: dict = {}
    for job in jobs:
        if job.error is None:
            if job.key in seen:
                job.error = f"duplicate id: key {job.key!r} already used by row {seen[job.key]}"
            else:
                seen[job.key] = job.row
    return jobs


def _fail(msg: str, code: int = 2):
    print(f"make_shards: error: {msg}", file=sys.stderr)
    sys.exit(code)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.source == "csv" and args.report_col is None and args.report_file_col is None:
        args.report_col = "report"
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        _fail(f"--out {args.out} exists and is not a folder")
    if "/" in args.prefix or not args.prefix.strip():
        _fail(f"--prefix {args.prefix!r} must be a plain file name prefix")
    existing = sw.existing_outputs(args.out, args.prefix)
    if args.resume and args.overwrite:
        _fail("--resume and --overwrite exclude each other")
    if existing and not (args.overwrite or args.resume):
        _fail(f"{args.out} already holds {len(existing)} output file(s) for prefix {args.prefix!r} "
              f"(e.g. {os.path.basename(existing[0])}); pass --resume to finish that run or --overwrite to replace them")

    extra = {}
    created_with = {"tool": "tools/make_shards.py", "mlip_ds_version": __version__}
    created_with.update({k: v for k, v in vars(args).items()})
    link = getattr(args, "link", False) or (args.source in ("mimic-cxr", "openi") and not args.no_link)
    encode = sw.EncodeOptions(image_size=args.image_size, fmt=args.format, jpeg_quality=args.jpeg_quality, link=link)
    if args.source == "openi" and args.annotation and args.split is None:
        _fail("openi --annotation needs --split train|val|test")

    if args.source == "synthetic":
        opts = sw.SyntheticOptions(encode=encode, seed=args.seed, gen_size=args.gen_size or args.image_size)
        from mlip_ds.data.schema import FINDINGS, NO_FINDING
        try:
            from mlip_ds.sources import synthetic as _syn
        except ImportError as e:
            _fail(f"cannot import the synthetic generator: {e}")
        label_names = list(getattr(_syn, "LABEL_NAMES", [*FINDINGS, NO_FINDING]))
        indices = range(args.start_index, args.start_index + args.num_samples)
        jobs, fn = list(indices), partial(sw.process_synthetic, opts)
        total, source = len(indices), "synthetic"
    elif args.source in ("mimic-cxr", "openi"):
        try:
            if args.source == "mimic-cxr":
                views = None if [v.lower() for v in args.views] == ["all"] else tuple(args.views)
                label_names, rows, left_out = mimic_cxr.read_jobs(
                    args.root, args.split, views=views, reports_dir=args.reports_dir,
                    image_ext=args.image_ext, uncertain=args.uncertain)
                where = args.root
            elif args.xml_dir:
                rows, where = openi.read_xml_jobs(args.xml_dir, args.images, args.image_ext), args.xml_dir
            else:
                rows, where = openi.read_annotation_jobs(args.annotation, args.images, args.split), args.annotation
        except csv_source.CsvSourceError as e:
            _fail(str(e))
        except (OSError, UnicodeError, ValueError, csv.Error) as e:  # unreadable / malformed table
            _fail(f"cannot read the {args.source} input ({type(e).__name__}: {e})")
        rows = _mark_duplicates(rows)
        if args.source == "openi":
            label_names, left_out = [], None
        if encode.link:  # derived labels may name any KB label: list them all
            from mlip_ds.knowledge.kb import load_kb
            label_names += [n for n in load_kb().labels if n not in label_names]
        extra = {"left_out": left_out} if left_out else {}
        jobs, fn = list(rows), partial(sw.process_csv_row, encode)
        total, source = len(rows), args.source
        args.csv = where  # named in --strict errors
    else:
        try:
            label_names, rows = csv_source.read_rows(
                args.csv, image_col=args.image_col, report_col=args.report_col,
                report_file_col=args.report_file_col, label_cols=args.label_cols,
                meta_cols=args.meta_cols, id_col=args.id_col, root=args.root)
            rows = list(rows)
        except csv_source.CsvSourceError as e:
            _fail(str(e))
        except (OSError, UnicodeError, ValueError, csv.Error) as e:  # unreadable CSV, csv.Error
            _fail(f"{args.csv}: cannot read the CSV ({e})")
        if encode.link and not label_names:
            from mlip_ds.knowledge.kb import load_kb
            label_names = list(load_kb().labels)
        jobs, fn = list(rows), partial(sw.process_csv_row, encode)
        total, source = len(rows), "csv"

    fp = shard_resume.fingerprint(created_with, jobs)
    records = {}
    if args.resume:
        records = shard_resume.verified_records(args.out, args.prefix,
                                                os.path.join(args.out, sw.manifest_name(args.prefix)), fp)
    else:
        for path in existing:  # --overwrite: only now that the input checked out
            os.remove(path)
        shard_resume.remove_journal(args.out, args.prefix)
    results, n_reused = shard_resume.resumable_map(fn, jobs, args.workers, records)
    total = len(jobs) - sum(r["jobs"][1] - r["jobs"][0] for r in records.values()) + n_reused
    try:
        manifest = sw.write_dataset(results, args.out, source=source, created_with=created_with,
                                    label_names=label_names, prefix=args.prefix,
                                    samples_per_shard=args.samples_per_shard,
                                    strict=getattr(args, "strict", False), total=total,
                                    progress=not args.quiet, extra=extra, fingerprint=fp)
    except sw.StrictError as e:
        _fail(f"{args.csv}: {e} (--strict: stopped, no manifest written)")
    if args.resume:
        print(f"resume: kept {n_reused} verified shard(s), wrote {len(manifest['shards']) - n_reused}")
    print(sw.summarize(manifest, args.out, args.prefix))
    if manifest["num_samples"] == 0:
        print("make_shards: error: no samples were written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
