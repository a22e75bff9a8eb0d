"""Shard writing speed of ``tools/make_shards.py``: images/s and reports/s, 1 worker against 2.

    python benchmarks/bench_make_shards.py                    # 384 samples per run, workers 1 and 2
    python benchmarks/bench_make_shards.py --samples 16 --small 4 --workers 1,2 --repeats 1

Three inputs, each written with every ``--workers`` value, in rounds (so a change of machine load
hits all alike):

- ``synthetic``: the built-in generator (render + resize + PNG encode + report), ``--image-size``;
- ``csv``: a CSV of PNG radiographs (synthetic ones saved at ``--source-size`` px, read, converted,
  resized and re-encoded) and their reports;
- ``csv --link``: the same CSV with every report linked to the knowledge base (entities, labels).

Each configuration runs the real CLI twice, with ``--samples`` and with ``--small`` samples;
"steady samples/s" = (samples - small) / (wall - wall_small), which takes out the fixed start-up
(imports, the linker's index, the pool); "end to end" divides by the whole wall time of the big
run. One image and one report per sample, so images/s = reports/s for a source; the linking alone
("reports/s, link only") is derived from csv with and without ``--link``:
1 / (1/rate_link - 1/rate_nolink), per worker count.
Not a test: numbers depend on the machine; the table says which.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

from bench_common import (ROOT, add_common_args, begin, load_avg, machine_line, run_logged,
                          show, table, work_dir)

SOURCES = ("synthetic", "csv", "csv --link")


def make_csv_source(folder: Path, n: int, size: int) -> Path:
    """``n`` synthetic radiographs as PNG files at ``size`` px and a CSV (image, report) listing them."""
    from PIL import Image
    from mlip_ds.sources.synthetic import generate_sample
    path = folder / "studies.csv"
    if path.exists() and sum(1 for _ in open(path)) == n + 1:
        return path
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "report"])
        for i in range(n):
            s = generate_sample(i, seed=7, size=size)
            name = f"images/study_{i:05d}.png"
            Image.fromarray(s.image).save(folder / name)
            w.writerow([name, s.report])
    return path


def fmt(x: float, digits: int = 1) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"


def cmd_for(source: str, n: int, workers: int, out: Path, csv_path: Path, image_size: int) -> list[str]:
    base = [sys.executable, str(ROOT / "tools" / "make_shards.py")]
    common = ["--out", str(out), "--workers", str(workers), "--image-size", str(image_size), "--quiet",
              "--overwrite"]
    if source == "synthetic":
        return base + ["synthetic", "--num-samples", str(n)] + common
    return base + ["csv", "--csv", str(csv_path)] + common + (["--link"] if source.endswith("--link") else [])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=384, help="samples of the timed run")
    ap.add_argument("--small", type=int, default=48, help="samples of the start-up run (subtracted)")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--sources", default=",".join(SOURCES))
    ap.add_argument("--image-size", type=int, default=256, help="make_shards --image-size")
    ap.add_argument("--source-size", type=int, default=512, help="px of the CSV source images")
    ap.add_argument("--repeats", type=int, default=2, help="rounds; medians reported")
    add_common_args(ap)
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args(argv)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    bad = set(sources) - set(SOURCES)
    if bad:
        ap.error(f"unknown sources {sorted(bad)}: choose from {SOURCES}")
    workers = [int(w) for w in args.workers.split(",") if w]
    if not 0 < args.small < args.samples:
        ap.error("--small must be between 0 and --samples")
    work, tmp = work_dir(args.work, "bench_make_shards_")
    csv_path = make_csv_source(work / "csv_src", args.samples, args.source_size) \
        if any(s.startswith("csv") for s in sources) else work / "none.csv"
    small_csv = work / "csv_src" / "studies_small.csv"
    if csv_path.exists():
        lines = csv_path.read_text().splitlines(keepends=True)
        small_csv.write_text("".join(lines[:args.small + 1]))

    begun = begin(args)
    walls: dict[tuple, list[tuple[float, float]]] = {}
    cmds = {}
    for i in range(args.repeats):
        for source in sources:
            for w in workers:
                t = []
                for n, c in ((args.small, small_csv), (args.samples, csv_path)):
                    cmd = cmd_for(source, n, w, work / "out", c, args.image_size)
                    t.append(run_logged(cmd, work / "make_shards.log", args.timeout))
                cmds[(source, w)] = cmd
                walls.setdefault((source, w), []).append((t[0], t[1]))
                print(f"  {source} workers {w} round {i + 1}: {args.samples} in {t[1]:.1f} s, {args.small} in "
                      f"{t[0]:.1f} s, load {load_avg()}", file=sys.stderr, flush=True)
    load_end = load_avg()

    steady, e2e = {}, {}
    for key, ts in walls.items():
        # a start-up run as slow as the timed one (noise swamping a tiny run) gives no steady rate
        steady[key] = statistics.median((args.samples - args.small) / (big - small) if big > small else float("nan")
                                        for small, big in ts)
        e2e[key] = statistics.median(args.samples / big for _, big in ts)
    rows = []
    for source in sources:
        for w in workers:
            key = (source, w)
            ratio = steady[key] / steady[(source, workers[0])]
            rows.append([source, w, f"{statistics.median(b for _, b in walls[key]):.1f}", f"{e2e[key]:.1f}",
                         fmt(steady[key]), fmt(ratio, 2)])
    print(machine_line(begun, load_end))
    print(f"tools/make_shards.py, {args.samples} samples per timed run (start-up run: {args.small}), "
          f"--image-size {args.image_size}, PNG; CSV source images {args.source_size} px PNG; one image and one "
          f"report per sample (images/s = reports/s); {args.repeats} round(s), medians")
    print(table(["source", "workers", "wall s", "end-to-end samples/s", "steady samples/s",
                 f"x {workers[0]} worker"], rows))
    if "csv" in sources and "csv --link" in sources:
        link_rows = []
        for w in workers:
            a, b = steady[("csv --link", w)], steady[("csv", w)]
            per = 1 / a - 1 / b
            link_rows.append([w, fmt(1 / per) if per > 0 else "n/a (within noise)"])
        print("linking alone, derived from csv with and without --link:")
        print(table(["workers", "reports/s, link only"], link_rows))
    print("commands (timed run):")
    for (source, w), cmd in cmds.items():
        print(f"  {source}, workers {w}: OMP_NUM_THREADS=1 {show(cmd)}")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
