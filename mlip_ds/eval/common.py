"""What the evaluation commands share (linear_probe, finetune, zero_shot, retrieval, plots,
downstream): the user-error base class, encoder specs, comma lists, label fractions and their
stratified subsamples, result summaries and writing, the data arguments and ``main``."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from typing import Callable, Sequence

import numpy as np

DEFAULT_FRACTIONS = (0.01, 0.1, 1.0)
DEFAULT_SEEDS = (0, 1, 2)


class EvalError(RuntimeError):
    """A user-facing error of an evaluation command (bad path, bad argument): ``eval_main`` prints
    it and exits 2. ``ProbeError`` (linear_probe) and the other commands' errors derive from it."""


# ---------------------------------------------------------------------------------------------
# arguments


def parse_encoder_spec(spec: str) -> tuple[str, str, bool]:
    """``NAME=PATH`` / ``NAME=random:PATH`` / ``PATH`` / ``random:PATH`` -> (name, path, random_init)."""
    name, sep, rest = spec.partition("=")
    if not sep:
        name, rest = spec, spec
    random_init = rest.startswith("random:")
    path = rest[len("random:"):] if random_init else rest
    if not path:
        raise EvalError(f"--encoder {spec!r}: empty export path")
    if not sep:
        name = f"random-init({os.path.basename(os.path.normpath(path))})" if random_init \
            else os.path.basename(os.path.normpath(path))
    return name, path, random_init


def csv_list(s: str, typ, what: str) -> list:
    """``"a,b,c"`` -> ``[typ(a), typ(b), typ(c)]``; an ``EvalError`` naming ``what`` when it cannot."""
    try:
        out = [typ(x.strip()) for x in s.split(",") if x.strip()]
    except ValueError as exn:
        raise EvalError(f"{what}: cannot parse {s!r} ({exn})") from exn
    if not out:
        raise EvalError(f"{what}: empty list")
    return out


def add_labelled_data_args(p: argparse.ArgumentParser, verb: str = "probe") -> None:
    """The encoders, labelled train/test data, label policies, fractions and seeds of the probe and
    fine-tuning commands (``parse_labelled_data_args`` reads them)."""
    p.add_argument("--encoder", action="append", required=True, metavar="NAME=[random:]EXPORT_DIR",
                   help=f"an encoder to {verb} (repeatable). 'random:' = same architecture, random init.")
    p.add_argument("--train-data", required=True, help="shard dir / brace pattern / .csv / class-folder tree")
    p.add_argument("--test-data", required=True, help="same kinds as --train-data")
    p.add_argument("--train-split", default=None, help="CSV only: keep rows whose 'split' column equals this")
    p.add_argument("--test-split", default=None, help="CSV only: keep rows whose 'split' column equals this")
    p.add_argument("--labels", default=None,
                   help="comma-separated label names (default: manifest label_names for shards, "
                        "all 1/0/-1 columns for a CSV; ignored for a folder tree)")
    p.add_argument("--uncertain", default="ones", choices=["ones", "zeros", "ignore"],
                   help="policy for uncertain (-1) labels (default: ones = U-Ones)")
    p.add_argument("--missing", default="zeros", choices=["zeros", "ignore"],
                   help="a label absent from a sample / blank CSV cell: negative (default) or masked")
    p.add_argument("--fractions", default="0.01,0.1,1.0", help="training-set fractions (default 0.01,0.1,1.0)")
    p.add_argument("--seeds", default="0,1,2", help="subsampling seeds (default 0,1,2)")


def parse_labelled_data_args(args, error: type[EvalError] = EvalError):
    """-> (encoders [(name, path, random_init)], fractions, seeds, labels or None), checked: the data
    paths exist (brace patterns are checked when expanded), encoder names are unique, fractions in (0, 1]."""
    for path, what in ((args.train_data, "--train-data"), (args.test_data, "--test-data")):
        if "{" not in path and not os.path.exists(path):
            raise error(f"{what} not found: {path}")
    encoders = [parse_encoder_spec(s) for s in args.encoder]
    names = [e[0] for e in encoders]
    if len(set(names)) != len(names):
        raise error(f"duplicate encoder names: {names}")
    fractions = csv_list(args.fractions, float, "--fractions")
    if any(not 0 < f <= 1 for f in fractions):
        raise error(f"--fractions must be in (0, 1], got {fractions}")
    seeds = csv_list(args.seeds, int, "--seeds")
    labels = csv_list(args.labels, str, "--labels") if args.labels else None
    return encoders, fractions, seeds, labels


