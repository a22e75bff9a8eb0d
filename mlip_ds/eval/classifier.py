"""A kept classifier: image encoder + linear head + calibration + thresholds, in one folder.

Written by ``linear_probe --save-classifier DIR`` and ``finetune --save-classifier DIR``; read by
``mlip_ds.eval.predict`` (:func:`load_classifier`). Layout::

    DIR/classifier.json              what this is (below); the only file a reader needs to open first
    DIR/encoder/config.json          the export's config.json (architecture + preprocessing), unchanged
    DIR/encoder/image_encoder.safetensors   the image encoder's weights (the export's for a probe,
                                      the fine-tuned ones for fine-tuning): ImageEncoder.state_dict()
    DIR/head.safetensors             "weight" (outputs, D) and "bias" (outputs,) on the encoder's
                                      features; a probe's StandardScaler is folded in
    DIR/report.json                  validation/test metrics (AUC with bootstrap CIs; sensitivity,
                                      specificity, PPV, NPV at the thresholds; reliability bins)
    DIR/reliability.png              reliability diagram on the test set, before and after calibration

``classifier.json``: ``format`` ("mlip-ds-classifier"), ``version``, ``kind`` (linear_probe /
finetune), ``task`` (binary: one sigmoid output per label; multiclass: softmax over
``class_names``), ``label_names``, ``class_names``, ``preprocess`` (image_size, mean, std; grayscale
repeated to 3 channels, resize short side + centre crop), ``encoder`` (files, sha256, source
export, embedding flag), ``head``, ``calibration`` (per label: :class:`Calibrator` as JSON),
``thresholds`` (per label: value, rule, target; decision = calibrated probability >= value),
``validation`` (how the calibration split was drawn) and ``summary`` (test AUC and CI per label).

Protocol of ``--save-classifier``: ``--calibration-fraction`` (default 0.2) of the *training*
labels is held out (stratified by class for single-label tasks, seeded); the head is trained on
the rest (probe: the probe's logistic regression at 100% with C from CV on that part; fine-tune:
one run with the first seed); the calibrator is fitted on the held-out part's logits and the
thresholds are chosen on its calibrated probabilities (``--target-sensitivity`` or
``--target-specificity``, else Youden's J). The test set is used only for the report.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mlip_ds.checkpoint import replace_dir
from mlip_ds.eval import calibration as cal

CLASSIFIER_FORMAT = "mlip-ds-classifier"
CLASSIFIER_VERSION = 1


class ClassifierError(RuntimeError):
    """A classifier folder that cannot be written or read (message names the path)."""


# ---------------------------------------------------------------------------------------------
# CLI options shared by the probe and fine-tuning


def add_classifier_args(p) -> None:
    g = p.add_argument_group("kept classifier (--save-classifier)")
    g.add_argument("--save-classifier", default=None, metavar="DIR",
                   help="also train one head on the training data minus a calibration split and save encoder + "
                        "head + calibration + thresholds as one classifier folder (read by mlip_ds.eval.predict); "
                        "with several encoders, one sub-folder per encoder")
    g.add_argument("--calibration", default="platt", choices=list(cal.CALIBRATION_METHODS),
                   help="platt (logistic regression on the logit, default), isotonic, or none")
    g.add_argument("--calibration-fraction", type=float, default=0.2,
                   help="fraction of the training labels held out to calibrate and pick thresholds (default 0.2)")
    t = g.add_mutually_exclusive_group()
    t.add_argument("--target-sensitivity", type=float, default=None,
                   help="operating point: the highest threshold with at least this sensitivity on the calibration split")
    t.add_argument("--target-specificity", type=float, default=None,
                   help="operating point: the lowest threshold with at least this specificity on the calibration split")
    g.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the AUC CIs (default 2000)")
    g.add_argument("--classifier-seed", type=int, default=0, help="seed of the calibration split and the bootstrap")


def check_classifier_args(args, error_cls) -> None:
    if getattr(args, "save_classifier", None) is None:
        return
    if not 0.0 < args.calibration_fraction < 1.0:
        raise error_cls(f"--calibration-fraction must be in (0, 1), got {args.calibration_fraction}")
    for name in ("target_sensitivity", "target_specificity"):
        v = getattr(args, name)
        if v is not None and not 0.0 < v <= 1.0:
            raise error_cls(f"--{name.replace('_', '-')} must be in (0, 1], got {v}")


def classifier_dir(base: str, encoder_name: str, n_encoders: int) -> str:
    if n_encoders == 1:
        return base
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in encoder_name)
    return os.path.join(base, safe)


# ---------------------------------------------------------------------------------------------
# the calibration split and the probe's head


def holdout_split(Y: np.ndarray, fraction: float, seed: int, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, calibration indices). Single-label (one column): stratified by class;
    multi-label: a seeded random split."""
    from sklearn.model_selection import train_test_split

    Y = np.asarray(Y)
    if Y.ndim == 1:
        Y = Y[:, None]
    idx = np.arange(len(Y))
    n_val = int(round(fraction * len(Y)))
    if n_val < 1 or n_val >= len(Y):
        raise ValueError(f"cannot hold out {fraction:g} of {len(Y)} training samples for calibration")
    strat = None
    if Y.shape[1] == 1 and not np.isnan(Y[:, 0]).any():
        _, counts = np.unique(Y[:, 0], return_counts=True)
        if counts.min() >= 2 and n_val >= len(counts) and len(Y) - n_val >= len(counts):
            strat = Y[:, 0]
    tr, va = train_test_split(idx, test_size=n_val, random_state=seed, stratify=strat)
    return np.sort(tr), np.sort(va)


