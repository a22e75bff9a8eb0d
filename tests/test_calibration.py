"""mlip_ds.eval.calibration: the mathematics on inputs whose answers are known."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mlip_ds.eval import calibration as C


def calibrated_sample(n, seed=0):
    """p ~ U(0.02, 0.98), y ~ Bernoulli(p): p is calibrated by construction; logits = logit(p)."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.02, 0.98, n)
    y = (rng.random(n) < p).astype(np.float64)
    return C.logit(p), p, y


def test_platt_keeps_a_calibrated_input_calibrated():
    s, p, y = calibrated_sample(20000)
    cal = C.Calibrator.fit(s, y, "platt")
    assert cal.slope == pytest.approx(1.0, abs=0.06) and cal.intercept == pytest.approx(0.0, abs=0.05)
    assert np.max(np.abs(cal(s) - p)) < 0.03
    # ...and fixes a miscalibrated one: logits scaled x3 and shifted (over-confident)
    cal2 = C.Calibrator.fit(3 * s + 1, y, "platt")
    assert cal2.slope == pytest.approx(1 / 3, abs=0.03)
    s_new, p_new, y_new = calibrated_sample(20000, seed=1)
    assert C.reliability(y_new, cal2(3 * s_new + 1))["ece"] < 0.02
    assert C.reliability(y_new, C.sigmoid(3 * s_new + 1))["ece"] > 0.1


def test_isotonic_calibrates_and_is_monotone():
    s, p, y = calibrated_sample(20000)
    cal = C.Calibrator.fit(s ** 3, y, "isotonic")  # a monotone distortion of the logit
    s_new, p_new, y_new = calibrated_sample(20000, seed=2)
    q = cal(s_new ** 3)
    assert C.reliability(y_new, q)["ece"] < 0.03
    order = np.argsort(s_new)
    assert np.all(np.diff(q[order]) >= -1e-12)
    assert q.min() >= 0 and q.max() <= 1
    # same numbers as sklearn's predict (clip outside the range seen)
    from sklearn.isotonic import IsotonicRegression
    iso = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(s ** 3, y)
    x = np.linspace(-300, 300, 101)
    np.testing.assert_allclose(cal(x), iso.predict(x), atol=1e-12)


def test_calibrator_json_round_trip_and_errors():
    s, _, y = calibrated_sample(500)
    for method in C.CALIBRATION_METHODS:
        cal = C.Calibrator.fit(s, y, method)
        back = C.Calibrator.from_dict(json.loads(json.dumps(cal.to_dict())))
        np.testing.assert_allclose(back(s), cal(s))
    np.testing.assert_allclose(C.Calibrator("none")(s), C.sigmoid(s))
    with pytest.raises(ValueError, match="single class"):
        C.Calibrator.fit(s, np.zeros_like(s), "platt")
    with pytest.raises(ValueError, match="calibration must be"):
        C.Calibrator("temperature")
    # NaN labels (masked) are left out
    y2 = y.copy()
    y2[:10] = np.nan
    assert C.Calibrator.fit(s, y2, "platt").n == len(s) - 10


def test_thresholds_hit_targets_on_a_known_set():
    # 10 positives scored 0.1..1.0, 10 negatives 0.05..0.95
    pos = np.arange(1, 11) / 10
    neg = np.arange(1, 20, 2) / 20
    y = np.r_[np.ones(10), np.zeros(10)]
    p = np.r_[pos, neg]
    t = C.threshold_at_sensitivity(y, p, 0.9)
    assert t == pytest.approx(0.2)  # 9 of 10 positives >= 0.2, the highest such threshold
    m = C.binary_metrics(y, p, t)
    assert m["sensitivity"] == 0.9 and m["tp"] == 9 and m["fn"] == 1
    assert m["specificity"] == pytest.approx(0.2)  # negatives below 0.2: 0.05, 0.15
    assert C.binary_metrics(y, p, np.nextafter(t, 1))["sensitivity"] < 0.9  # any higher misses the target
    t2 = C.threshold_at_specificity(y, p, 0.8)
    m2 = C.binary_metrics(y, p, t2)
    assert m2["specificity"] == pytest.approx(0.8) and m2["tn"] == 8
    assert 0.75 < t2 <= 0.8  # just above the 8th negative (0.75), below the next score (0.8)
    assert C.binary_metrics(y, p, 0.75)["specificity"] < 0.8
    for target in (0.5, 0.73, 0.95, 1.0):
        rng = np.random.default_rng(int(target * 100))
        yy = (rng.random(300) < 0.4).astype(float)
        pp = np.clip(0.5 * yy + rng.normal(0.25, 0.2, 300), 0, 1)
        assert C.binary_metrics(yy, pp, C.threshold_at_sensitivity(yy, pp, target))["sensitivity"] >= target
        assert C.binary_metrics(yy, pp, C.threshold_at_specificity(yy, pp, target))["specificity"] >= target
    ch = C.choose_threshold(y, p, target_sensitivity=0.9)
    assert ch == {"value": pytest.approx(0.2), "rule": "sensitivity", "target": 0.9}
    assert C.choose_threshold(y, p)["rule"] == "youden"
    with pytest.raises(ValueError, match="not both"):
        C.choose_threshold(y, p, 0.9, 0.9)


