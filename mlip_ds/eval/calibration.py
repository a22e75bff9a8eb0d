"""Calibration, operating points and clinical metrics of a binary classifier's scores.

Shared by the linear probe and fine-tuning (``--save-classifier``) and by ``predict``. Everything
here is plain numpy / scikit-learn / scipy on 1-D arrays of one label:

* :class:`Calibrator` maps a logit to a calibrated probability. ``platt`` is
  ``sklearn.linear_model.LogisticRegression`` on the logit (unpenalised, so a logit that already is
  the true log-odds maps to itself); ``isotonic`` is ``sklearn.isotonic.IsotonicRegression`` on the
  logit (clipped outside the range seen); ``none`` is the sigmoid. Both are stored as JSON (Platt's
  slope and intercept; isotonic's breakpoints), never pickled, and applied without sklearn.
* Operating points: :func:`threshold_at_sensitivity` (the highest threshold whose sensitivity is at
  least the target, i.e. the best specificity at that sensitivity), :func:`threshold_at_specificity`
  (the lowest threshold whose specificity is at least the target) and :func:`threshold_youden`
  (max sensitivity + specificity - 1). The decision rule is always ``probability >= threshold``.
* :func:`binary_metrics`: sensitivity, specificity, PPV and NPV at a threshold (``None`` where a
  denominator is 0), with the confusion counts.
* :func:`bootstrap_auc` : ROC AUC with a percentile bootstrap CI from a stratified paired resample
  (images resampled with their labels, positives and negatives separately, so every resample has
  both classes; pROC's default). :func:`bootstrap_metric_ci` does the same for any metric.
* :func:`reliability` (fixed-width bins: mean predicted vs observed frequency, counts), the
  expected calibration error and the Brier score; :func:`plot_reliability` draws the diagram (PNG).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np

CALIBRATION_METHODS = ("platt", "isotonic", "none")


def _xy(y, s) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64).ravel()
    s = np.asarray(s, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape} vs {s.shape}")
    ok = ~np.isnan(y)
    y, s = y[ok], s[ok]
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0/1 (NaN = masked)")
    return y.astype(np.int64), s


def sigmoid(x):
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def logit(p, eps: float = 1e-12):
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


# ---------------------------------------------------------------------------------------------
# calibration


class Calibrator:
    """logit -> calibrated probability; ``to_dict``/``from_dict`` round-trip through JSON."""

    def __init__(self, method: str = "none", slope: float = 1.0, intercept: float = 0.0,
                 x: Sequence[float] | None = None, y: Sequence[float] | None = None, n: int = 0):
        if method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration must be one of {CALIBRATION_METHODS}, got {method!r}")
        self.method, self.slope, self.intercept, self.n = method, float(slope), float(intercept), int(n)
        self.x = np.asarray(x if x is not None else [], dtype=np.float64)
        self.y = np.asarray(y if y is not None else [], dtype=np.float64)

    @classmethod
    def fit(cls, logits, labels, method: str = "platt") -> "Calibrator":
        """Fit on held-out (validation) logits and 0/1 labels (NaN labels are left out)."""
        y, s = _xy(labels, logits)
        if method == "none":
            return cls("none", n=len(y))
        if len(np.unique(y)) < 2:
            raise ValueError(f"cannot calibrate ({method}) on labels of a single class ({len(y)} samples)")
        if method == "platt":
            from sklearn.linear_model import LogisticRegression
            lr = _unpenalised_logreg()
            lr.fit(s[:, None], y)
            return cls("platt", slope=float(lr.coef_[0, 0]), intercept=float(lr.intercept_[0]), n=len(y))
        from sklearn.isotonic import IsotonicRegression
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(s, y)
        return cls("isotonic", x=iso.X_thresholds_, y=iso.y_thresholds_, n=len(y))

    def __call__(self, logits) -> np.ndarray:
        s = np.asarray(logits, dtype=np.float64)
        if self.method == "platt":
            return sigmoid(self.slope * s + self.intercept)
        if self.method == "isotonic":
            if len(self.x) == 1:
                return np.full_like(s, self.y[0])
            return np.interp(s, self.x, self.y)  # = IsotonicRegression.predict with clip
        return sigmoid(s)

    def to_dict(self) -> dict:
        d = {"method": self.method, "n": self.n}
        if self.method == "platt":
            d.update(slope=self.slope, intercept=self.intercept)
        elif self.method == "isotonic":
            d.update(x=self.x.tolist(), y=self.y.tolist())
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "Calibrator":
        return cls(d.get("method", "none"), slope=d.get("slope", 1.0), intercept=d.get("intercept", 0.0),
                   x=d.get("x"), y=d.get("y"), n=d.get("n", 0))


def _unpenalised_logreg():
    """sklearn >= 1.8 spells "no penalty" C=inf (penalty=None is deprecated there); older ones penalty=None."""
    import sklearn
    from sklearn.linear_model import LogisticRegression
    major, minor = (int(x) for x in sklearn.__version__.split(".")[:2])
    if (major, minor) >= (1, 8):
        return LogisticRegression(C=np.inf, max_iter=1000)
    return LogisticRegression(penalty=None, max_iter=1000)


# ---------------------------------------------------------------------------------------------
# operating points


def threshold_at_sensitivity(labels, probs, target: float) -> float:
    """Highest threshold t with sensitivity(p >= t) >= target: t = the k-th highest positive score,
    k = ceil(target x positives)."""
    y, p = _xy(labels, probs)
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    pos = np.sort(p[y == 1])[::-1]
    if len(pos) == 0:
        raise ValueError("no positive sample: sensitivity is undefined")
    k = max(1, math.ceil(target * len(pos) - 1e-9))
    return float(pos[k - 1])


def threshold_at_specificity(labels, probs, target: float) -> float:
    """Lowest threshold t with specificity(p < t) >= target: just above the m-th lowest negative score,
    m = ceil(target x negatives) (half-way to the next higher score seen, or the next float)."""
    y, p = _xy(labels, probs)
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target specificity must be in (0, 1], got {target}")
    neg = np.sort(p[y == 0])
    if len(neg) == 0:
        raise ValueError("no negative sample: specificity is undefined")
    m = max(1, math.ceil(target * len(neg) - 1e-9))
    v = neg[m - 1]
    higher = p[p > v]
    if len(higher):
        t = 0.5 * (v + higher.min())
        if t > v:
            return float(t)
    return float(np.nextafter(v, np.inf))


def threshold_youden(labels, probs) -> float:
    """Threshold maximising sensitivity + specificity - 1 (ties: the highest threshold)."""
    from sklearn.metrics import roc_curve
    y, p = _xy(labels, probs)
    fpr, tpr, thr = roc_curve(y, p)
    j = tpr - fpr
    i = int(np.flatnonzero(j == j.max())[0])
    return float(min(thr[i], 1.0)) if np.isfinite(thr[i]) else 1.0


def choose_threshold(labels, probs, target_sensitivity: float | None = None,
                     target_specificity: float | None = None) -> dict:
    """{"value", "rule", "target"}: at the target sensitivity, else specificity, else Youden's J."""
    if target_sensitivity is not None and target_specificity is not None:
        raise ValueError("give a target sensitivity or a target specificity, not both")
    if target_sensitivity is not None:
        return {"value": threshold_at_sensitivity(labels, probs, target_sensitivity), "rule": "sensitivity",
                "target": float(target_sensitivity)}
    if target_specificity is not None:
        return {"value": threshold_at_specificity(labels, probs, target_specificity), "rule": "specificity",
                "target": float(target_specificity)}
    return {"value": threshold_youden(labels, probs), "rule": "youden", "target": None}