def fit_probe_head(X: np.ndarray, Y: np.ndarray, task: str, C="cv", seed: int = 0,
                   head: str = "logreg") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The probe's model(s) fitted on (X, Y), folded into one linear layer on the raw features:
    (weight (outputs, D), bias (outputs,), notes). Binary: one row per label (its non-masked
    samples); multiclass: one row per class."""
    from sklearn.exceptions import ConvergenceWarning

    from mlip_ds.eval.linear_probe import _make_model, _select_C

    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    notes: list[str] = []

    def one(Xs, ys):
        if head == "linear":
            from mlip_ds.eval.linear_head import LinearLayerHead
            m = LinearLayerHead(seed=seed).fit(Xs, ys)
            w = m.layer_.weight.detach().double().numpy()
            b = m.layer_.bias.detach().double().numpy()
            mean, scale = m.mean_.astype(np.float64), m.std_.astype(np.float64)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                c_used, note = _select_C(Xs, ys, task, seed) if C == "cv" else (float(C), None)
                if note:
                    notes.append(note)
                m = _make_model(c_used, seed).fit(Xs, ys)
            sc, lr = m[0], m[1]
            w, b = lr.coef_.astype(np.float64), lr.intercept_.astype(np.float64)
            mean, scale = sc.mean_, sc.scale_
        return w / scale, b - (w * (mean / scale)).sum(1)

    if task == "multiclass":
        y = Y[:, 0].astype(np.int64)
        W, b = one(X, y)
        if W.shape[0] == 1:  # two classes seen: sklearn's single row is class 1 vs class 0
            W, b = np.concatenate([np.zeros_like(W), W]), np.concatenate([[0.0], b])
        return W, b, notes
    rows_w, rows_b = [], []
    for j in range(Y.shape[1]):
        ok = ~np.isnan(Y[:, j])
        yj = Y[ok, j].astype(np.int64)
        if len(np.unique(yj)) < 2:
            notes.append(f"label {j}: one class in the training part, constant head")
            rows_w.append(np.zeros(X.shape[1]))
            rows_b.append(10.0 if (len(yj) and yj[0] == 1) else -10.0)
            continue
        w, bj = one(X[ok], yj)
        rows_w.append(w[0])
        rows_b.append(float(bj[0]))
    return np.stack(rows_w), np.asarray(rows_b), notes


def linear_logits(X: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray(X, dtype=np.float64) @ np.asarray(W, dtype=np.float64).T + np.asarray(b, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# calibration, thresholds and the report


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def calibrate_and_report(val_logits: np.ndarray, Yval: np.ndarray, test_logits: np.ndarray | None,
                         Yte: np.ndarray | None, label_names: Sequence[str], task: str = "binary",
                         class_names: Sequence[str] | None = None, method: str = "platt",
                         target_sensitivity: float | None = None, target_specificity: float | None = None,
                         n_bootstrap: int = 2000, seed: int = 0, plot_path: str | None = None) -> dict:
    """Fit per-label calibrators and thresholds on the calibration split; report on the test set.

    Returns ``{"calibration", "thresholds", "report", "notes"}`` (all JSON-ready).
    """
    notes: list[str] = []
    calib, thresholds = {}, {}
    report: dict = {"calibration_method": method, "validation": {}, "test": {}, "n_validation": int(len(val_logits)),
                    "n_test": int(len(test_logits)) if test_logits is not None else 0}
    curves: dict = {}
    if task == "multiclass":
        names = list(class_names or [])
        notes.append("multi-class head: softmax probabilities, no calibration, decision = the most probable class")
        if test_logits is not None and Yte is not None:
            pt = _softmax(test_logits)
            t = Yte[:, 0].astype(np.int64)
            report["test"]["accuracy"] = float((pt.argmax(1) == t).mean())
            per = {}
            for k, name in enumerate(names):
                yk = (t == k).astype(float)
                if 0 < yk.sum() < len(yk):
                    per[name] = {"auc_ovr": cal.bootstrap_auc(yk, pt[:, k], n_bootstrap, seed=seed)}
            report["test"]["per_class"] = per
        return {"calibration": {}, "thresholds": {}, "report": report, "notes": notes}

    for j, name in enumerate(label_names):
        sv, yv = val_logits[:, j], Yval[:, j]
        ok = ~np.isnan(yv)
        try:
            c = cal.Calibrator.fit(sv[ok], yv[ok], method)
        except ValueError as exn:
            c = cal.Calibrator("none", n=int(ok.sum()))
            notes.append(f"{name}: not calibrated ({exn}); sigmoid of the logit")
        calib[name] = c.to_dict()
        pv = c(sv)
        try:
            thr = cal.choose_threshold(yv[ok], pv[ok], target_sensitivity, target_specificity)
        except ValueError as exn:
            thr = {"value": 0.5, "rule": "default", "target": None}
            notes.append(f"{name}: threshold 0.5 ({exn})")
        thresholds[name] = thr
        vrep = {"metrics": cal.binary_metrics(yv[ok], pv[ok], thr["value"]) if ok.any() else None}
        if ok.any() and 0 < np.nansum(yv[ok]) < ok.sum():
            vrep["auc"] = cal.auc(yv[ok], pv[ok])
        report["validation"][name] = vrep
        if test_logits is None or Yte is None:
            continue
        st, yt = test_logits[:, j], Yte[:, j]
        okt = ~np.isnan(yt)
        pt = c(st)
        trep: dict = {"n": int(okt.sum()), "positives": int(np.nansum(yt[okt]))}
        if 0 < trep["positives"] < trep["n"]:
            trep["auc"] = cal.bootstrap_auc(yt[okt], pt[okt], n_bootstrap, seed=seed)
            trep["auc_uncalibrated"] = cal.auc(yt[okt], st[okt])
            m = cal.binary_metrics(yt[okt], pt[okt], thr["value"])
            for key in ("sensitivity", "specificity", "ppv", "npv"):
                lo, hi = cal.bootstrap_metric_ci(
                    yt[okt], pt[okt], lambda a, b, key=key: cal.binary_metrics(a, b, thr["value"])[key],
                    n_resamples=min(n_bootstrap, 500), seed=seed)
                m[f"{key}_ci"] = [lo, hi]
            trep["metrics"] = m
        else:
            notes.append(f"{name}: the test labels hold one class; no AUC")
        if okt.any():
            trep["reliability_uncalibrated"] = cal.reliability(yt[okt], cal.sigmoid(st[okt]))
            trep["reliability"] = cal.reliability(yt[okt], pt[okt])
            curves[name] = {"uncalibrated": trep["reliability_uncalibrated"], f"calibrated ({method})": trep["reliability"]}
        report["test"][name] = trep
    if plot_path and curves:
        cal.plot_reliability(curves, plot_path, title="Reliability on the test set")
    return {"calibration": calib, "thresholds": thresholds, "report": report, "notes": notes}


def format_report(report: dict, thresholds: dict, digits: int = 3) -> str:
    """Markdown table: per label test AUC [95% CI], threshold (rule) and sens/spec/PPV/NPV."""
    f = lambda v: "n/a" if v is None else f"{v:.{digits}f}"  # noqa: E731
    lines = ["| label | test AUC [95% CI] | threshold (rule) | sensitivity | specificity | PPV | NPV | ECE before → after |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, t in report.get("test", {}).items():
        if name in ("accuracy", "per_class"):
            continue
        a = t.get("auc")
        m = t.get("metrics") or {}
        thr = thresholds.get(name, {})
        rule = thr.get("rule", "")
        if thr.get("target") is not None:
            rule += f" {thr['target']:g}"
        auc_s = f"{f(a['auc'])} [{f(a['ci_low'])}, {f(a['ci_high'])}]" if a else "n/a"
        ece = (f"{f(t['reliability_uncalibrated']['ece'])} → {f(t['reliability']['ece'])}"
               if "reliability" in t else "n/a")
        lines.append(f"| {name} | {auc_s} | {f(thr.get('value'))} ({rule}) | {f(m.get('sensitivity'))} | "
                     f"{f(m.get('specificity'))} | {f(m.get('ppv'))} | {f(m.get('npv'))} | {ece} |")
    if "accuracy" in report.get("test", {}):
        lines.append(f"\nmulti-class test accuracy: {f(report['test']['accuracy'])}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# writing and reading the folder


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_classifier(out_dir: str, *, export_dir: str, encoder: torch.nn.Module, weight, bias,
                    label_names: Sequence[str], task: str, class_names: Sequence[str] | None, preprocess: dict,
                    calibrated: dict, kind: str, info: dict | None = None, plot_file: str | None = None,
                    embedding: bool = False) -> Path:
    """Write the classifier folder atomically (temp folder renamed into place); returns its path."""
    from safetensors.torch import save_file

    from mlip_ds.data.transforms import CLIP_MEAN, CLIP_STD

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    src_cfg = Path(export_dir) / "config.json"
    if not src_cfg.is_file():
        raise ClassifierError(f"export {export_dir} has no config.json")
    tmp = Path(tempfile.mkdtemp(prefix=".classifier-", dir=out.parent))
    try:
        (tmp / "encoder").mkdir()
        shutil.copy2(src_cfg, tmp / "encoder" / "config.json")
        state = {k: v.detach().cpu().contiguous().clone() for k, v in encoder.state_dict().items()}
        save_file(state, str(tmp / "encoder" / "image_encoder.safetensors"))
        W = torch.as_tensor(np.asarray(weight), dtype=torch.float32).contiguous()
        B = torch.as_tensor(np.asarray(bias), dtype=torch.float32).contiguous()
        save_file({"weight": W, "bias": B}, str(tmp / "head.safetensors"))
        if plot_file and os.path.isfile(plot_file):
            shutil.copy2(plot_file, tmp / "reliability.png")
        report = calibrated["report"]
        (tmp / "report.json").write_text(json.dumps(_clean(report), indent=2))
        summary = {}
        for name, t in report.get("test", {}).items():
            if isinstance(t, dict) and t.get("auc"):
                summary[name] = {k: t["auc"][k] for k in ("auc", "ci_low", "ci_high")}
        meta = {
            "format": CLASSIFIER_FORMAT, "version": CLASSIFIER_VERSION, "kind": kind, "task": task,
            "label_names": list(label_names), "class_names": list(class_names) if class_names else None,
            "outputs": int(W.shape[0]),
            "preprocess": {"image_size": int(preprocess["image_size"]),
                           "mean": list(preprocess.get("mean") or CLIP_MEAN),
                           "std": list(preprocess.get("std") or CLIP_STD),
                           "grayscale": "repeated to 3 channels", "resize": "short side, then centre crop"},
            "encoder": {"config": "encoder/config.json", "weights": "encoder/image_encoder.safetensors",
                        "sha256": _sha256(tmp / "encoder" / "image_encoder.safetensors"),
                        "source_export": os.path.abspath(export_dir), "embedding": bool(embedding),
                        "feature_dim": int(W.shape[1])},
            "head": {"weights": "head.safetensors", "activation": "softmax" if task == "multiclass" else "sigmoid"},
            "calibration": calibrated["calibration"], "thresholds": calibrated["thresholds"],
            "decision": ("argmax over classes" if task == "multiclass"
                         else "calibrated probability >= thresholds[label].value"),
            "summary": summary, "notes": calibrated.get("notes", []), "info": _clean(info or {}),
        }
        (tmp / "classifier.json").write_text(json.dumps(_clean(meta), indent=2))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _clean(o):
    from mlip_ds.eval.common import clean_nan, json_default
    return json.loads(json.dumps(clean_nan(o), default=json_default))


def build_image_encoder(model_config: dict, embedding: bool = False) -> torch.nn.Module:
    """The export's image tower, untrained, wrapped as ``export.ImageEncoder`` (the text tower is not built)."""
    from open_clip.model import _build_vision_tower

    from mlip_ds.export import ImageEncoder

    vision_cfg = dict(model_config["vision_cfg"])
    if vision_cfg.get("timm_model_name"):
        vision_cfg["timm_model_pretrained"] = False  # weights come from the folder, never the hub
    visual = _build_vision_tower(model_config["embed_dim"], vision_cfg, bool(model_config.get("quick_gelu", False)))
    return ImageEncoder(visual, embedding=embedding)


