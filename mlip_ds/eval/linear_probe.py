"""Linear-probe evaluation of a frozen image encoder (data-efficiency curve: 1% / 10% / 100%).

Protocol (what the numbers mean):

* Features: the frozen encoder's (B, D) output (``mlip_ds.eval.features``), no augmentation.
* Per label, one binary logistic regression: ``StandardScaler`` (fit on that probe's training
  subsample only) + ``sklearn.linear_model.LogisticRegression`` (L2, lbfgs).
* C: ``C="cv"`` (default) picks C from ``C_GRID`` by stratified k-fold CV *on the training
  subsample only* (k = min(3, smallest class count); ties go to the smaller C; the test set is never
  used). If the subsample has fewer than 2 samples of some class, CV is impossible and C = 1.0 (noted).
  A float fixes C.
* Fractions: for each label, a stratified random subsample of that label's non-masked training
  samples, size ``round(fraction * n_valid)``, raised to at least one sample per class; the class
  ratio is kept (largest-remainder allocation, >= 1 per class). Each label draws its own subsample
  (seeded by ``seed``), so every probe sees both classes. 100% uses all training samples: the fit
  is the same for every seed, so it is done once (CV folds of the first seed) and its number is
  repeated for the other seeds (rows carry ``reused_from_seed``; std 0).
* Impossible cases never crash: a label whose non-masked training samples (at that fraction) or
  test samples hold a single class is skipped for that fraction; a note says which and why, and the
  table shows "n/a".
* Metric: ROC AUC per label (binary); accuracy for a multi-class task (class-per-folder tree with
  more than two classes; one multinomial logistic regression). Summary = mean ± std over seeds,
  std = sample std (ddof=1; 0 with one seed). "mean" = mean over labels within each seed, then
  mean ± std of that over seeds.
* Masked labels (NaN, from the "ignore" uncertain policy) are left out of both training and
  testing of that label only.

CLI: ``python -m mlip_ds.eval.linear_probe --encoder NAME=EXPORT_DIR [--encoder NAME=random:EXPORT_DIR]
--train-data PATH --test-data PATH [...]`` (``--help``); writes ``probe.json`` and ``probe.md`` into
``--out`` and prints the Markdown table.
``--save-classifier DIR`` also keeps one calibrated classifier (encoder + head + calibration +
thresholds; ``mlip_ds/eval/classifier.py``) that ``python -m mlip_ds.eval.predict`` runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Mapping, Sequence

import numpy as np

from mlip_ds.eval.common import (DEFAULT_FRACTIONS, DEFAULT_SEEDS, EvalError, as_columns,  # noqa: F401  (re-exported)
                                 add_labelled_data_args, eval_main, fraction_count, fraction_key, mean_std,
                                 parse_encoder_spec, parse_labelled_data_args, stratified_subsample,
                                 write_json_and_markdown)

C_GRID = (0.01, 0.1, 1.0, 10.0)


class ProbeError(EvalError):
    """A user-facing error of the probe CLI (bad path, bad argument); main() prints it and exits 2."""


# ---------------------------------------------------------------------------------------------
# one probe


def _make_model(C: float, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))


def _score(model, X, y, task: str) -> float:
    from sklearn.metrics import accuracy_score, roc_auc_score

    if task == "binary":
        return float(roc_auc_score(y, model.predict_proba(X)[:, 1]))
    return float(accuracy_score(y, model.predict(X)))


def _select_C(X, y, task: str, seed: int, grid: Sequence[float] = C_GRID) -> tuple[float, str | None]:
    from sklearn.model_selection import StratifiedKFold

    _, counts = np.unique(y, return_counts=True)
    k = int(min(3, counts.min()))
    if k < 2:
        return 1.0, f"too few samples per class for CV ({counts.tolist()}), C=1.0"
    folds = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(X, y))
    best_C, best = None, -np.inf
    for C in sorted(grid):
        scores = []
        for tr, va in folds:
            if task == "binary" and len(np.unique(y[va])) < 2:
                continue
            scores.append(_score(_make_model(C, seed).fit(X[tr], y[tr]), X[va], y[va], task))
        if scores and np.mean(scores) > best + 1e-12:
            best_C, best = C, float(np.mean(scores))
    if best_C is None:
        return 1.0, "CV folds unusable, C=1.0"
    return best_C, None


def fit_and_score(X_train, y_train, X_test, y_test, task: str = "binary", C="cv", seed: int = 0,
                  head: str = "logreg") -> dict:
    """Fit one standardized logistic regression (``head="logreg"``) or MGCA's Adam-trained linear
    layer (``head="linear"``, ``eval/linear_head.py``; C unused) and score it on the test set.

    Returns ``{"metric", "C", "note"}``.
    """
    from sklearn.exceptions import ConvergenceWarning

    if head == "linear":
        from mlip_ds.eval.linear_head import LinearLayerHead
        model = LinearLayerHead(seed=seed).fit(X_train, y_train)
        return {"metric": _score(model, X_test, y_test, task), "C": None, "note": None}
    if head != "logreg":
        raise ValueError(f"head must be 'logreg' or 'linear', got {head!r}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        note = None
        if isinstance(C, str):
            if C != "cv":
                raise ValueError(f"C must be a number or 'cv', got {C!r}")
            C_used, note = _select_C(X_train, y_train, task, seed)
        else:
            C_used = float(C)
        model = _make_model(C_used, seed).fit(X_train, y_train)
        return {"metric": _score(model, X_test, y_test, task), "C": C_used, "note": note}


# ---------------------------------------------------------------------------------------------
# the probe over labels x fractions x seeds


def run_probe(features_train: np.ndarray, labels_train: np.ndarray, features_test: np.ndarray,
              labels_test: np.ndarray, label_names: Sequence[str], fractions: Sequence[float] = DEFAULT_FRACTIONS,
              seeds: Sequence[int] = DEFAULT_SEEDS, task: str = "binary", class_names: Sequence[str] | None = None,
              C="cv", progress: bool = False, head: str = "logreg") -> dict:
    """Linear probe on precomputed features (protocol in the module docstring).

    ``labels_*``: (N, L) float, 1/0/NaN per label for ``task="binary"``; (N,) or (N, 1) class
    indices for ``task="multiclass"``. Returns a JSON-serialisable dict: ``per_seed`` (one row per
    fraction x seed x label, skipped ones included with ``metric: None`` and a ``note``),
    ``summary[fraction_key]["per_label"][name]`` and ``summary[fraction_key]["mean_over_labels"]``
    (``{"mean", "std", "n_seeds"}``), and ``notes``.
    """
    if task not in ("binary", "multiclass"):
        raise ValueError(f"task must be 'binary' or 'multiclass', got {task!r}")
    Xtr = np.asarray(features_train, dtype=np.float64)
    Xte = np.asarray(features_test, dtype=np.float64)
    Ytr, Yte = as_columns(labels_train, labels_test)
    label_names = list(label_names)
    if task == "multiclass":
        label_names = label_names[:1] or ["class"]
    if Xtr.ndim != 2 or Xte.ndim != 2 or Xtr.shape[1] != Xte.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D; got train {Xtr.shape}, test {Xte.shape}")
    if len(Xtr) != len(Ytr) or len(Xte) != len(Yte):
        raise ValueError(f"features/labels length mismatch: train {len(Xtr)}/{len(Ytr)}, test {len(Xte)}/{len(Yte)}")
    if Ytr.shape[1] < len(label_names) or Yte.shape[1] < len(label_names):
        raise ValueError(f"{len(label_names)} label names but labels have {Ytr.shape[1]} (train) / "
                         f"{Yte.shape[1]} (test) columns")
    fractions = [float(f) for f in fractions]
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"fractions must be in (0, 1], got {f}")
    seeds = [int(s) for s in seeds]
    metric = "auc" if task == "binary" else "accuracy"

    rows: list[dict] = []
    notes: list[str] = []
    grouped: dict[tuple[str, str], list[str]] = {}  # (fraction key, short reason) -> labels

    def note(msg: str):
        if msg not in notes:
            notes.append(msg)

    def reason(f: float, short: str, name: str):
        labels_ = grouped.setdefault((fraction_key(f), short), [])
        if name not in labels_:
            labels_.append(name)

    full_cache: dict[int, dict] = {}
    jobs = [(f, s, j) for f in fractions for s in seeds for j in range(len(label_names))]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(jobs), desc="probe", unit="fit", leave=False)
    t0 = time.time()
    for f, seed, j in jobs:
        name = label_names[j]
        row = {"fraction": f, "seed": seed, "label": name, "metric": None, "n_train": 0,
               "class_counts": None, "C": None, "note": None}
        ytr_all, yte_all = Ytr[:, j], Yte[:, j]
        vtr, vte = ~np.isnan(ytr_all), ~np.isnan(yte_all)
        ytr, yte = ytr_all[vtr].astype(np.int64), yte_all[vte].astype(np.int64)
        if task == "binary" and len(np.unique(yte)) < 2:
            row["note"] = f"skipped: test set has a single class for '{name}' ({len(yte)} usable samples)"
            reason(f, "skipped, the test set holds a single class", name)
        else:
            idx, sub_note = stratified_subsample(ytr, f, seed)
            if idx is None:
                row["note"] = f"skipped: training set (non-masked) for '{name}' has {sub_note}"
                reason(f, "skipped, the (non-masked) training samples hold a single class", name)
            elif f >= 1.0 and j in full_cache:  # 100%: same data for every seed, fit once
                row.update({k: full_cache[j][k] for k in ("metric", "n_train", "class_counts", "C", "note")})
                row["reused_from_seed"] = full_cache[j]["seed"]
            else:
                Xs, ys = Xtr[vtr][idx], ytr[idx]
                out = fit_and_score(Xs, ys, Xte[vte], yte, task=task, C=C, seed=seed, head=head)
                _, cc = np.unique(ys, return_counts=True)
                row.update(metric=out["metric"], n_train=int(len(idx)), class_counts=cc.tolist(), C=out["C"],
                           note="; ".join(x for x in (sub_note, out["note"]) if x) or None)
                if sub_note:
                    reason(f, "training subsample raised to one sample per class", name)
                if out["note"]:
                    reason(f, "C=1.0 since CV was impossible (a class with < 2 samples)"
                           if out["note"].startswith("too few") else "C=1.0 since the CV folds were unusable", name)
                if f >= 1.0:
                    full_cache[j] = row
        rows.append(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    for (fk, short), names in grouped.items():
        note(f"{fk}: {short}: {', '.join(names)}")
    summary = {}
    for f in fractions:
        fk = fraction_key(f)
        per_label = {}
        for name in label_names:
            per_label[name] = mean_std([r["metric"] for r in rows if r["fraction"] == f and r["label"] == name])
        per_seed_means = []
        for seed in seeds:
            vals = [r["metric"] for r in rows if r["fraction"] == f and r["seed"] == seed and r["metric"] is not None]
            per_seed_means.append(float(np.mean(vals)) if vals else None)
        n_labels_used = [sum(1 for r in rows if r["fraction"] == f and r["seed"] == s and r["metric"] is not None)
                         for s in seeds]
        mean = mean_std(per_seed_means)
        mean["n_labels"] = n_labels_used
        if any(n < len(label_names) for n in n_labels_used):
            note(f"{fk}: mean over labels uses only the labels that could be probed ({n_labels_used} of "
                 f"{len(label_names)} per seed)")
        summary[fk] = {"per_label": per_label, "mean_over_labels": mean}

    return {
        "task": task,
        "metric": metric,
        "label_names": label_names,
        "class_names": list(class_names) if class_names is not None else None,
        "fractions": fractions,
        "seeds": seeds,
        "C": C if isinstance(C, str) else float(C),
        "C_grid": list(C_GRID) if C == "cv" else None,
        "n_train": int(len(Xtr)),
        "n_test": int(len(Xte)),
        "feature_dim": int(Xtr.shape[1]),
        "train_positives": ({n: int(np.nansum(Ytr[:, j] == 1)) for j, n in enumerate(label_names)}
                            if task == "binary" else None),
        "test_positives": ({n: int(np.nansum(Yte[:, j] == 1)) for j, n in enumerate(label_names)}
                           if task == "binary" else None),
        "per_seed": rows,
        "summary": summary,
        "notes": notes,
        "seconds": round(time.time() - t0, 2),
    }


# ---------------------------------------------------------------------------------------------
# reports


def _fmt(ms: dict | None, digits: int) -> str:
    if not ms or ms.get("mean") is None:
        return "n/a"
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def _fraction_header(f: float) -> str:
    return f"{f * 100:g}%"


def format_markdown(results_by_encoder: Mapping[str, dict], digits: int = 3, title: str | None = None) -> str:
    """One Markdown table: a row per label (+ the mean), a column block (one column per fraction) per encoder.

    ``results_by_encoder``: ``{encoder_name: run_probe(...) result}`` (a single result is accepted too).
    """
    if "summary" in results_by_encoder and "per_seed" in results_by_encoder:
        results_by_encoder = {"encoder": results_by_encoder}  # a single run_probe result
    if not results_by_encoder:
        return "(no results)\n"
    encs = list(results_by_encoder)
    first = results_by_encoder[encs[0]]
    metrics = {r["metric"] for r in results_by_encoder.values()}
    metric_name = "ROC AUC" if metrics == {"auc"} else "accuracy" if metrics == {"accuracy"} else "/".join(sorted(metrics))
    labels: list[str] = []
    for r in results_by_encoder.values():
        labels += [n for n in r["label_names"] if n not in labels]
    seeds = sorted({len(r["seeds"]) for r in results_by_encoder.values()})
    lines = []
    lines.append(f"**{title or 'Linear probe'}**: {metric_name}, mean ± std over {'/'.join(map(str, seeds))} "
                 f"seed(s); columns = fraction of the training set used. "
                 f"Train {first['n_train']} / test {first['n_test']} samples.")
    lines.append("")
    header = ["label"]
    for e in encs:
        header += [f"{e} {_fraction_header(f)}" for f in results_by_encoder[e]["fractions"]]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    multiclass = metrics == {"accuracy"}
    if not (multiclass and len(labels) == 1):
        for name in labels:
            cells = [name]
            for e in encs:
                r = results_by_encoder[e]
                for f in r["fractions"]:
                    cells.append(_fmt(r["summary"][fraction_key(f)]["per_label"].get(name), digits))
            lines.append("| " + " | ".join(cells) + " |")
    cells = ["**accuracy**" if multiclass and len(labels) == 1 else "**mean**"]
    for e in encs:
        r = results_by_encoder[e]
        for f in r["fractions"]:
            cells.append(_fmt(r["summary"][fraction_key(f)]["mean_over_labels"], digits))
    lines.append("| " + " | ".join(cells) + " |")
    notes = [(e, n) for e in encs for n in results_by_encoder[e].get("notes", [])]
    if notes:
        lines.append("")
        lines.append("Notes:")
        for e, n in notes:
            lines.append(f"- {e}: {n}")
    return "\n".join(lines) + "\n"


def write_reports(results_by_encoder: Mapping[str, dict], out_dir: str, extra: dict | None = None,
                  digits: int = 3) -> tuple[str, str, str]:
    """Write ``probe.json`` (all per-seed numbers + summaries) and ``probe.md``; return (json, md paths, markdown)."""
    md = format_markdown(results_by_encoder, digits=digits)
    payload = dict(extra or {})
    payload["encoders"] = {name: r for name, r in results_by_encoder.items()}
    json_path, md_path = write_json_and_markdown(out_dir, "probe", payload, md)
    return json_path, md_path, md


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlip_ds.eval.linear_probe",
        description="Linear-probe evaluation of frozen image encoders on a labelled CXR dataset "
                    "(WebDataset shard dir/pattern, CSV, or class-per-folder tree).")
    add_labelled_data_args(p, "probe")
    p.add_argument("--C", default="cv", help="logistic-regression C, or 'cv' to pick from %s by 3-fold CV "
                                             "on the training subsample (default)" % (C_GRID,))
    p.add_argument("--head", default="logreg", choices=["logreg", "linear"],
                   help="logreg: standardised L2 logistic regression, C by CV (default); linear: MGCA's protocol, "
                        "one linear layer trained with AdamW on the frozen features")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for feature extraction")
    p.add_argument("--device", default="auto", help="cuda / cpu / auto (default)")
    p.add_argument("--random-init-seed", type=int, default=0, help="seed of random-init encoders")
    p.add_argument("--out", default="runs/linear_probe", help="output dir for probe.json / probe.md")
    p.add_argument("--save-features", action="store_true", help="also save features_<encoder>.npz in --out")
    p.add_argument("--digits", type=int, default=3)
    p.add_argument("--no-progress", action="store_true")
    from mlip_ds.eval.classifier import add_classifier_args
    add_classifier_args(p)
    return p


def _open_data(path, transform, label_names, args, split, class_names):
    from mlip_ds.eval.datasets import open_labelled_dataset

    return open_labelled_dataset(path, transform=transform, label_names=label_names, uncertain=args.uncertain,
                                 missing=args.missing, split=split, class_names=class_names)


def run_cli(args) -> tuple[dict, str, str, str]:
    import torch

    from mlip_ds.data.transforms import eval_transform
    from mlip_ds.eval.datasets import DataPathError
    from mlip_ds.eval.features import extract_features

    encoders, fractions, seeds, labels = parse_labelled_data_args(args, ProbeError)
    for name, path, _ in encoders:
        if not os.path.isdir(path):
            raise ProbeError(f"export dir of encoder '{name}' not found: {path}")
    if args.C == "cv":
        C = "cv"
    else:
        try:
            C = float(args.C)
        except ValueError as exn:
            raise ProbeError(f"--C must be a number or 'cv', got {args.C!r}") from exn
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    from mlip_ds.eval.classifier import check_classifier_args
    check_classifier_args(args, ProbeError)

    try:
        from mlip_ds.export import load_image_encoder
    except ImportError as exn:
        raise ProbeError(f"cannot import mlip_ds.export.load_image_encoder: {exn}") from exn

    results = {}
    for name, path, random_init in encoders:
        print(f"[linear_probe] encoder '{name}': {'random init, architecture of ' if random_init else ''}{path}",
              file=sys.stderr)
        try:
            encoder, pre = load_image_encoder(path, random_init=random_init, seed=args.random_init_seed)
        except FileNotFoundError as exn:
            raise ProbeError(f"cannot load encoder '{name}' from {path}: {exn}") from exn
        if not pre or pre.get("image_size") is None:
            raise ProbeError(f"export of encoder '{name}' ({path}) has no preprocess image_size: {pre!r}")
        from mlip_ds.data.transforms import CLIP_MEAN, CLIP_STD
        transform = eval_transform(int(pre["image_size"]), tuple(pre.get("mean") or CLIP_MEAN),
                                   tuple(pre.get("std") or CLIP_STD))
        try:
            train_ds = _open_data(args.train_data, transform, labels, args, args.train_split, None)
            test_ds = _open_data(args.test_data, transform,
                                 train_ds.label_names if train_ds.class_names is None else None,
                                 args, args.test_split, train_ds.class_names)
        except (DataPathError, ValueError) as exn:
            raise ProbeError(str(exn)) from exn
        if test_ds.task != train_ds.task or list(test_ds.label_names) != list(train_ds.label_names):
            raise ProbeError(f"train and test data disagree: train {train_ds.task} {train_ds.label_names}, "
                             f"test {test_ds.task} {test_ds.label_names}")
        kw = dict(batch_size=args.batch_size, num_workers=args.workers, device=device, progress=not args.no_progress,
                  return_info=True)
        Xtr, Ytr, itr = extract_features(encoder, train_ds, desc=f"{name} train", **kw)
        Xte, Yte, ite = extract_features(encoder, test_ds, desc=f"{name} test", **kw)
        if args.save_features:
            os.makedirs(args.out, exist_ok=True)
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
            np.savez_compressed(os.path.join(args.out, f"features_{safe}.npz"), train_features=Xtr,
                                train_labels=Ytr, test_features=Xte, test_labels=Yte,
                                label_names=np.array(train_ds.label_names))
        res = run_probe(Xtr, Ytr, Xte, Yte, train_ds.label_names, fractions=fractions, seeds=seeds,
                        task=train_ds.task, class_names=train_ds.class_names, C=C, progress=not args.no_progress,
                        head=args.head)
        res["encoder"] = {"export_dir": path, "random_init": random_init,
                          "random_init_seed": args.random_init_seed if random_init else None,
                          "preprocess": {k: pre[k] for k in ("image_size", "mean", "std") if k in pre},
                          "skipped_train": itr["num_skipped"], "skipped_test": ite["num_skipped"],
                          "skipped_examples": [s._asdict() for s in (itr["skipped"] + ite["skipped"])[:20]]}
        if itr["num_skipped"] or ite["num_skipped"]:
            res["notes"].append(f"skipped corrupt samples: {itr['num_skipped']} train, {ite['num_skipped']} test")
        if getattr(args, "save_classifier", None):
            from mlip_ds.eval.classifier import classifier_dir, save_probe_classifier
            kept = save_probe_classifier(
                classifier_dir(args.save_classifier, name, len(encoders)), args, export_dir=path, encoder=encoder,
                preprocess=pre, Xtr=Xtr, Ytr=Ytr, Xte=Xte, Yte=Yte, label_names=train_ds.label_names,
                task=train_ds.task, class_names=train_ds.class_names, C=C, random_init=random_init)
            res["classifier"] = {k: kept[k] for k in ("path", "thresholds", "notes")}
            print(f"[linear_probe] encoder '{name}': classifier saved to {kept['path']}\n{kept['markdown']}",
                  file=sys.stderr)
        results[name] = res
        del encoder
    info = {"train_data": args.train_data, "test_data": args.test_data, "train_split": args.train_split,
            "test_split": args.test_split, "uncertain": args.uncertain, "missing": args.missing,
            "fractions": fractions, "seeds": seeds, "C": C, "head": args.head, "device": device}
    json_path, md_path, md = write_reports(results, args.out, extra=info, digits=args.digits)
    from mlip_ds.eval.plots import plot_label_efficiency
    plot_label_efficiency(results, os.path.join(args.out, "probe.png"))
    return results, json_path, md_path, md


def main(argv: Sequence[str] | None = None) -> int:
    return eval_main("linear_probe", build_parser, run_cli, argv, also_wrote=["probe.png"])


if __name__ == "__main__":
    sys.exit(main())