def _ratio(a: int, b: int):
    return float(a) / b if b else None


def binary_metrics(labels, probs, threshold: float) -> dict:
    """Sensitivity, specificity, PPV, NPV (None when undefined) and the counts at ``p >= threshold``."""
    y, p = _xy(labels, probs)
    pred = p >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    tn = int(np.sum(~pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    return {"threshold": float(threshold), "sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
            "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


# ---------------------------------------------------------------------------------------------
# AUC and bootstrap CIs


def auc(labels, scores) -> float:
    """ROC AUC (Mann-Whitney U, ties count one half)."""
    from scipy.stats import rankdata
    y, s = _xy(labels, scores)
    n1, n0 = int(y.sum()), int(len(y) - y.sum())
    if n1 == 0 or n0 == 0:
        raise ValueError("AUC needs both classes")
    r = rankdata(s)
    return float((r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _auc_rows(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUC of each row pair (pos (B, n1), neg (B, n0)), vectorised through ranks."""
    from scipy.stats import rankdata
    n1, n0 = pos.shape[1], neg.shape[1]
    r = rankdata(np.concatenate([pos, neg], 1), axis=1)
    return (r[:, :n1].sum(1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def bootstrap_auc(labels, scores, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """{"auc", "ci_low", "ci_high", "n_resamples", "confidence", "n_pos", "n_neg"}: percentile CI of
    a stratified paired bootstrap."""
    y, s = _xy(labels, scores)
    point = auc(y, s)
    pos, neg = s[y == 1], s[y == 0]
    rng = np.random.default_rng(seed)
    out = []
    chunk = max(1, int(2e6 // len(s)))
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        out.append(_auc_rows(pos[rng.integers(0, len(pos), (b, len(pos)))],
                             neg[rng.integers(0, len(neg), (b, len(neg)))]))
    boot = np.concatenate(out)
    a = (1 - confidence) / 2
    return {"auc": point, "ci_low": float(np.quantile(boot, a)), "ci_high": float(np.quantile(boot, 1 - a)),
            "n_resamples": int(n_resamples), "confidence": confidence, "n_pos": int(len(pos)),
            "n_neg": int(len(neg))}


def bootstrap_metric_ci(labels, scores, metric: Callable[[np.ndarray, np.ndarray], float | None],
                        n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> tuple:
    """(low, high) percentile CI of ``metric(y, s)`` under the same stratified resample; resamples
    where the metric is undefined (None) are left out; (None, None) when none is defined."""
    y, s = _xy(labels, scores)
    ip, ineg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_resamples):
        idx = np.concatenate([rng.choice(ip, len(ip)) if len(ip) else ip, rng.choice(ineg, len(ineg)) if len(ineg)
                              else ineg])
        v = metric(y[idx], s[idx])
        if v is not None:
            vals.append(v)
    if not vals:
        return None, None
    a = (1 - confidence) / 2
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))


# ---------------------------------------------------------------------------------------------
# reliability


def reliability(labels, probs, n_bins: int = 10) -> dict:
    """Fixed-width bins over [0, 1]: per bin the mean predicted probability, the observed frequency
    of positives and the count (empty bins: None); the ECE (count-weighted |observed - predicted|)
    and the Brier score."""
    y, p = _xy(labels, probs)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    b = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    mean_pred, frac_pos, counts = [], [], []
    ece = 0.0
    for i in range(n_bins):
        m = b == i
        c = int(m.sum())
        counts.append(c)
        if c:
            mp, fp = float(p[m].mean()), float(y[m].mean())
            ece += c / len(y) * abs(fp - mp)
        else:
            mp = fp = None
        mean_pred.append(mp)
        frac_pos.append(fp)
    return {"edges": edges.tolist(), "mean_predicted": mean_pred, "fraction_positive": frac_pos, "counts": counts,
            "ece": float(ece), "brier": float(np.mean((p - y) ** 2)), "n": int(len(y))}


def plot_reliability(curves: Mapping[str, Mapping[str, dict]], path: str, title: str | None = None) -> str:
    """One panel per label; ``curves[label][name] = reliability(...)`` (e.g. "uncalibrated",
    "calibrated"). Bars under each panel: sample counts per bin. Writes a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(curves)
    n = max(1, len(labels))
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    for ax, label in zip(axes.ravel(), labels):
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect")
        for (name, r), marker in zip(curves[label].items(), "os^v"):
            xs = [m for m, f in zip(r["mean_predicted"], r["fraction_positive"]) if m is not None]
            ys = [f for m, f in zip(r["mean_predicted"], r["fraction_positive"]) if m is not None]
            ax.plot(xs, ys, marker=marker, ms=4, label=f"{name} (ECE {r['ece']:.3f})")
        first = next(iter(curves[label].values()))
        centers = 0.5 * (np.asarray(first["edges"][:-1]) + np.asarray(first["edges"][1:]))
        tw = ax.twinx()
        tw.bar(centers, first["counts"], width=0.9 / len(first["counts"]), alpha=0.15, color="k")
        tw.set_yticks([])
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("predicted probability")
        ax.set_ylabel("observed frequency")
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