class Classifier:
    """A loaded classifier folder: ``transform`` (PIL -> tensor), ``logits``, ``probabilities``, ``decide``."""

    def __init__(self, path: str, meta: dict, encoder: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor,
                 device="cpu"):
        from mlip_ds.data.transforms import eval_transform

        self.path, self.meta = str(path), meta
        self.task = meta["task"]
        self.label_names = list(meta["label_names"])
        self.class_names = meta.get("class_names")
        self.preprocess = meta["preprocess"]
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device).eval()
        self.head = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)
        self.head.to(self.device).eval()
        self.calibrators = {n: cal.Calibrator.from_dict(d) for n, d in meta.get("calibration", {}).items()}
        self.thresholds = {n: float(d["value"]) for n, d in meta.get("thresholds", {}).items()}
        self.transform = eval_transform(int(self.preprocess["image_size"]), tuple(self.preprocess["mean"]),
                                        tuple(self.preprocess["std"]))

    @property
    def output_names(self) -> list[str]:
        return list(self.class_names) if self.task == "multiclass" else self.label_names

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> np.ndarray:
        from mlip_ds.eval.features import _as_features
        f = _as_features(self.encoder(images.to(self.device)))
        return self.head(f.float()).double().cpu().numpy()

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        if self.task == "multiclass":
            return _softmax(logits)
        out = np.empty_like(logits, dtype=np.float64)
        for j, name in enumerate(self.label_names):
            out[:, j] = self.calibrators.get(name, cal.Calibrator("none"))(logits[:, j])
        return out

    def decide(self, probs: np.ndarray) -> np.ndarray:
        if self.task == "multiclass":
            return probs.argmax(1)
        thr = np.array([self.thresholds.get(n, 0.5) for n in self.label_names])
        return (probs >= thr).astype(np.int64)