# ---------------------------------------------------------------------------------------------
# label fractions


def fraction_key(f: float) -> str:
    return f"{float(f):g}"


def fraction_count(fraction: float, n: int) -> int:
    """``round(fraction * n)`` with halves rounded up (not banker's rounding), clipped to [0, n]."""
    return int(min(n, max(0, math.floor(fraction * n + 0.5))))


def stratified_subsample(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray | None, str | None]:
    """Indices of a stratified subsample of integer class labels ``y``.

    Size ``fraction_count(fraction, len(y))`` raised to the number of classes, at least one sample
    per class present in ``y``. Returns ``(sorted indices, note)``; ``(None, reason)`` when ``y``
    holds fewer than two classes. ``note`` is set when the size had to be raised.
    """
    y = np.asarray(y).astype(np.int64)
    n_total = len(y)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        return None, f"only one class ({classes.tolist()}) among {n_total} samples"
    if fraction >= 1.0:
        return np.arange(n_total), None
    n = fraction_count(fraction, n_total)
    note = None
    if n < len(classes):
        note = f"{fraction_key(fraction)} of {n_total} = {n} sample(s), raised to {len(classes)} (one per class)"
        n = len(classes)
    exact = counts * n / n_total
    alloc = np.minimum(np.maximum(1, np.floor(exact)).astype(np.int64), counts)
    while alloc.sum() < n:  # largest remainder first, among classes with samples left
        room = alloc < counts
        j = np.flatnonzero(room)[np.argmax((exact - alloc)[room])]
        alloc[j] += 1
    while alloc.sum() > n:  # only possible through the >= 1 floor: take from the most over-allocated
        room = alloc > 1
        j = np.flatnonzero(room)[np.argmax((alloc - exact)[room])]
        alloc[j] -= 1
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), size=int(a), replace=False)
                          for c, a in zip(classes, alloc)])
    return np.sort(idx), note


# ---------------------------------------------------------------------------------------------
# results


def mean_std(values: Sequence[float]) -> dict:
    """``{"mean", "std" (sample std, 0 with one value), "n_seeds"}`` of the values that are numbers."""
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return {"mean": None, "std": None, "n_seeds": 0}
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n_seeds": len(v)}


def json_default(o):
    """``json.dump``'s ``default``: numpy scalars and arrays as Python values, anything else as str."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def clean_nan(o):
    """NaN and infinities as None (JSON null), through dicts, lists and tuples."""
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {k: clean_nan(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean_nan(v) for v in o]
    return o


def write_json_and_markdown(out_dir: str, stem: str, payload: dict, md: str) -> tuple[str, str]:
    """``<stem>.json`` (NaN as null) and ``<stem>.md`` in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, f"{stem}.json"), os.path.join(out_dir, f"{stem}.md")
    with open(json_path, "w") as f:
        json.dump(clean_nan(payload), f, indent=2, default=json_default)
    with open(md_path, "w") as f:
        f.write(md)
    return json_path, md_path


def as_columns(*arrays) -> list[np.ndarray]:
    """Each array as float64 (N, L): a 1-D array (one label) becomes one column."""
    out = []
    for a in arrays:
        a = np.asarray(a, dtype=np.float64)
        out.append(a[:, None] if a.ndim == 1 else a)
    return out


# ---------------------------------------------------------------------------------------------
# main


def print_path_or_error(make: Callable[[], str], errors: tuple = (FileNotFoundError, ValueError, EvalError)) -> int:
    """The exit of a command that writes one file: ``make()`` returns its path, printed (0); one of
    ``errors`` is printed as ``error: ...`` on stderr (2)."""
    try:
        out = make()
    except errors as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    print(out)
    return 0


def eval_main(tag: str, build_parser: Callable, run_cli: Callable, argv: Sequence[str] | None = None,
              also_wrote: Sequence[str] = ()) -> int:
    """Parse, run (``run_cli(args) -> (results, json_path, md_path, markdown)``), print the Markdown
    table and what was written; on an ``EvalError`` print it and return 2."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            _, json_path, md_path, md = run_cli(args)
    except EvalError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    print(md)
    wrote = [json_path, md_path, *also_wrote]
    print(f"[{tag}] wrote {', '.join(wrote[:-1])} and {wrote[-1]}", file=sys.stderr)
    return 0
