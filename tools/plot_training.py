#!/usr/bin/env python
"""Plot training curves (PNG) from the TensorBoard event files of one or more runs.

    python tools/plot_training.py runs/clip [runs/mlip ...] [--names clip,mlip] [--out curves.png]
        [--panels "loss/*,lr,temperature,perf/*"] [--smooth 0.6] [--title TEXT]

A path is a run's --out-dir (its tb/ is read), a TensorBoard log dir or one event file. Panels:
all loss/* terms together, then lr, temperature and one panel per perf/* tag; several runs are
overlaid. A step logged twice (a run resumed after a kill) keeps its last value. Default output:
<first run>/training_curves.png. Exit code 2 when a path or its event files are missing.
"""
from __future__ import annotations

import argparse
import os
import sys

from mlip_ds.eval.common import print_path_or_error
from mlip_ds.eval.plots import DEFAULT_CURVE_PANELS, plot_training_curves, read_tb_scalars


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/plot_training.py", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run dirs (with tb/), TensorBoard log dirs or event files")
    p.add_argument("--names", default=None, help="comma-separated run names (default: the folder names)")
    p.add_argument("--out", default=None, help="PNG path (default: <first run>/training_curves.png)")
    p.add_argument("--panels", default=",".join(DEFAULT_CURVE_PANELS),
                   help="comma-separated tag patterns, one panel group each (default %(default)s)")
    p.add_argument("--smooth", type=float, default=0.0, help="exponential smoothing of losses, in [0, 1)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    if not 0.0 <= args.smooth < 1.0:
        print(f"error: --smooth must be in [0, 1), got {args.smooth}", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.names.split(",")] if args.names else \
        [os.path.basename(os.path.normpath(r)) or r for r in args.runs]
    if len(names) != len(args.runs) or len(set(names)) != len(names):
        print(f"error: need one distinct name per run, got {names} for {len(args.runs)} run(s)", file=sys.stderr)
        return 2
    runs = {}
    for name, path in zip(names, args.runs):
        tb = os.path.join(path, "tb")
        try:
            runs[name] = read_tb_scalars(tb if os.path.isdir(tb) else path)
        except FileNotFoundError as exn:
            print(f"error: {exn}", file=sys.stderr)
            return 2
    out = args.out or os.path.join(args.runs[0] if os.path.isdir(args.runs[0]) else
                                   os.path.dirname(args.runs[0]), "training_curves.png")
    panels = [x.strip() for x in args.panels.split(",") if x.strip()]
    return print_path_or_error(lambda: plot_training_curves(runs, out, panels=panels, smooth=args.smooth,
                                                            title=args.title), errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