def load_classifier(path: str, device="cpu", verify: bool = True) -> Classifier:
    """Read a classifier folder (no network). ``verify`` checks the encoder weights' sha256."""
    from safetensors.torch import load_file

    root = Path(path)
    meta_path = root / "classifier.json"
    if not meta_path.is_file():
        raise ClassifierError(f"'{path}' is not a classifier folder (no classifier.json); "
                              "write one with linear_probe/finetune --save-classifier")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise ClassifierError(f"{meta_path}: format {meta.get('format')!r}, expected {CLASSIFIER_FORMAT!r}")
    if int(meta.get("version", 0)) > CLASSIFIER_VERSION:
        raise ClassifierError(f"{meta_path}: version {meta['version']} is newer than this mlip-ds reads "
                              f"({CLASSIFIER_VERSION})")
    enc = meta["encoder"]
    wpath = root / enc["weights"]
    for p in (root / enc["config"], wpath, root / meta["head"]["weights"]):
        if not p.is_file():
            raise ClassifierError(f"classifier folder {path} is incomplete: {p} is missing")
    if verify and enc.get("sha256") and _sha256(wpath) != enc["sha256"]:
        raise ClassifierError(f"{wpath}: sha256 differs from classifier.json (file changed or corrupt)")
    model_config = json.loads((root / enc["config"]).read_text())["model_config"]
    encoder = build_image_encoder(model_config, embedding=bool(enc.get("embedding", False)))
    state = load_file(str(wpath))
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ClassifierError(f"{wpath} does not match the architecture in {enc['config']}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    head = load_file(str(root / meta["head"]["weights"]))
    return Classifier(str(root), meta, encoder, head["weight"], head["bias"], device=device)


# ---------------------------------------------------------------------------------------------
# the two writers: probe and fine-tuning


def _targets(args) -> dict:
    return dict(method=args.calibration, target_sensitivity=args.target_sensitivity,
                target_specificity=args.target_specificity, n_bootstrap=args.bootstrap, seed=args.classifier_seed)


def save_probe_classifier(out_dir: str, args, *, export_dir: str, encoder: torch.nn.Module, preprocess: dict,
                          Xtr, Ytr, Xte, Yte, label_names, task: str, class_names, C="cv",
                          random_init: bool = False) -> dict:
    """Fit the probe head on the training features minus the calibration split, calibrate, report
    on the test features and write the folder. Returns {"path", "markdown", "summary", "notes"}."""
    tr, va = holdout_split(Ytr, args.calibration_fraction, args.classifier_seed, task)
    W, b, notes = fit_probe_head(Xtr[tr], Ytr[tr], task, C=C, seed=args.classifier_seed, head=args.head)
    plot = os.path.join(tempfile.mkdtemp(prefix="mlip-rel-"), "reliability.png")
    res = calibrate_and_report(linear_logits(Xtr[va], W, b), np.asarray(Ytr)[va], linear_logits(Xte, W, b),
                               np.asarray(Yte), label_names, task, class_names, plot_path=plot, **_targets(args))
    res["notes"] = notes + res["notes"]
    info = {"kind": "linear_probe", "head": args.head, "C": C, "n_train": int(len(tr)), "n_calibration": int(len(va)),
            "n_test": int(len(Xte)), "calibration_fraction": args.calibration_fraction,
            "seed": args.classifier_seed, "random_init": random_init,
            "train_data": getattr(args, "train_data", None), "test_data": getattr(args, "test_data", None)}
    path = save_classifier(out_dir, export_dir=export_dir, encoder=encoder, weight=W, bias=b, label_names=label_names,
                           task=task, class_names=class_names, preprocess=preprocess, calibrated=res,
                           kind="linear_probe", info=info, plot_file=plot)
    shutil.rmtree(os.path.dirname(plot), ignore_errors=True)
    return {"path": str(path), "markdown": format_report(res["report"], res["thresholds"]),
            "thresholds": res["thresholds"], "notes": res["notes"], "info": info}


def save_finetune_classifier(out_dir: str, args, *, export_dir: str, Xtr, Ytr, Xte, Yte, label_names, task: str,
                             class_names, random_init: bool, random_init_seed: int, seed: int, device,
                             train_kw: dict) -> dict:
    """One fine-tuning run (first seed) on the training images minus the calibration split, then
    calibrate, report and write the folder with the fine-tuned encoder."""
    from mlip_ds.eval.finetune import predict, train_one
    from mlip_ds.export import load_image_encoder

    multiclass = task == "multiclass"
    Ynp = Ytr.numpy() if torch.is_tensor(Ytr) else np.asarray(Ytr)
    tr, va = holdout_split(Ynp, args.calibration_fraction, args.classifier_seed, task)
    encoder, pre = load_image_encoder(export_dir, random_init=random_init, seed=random_init_seed)
    num_outputs = len(class_names) if multiclass else len(label_names)
    out = train_one(encoder, pre, Xtr[torch.as_tensor(tr)], Ytr[torch.as_tensor(tr)], multiclass, num_outputs,
                    seed=seed, device=device, progress=not getattr(args, "no_progress", False), **train_kw)
    model = out["model"]
    val_logits = predict(model, Xtr[torch.as_tensor(va)], pre, multiclass, device=device)
    test_logits = predict(model, Xte, pre, multiclass, device=device)
    Yte_np = Yte.numpy() if torch.is_tensor(Yte) else np.asarray(Yte)
    plot = os.path.join(tempfile.mkdtemp(prefix="mlip-rel-"), "reliability.png")
    res = calibrate_and_report(val_logits, Ynp[va], test_logits, Yte_np, label_names, task, class_names,
                               plot_path=plot, **_targets(args))
    info = {"kind": "finetune", "n_train": int(len(tr)), "n_calibration": int(len(va)), "n_test": int(len(Xte)),
            "calibration_fraction": args.calibration_fraction, "seed": seed, "split_seed": args.classifier_seed,
            "random_init": random_init, "steps": out["steps"],
            "train_data": getattr(args, "train_data", None), "test_data": getattr(args, "test_data", None),
            **{k: v for k, v in train_kw.items()}}
    model.cpu()
    path = save_classifier(out_dir, export_dir=export_dir, encoder=model.encoder, weight=model.head.weight.detach(),
                           bias=model.head.bias.detach(), label_names=label_names, task=task, class_names=class_names,
                           preprocess=pre, calibrated=res, kind="finetune", info=info, plot_file=plot)
    shutil.rmtree(os.path.dirname(plot), ignore_errors=True)
    return {"path": str(path), "markdown": format_report(res["report"], res["thresholds"]),
            "thresholds": res["thresholds"], "notes": res["notes"], "info": info}