def test_metrics_known_values_and_undefined():
    y = np.array([1, 1, 0, 0, 0])
    p = np.array([0.9, 0.4, 0.6, 0.2, 0.1])
    m = C.binary_metrics(y, p, 0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (1, 1, 1, 2)
    assert m["sensitivity"] == 0.5 and m["specificity"] == pytest.approx(2 / 3)
    assert m["ppv"] == 0.5 and m["npv"] == pytest.approx(2 / 3)
    assert C.binary_metrics(y, p, 2.0)["ppv"] is None  # nothing called positive
    assert C.auc(y, p) == pytest.approx(5 / 6)  # 5 of 6 (pos, neg) pairs ordered
    assert C.auc([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]) == 0.5  # ties count one half
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    yy, ss = rng.integers(0, 2, 200), rng.normal(size=200).round(1)
    assert C.auc(yy, ss) == pytest.approx(roc_auc_score(yy, ss))


def test_bootstrap_ci_contains_point_and_shrinks_with_n():
    def data(n, seed):
        rng = np.random.default_rng(seed)
        y = (rng.random(n) < 0.3).astype(float)
        return y, y * 1.0 + rng.normal(size=n)

    widths = []
    for n in (100, 400, 3200):
        y, s = data(n, n)
        r = C.bootstrap_auc(y, s, n_resamples=500, seed=0)
        assert r["ci_low"] <= r["auc"] <= r["ci_high"]
        assert r["n_pos"] + r["n_neg"] == n
        widths.append(r["ci_high"] - r["ci_low"])
    assert widths[0] > widths[1] > widths[2]
    assert widths[1] / widths[2] == pytest.approx(np.sqrt(8), rel=0.35)  # ~ 1/sqrt(n)
    # the 95% interval covers the true AUC most of the time (binormal: Phi(1/sqrt(2)) = 0.760)
    true_auc, hits = 0.7602, 0
    for seed in range(40):
        y, s = data(300, 1000 + seed)
        r = C.bootstrap_auc(y, s, n_resamples=300, seed=seed)
        hits += r["ci_low"] <= true_auc <= r["ci_high"]
    assert hits >= 33
    # deterministic for a seed
    y, s = data(100, 5)
    assert C.bootstrap_auc(y, s, 200, seed=3) == C.bootstrap_auc(y, s, 200, seed=3)
    lo, hi = C.bootstrap_metric_ci(y, s, lambda a, b: C.binary_metrics(a, b, 0.5)["sensitivity"], 200)
    assert lo <= C.binary_metrics(y, s, 0.5)["sensitivity"] <= hi


def test_reliability_bins_ece_brier_and_plot(tmp_path):
    y = np.array([0, 1, 1, 1, 0, 0])
    p = np.array([0.05, 0.05, 0.95, 0.95, 0.95, 0.5])
    r = C.reliability(y, p, n_bins=10)
    assert r["counts"][0] == 2 and r["counts"][9] == 3 and r["counts"][5] == 1 and sum(r["counts"]) == 6
    assert r["fraction_positive"][0] == 0.5 and r["fraction_positive"][9] == pytest.approx(2 / 3)
    assert r["mean_predicted"][1] is None
    exp_ece = (2 * abs(0.5 - 0.05) + 3 * abs(2 / 3 - 0.95) + 1 * 0.5) / 6
    assert r["ece"] == pytest.approx(exp_ece)
    assert r["brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert C.reliability([0, 1], [0.0, 1.0])["ece"] == 0.0  # 1.0 falls in the last bin
    out = C.plot_reliability({"a": {"uncalibrated": r, "calibrated": r}, "b": {"x": r}}, str(tmp_path / "r.png"),
                             title="t")
    assert open(out, "rb").read(4) == b"\x89PNG"
