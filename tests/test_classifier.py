"""Kept classifiers: linear_probe / finetune --save-classifier write one folder that load_classifier reads."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mlip_ds.eval import calibration as cal
from mlip_ds.eval.classifier import (ClassifierError, fit_probe_head, holdout_split, linear_logits,
                                     load_classifier)

IMG = 16


def make_export(root, seed=123):
    """A real (untrained) tiny export written by mlip_ds.export at the test image size."""
    from mlip_ds.export import export_model
    from mlip_ds.model.towers import build_model, load_model_config
    cfg = load_model_config("tiny")
    cfg["vision_cfg"]["image_size"] = IMG
    cfg["vision_cfg"]["patch_size"] = 8
    cfg["preprocess"]["image_size"] = IMG
    torch.manual_seed(seed)
    export_model(build_model(cfg), cfg, str(root))
    return root


def cxr_like(rng, positive: bool, size=20) -> Image.Image:
    """Noise image; positives have a bright blob in the lower half (learnable from pooled features)."""
    a = rng.normal(90, 25, (size, size))
    if positive:
        a[size // 2:, :] += 90
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L")


def write_tree(root, n_per_class, seed):
    rng = np.random.default_rng(seed)
    for c, pos in (("NORMAL", False), ("PNEUMONIA", True)):
        os.makedirs(root / c, exist_ok=True)
        for i in range(n_per_class):
            cxr_like(rng, pos).save(root / c / f"{c.lower()}_{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("clf")
    make_export(base / "export")
    write_tree(base / "train", 40, 0)
    write_tree(base / "test", 20, 1)
    return base


def test_holdout_split_stratified_and_disjoint():
    Y = np.r_[np.zeros(80), np.ones(20)][:, None]
    tr, va = holdout_split(Y, 0.2, 0, "binary")
    assert len(va) == 20 and len(tr) == 80 and not set(tr) & set(va)
    assert Y[va].sum() == 4  # stratified: 20% of the 20 positives
    assert np.array_equal(va, holdout_split(Y, 0.2, 0, "binary")[1])
    with pytest.raises(ValueError, match="cannot hold out"):
        holdout_split(Y[:2], 0.2, 0, "binary")


def test_folded_probe_head_equals_the_sklearn_pipeline():
    from mlip_ds.eval.linear_probe import _make_model
    rng = np.random.default_rng(0)
    X = rng.normal(3, 2, (120, 6))
    Y = np.stack([(X[:, 0] > 3).astype(float), (X[:, 1] + X[:, 2] > 6).astype(float)], 1)
    Y[:5, 1] = np.nan
    W, b, _ = fit_probe_head(X, Y, "binary", C=1.0)
    m = _make_model(1.0, 0).fit(X, Y[:, 0].astype(int))
    np.testing.assert_allclose(linear_logits(X, W, b)[:, 0], m.decision_function(X), rtol=1e-9, atol=1e-9)
    Wl, bl, _ = fit_probe_head(X, Y, "binary", head="linear")
    assert Wl.shape == (2, 6)
    y3 = np.digitize(X[:, 0], [2, 4])[:, None].astype(float)
    W3, b3, _ = fit_probe_head(X, y3, "multiclass", C=1.0)
    m3 = _make_model(1.0, 0).fit(X, y3[:, 0].astype(int))
    np.testing.assert_allclose(linear_logits(X, W3, b3), m3.decision_function(X), atol=1e-8)


def test_probe_saves_a_loadable_calibrated_classifier(data, tmp_path, capsys):
    from mlip_ds.eval.linear_probe import main
    out = tmp_path / "clf"
    rc = main(["--encoder", f"enc={data / 'export'}", "--train-data", str(data / "train"), "--test-data",
               str(data / "test"), "--fractions", "1.0", "--seeds", "0", "--C", "1.0", "--workers", "0",
               "--device", "cpu", "--out", str(tmp_path / "probe"), "--no-progress", "--save-classifier", str(out),
               "--target-sensitivity", "0.9", "--bootstrap", "300"])
    assert rc == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "classifier saved to" in err and "| PNEUMONIA |" in err
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["format"] == "mlip-ds-classifier" and meta["kind"] == "linear_probe"
    assert meta["label_names"] == ["PNEUMONIA"] and meta["task"] == "binary"
    assert meta["preprocess"]["image_size"] == IMG and len(meta["preprocess"]["mean"]) == 3
    assert meta["calibration"]["PNEUMONIA"]["method"] == "platt"
    assert meta["thresholds"]["PNEUMONIA"]["rule"] == "sensitivity"
    assert meta["info"]["n_train"] == 64 and meta["info"]["n_calibration"] == 16
    for f in ("encoder/config.json", "encoder/image_encoder.safetensors", "head.safetensors", "report.json",
              "reliability.png"):
        assert (out / f).is_file(), f
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "report.json").read_text())
    # the threshold reaches the target sensitivity on the calibration split it was chosen on
    assert report["validation"]["PNEUMONIA"]["metrics"]["sensitivity"] >= 0.9
    t = report["test"]["PNEUMONIA"]
    assert t["auc"]["ci_low"] <= t["auc"]["auc"] <= t["auc"]["ci_high"] and t["auc"]["auc"] > 0.8
    assert set(t["metrics"]) >= {"sensitivity", "specificity", "ppv", "npv", "sensitivity_ci"}
    probe = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert probe["encoders"]["enc"]["classifier"]["path"] == str(out)

    clf = load_classifier(str(out))
    # encoder weights: exactly the export's image tower
    from safetensors.torch import load_file
    exported = load_file(str(data / "export" / "image_encoder.safetensors"))
    state = clf.encoder.state_dict()
    for k, v in exported.items():
        key = "proj" if k == "proj" else f"visual.{k}"
        assert torch.equal(state[key], v), k
    # the loaded classifier reproduces the report's test probabilities and decisions
    from mlip_ds.eval.datasets import FolderLabelledDataset
    ds = FolderLabelledDataset(str(data / "test"), transform=clf.transform)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    probs = clf.probabilities(clf.logits(x))
    assert probs.shape == (40, 1) and 0 <= probs.min() and probs.max() <= 1
    m = cal.binary_metrics(ds.labels[:, 0], probs[:, 0], clf.thresholds["PNEUMONIA"])
    assert m["sensitivity"] == pytest.approx(t["metrics"]["sensitivity"])
    assert m["specificity"] == pytest.approx(t["metrics"]["specificity"])
    assert np.array_equal(clf.decide(probs)[:, 0], (probs[:, 0] >= clf.thresholds["PNEUMONIA"]).astype(int))


def test_finetune_saves_the_finetuned_encoder(data, tmp_path, capsys):
    from mlip_ds.eval.finetune import main
    out = tmp_path / "ft"
    rc = main(["--encoder", f"enc={data / 'export'}", "--train-data", str(data / "train"), "--test-data",
               str(data / "test"), "--fractions", "1.0", "--seeds", "0", "--min-steps", "3", "--max-steps", "3",
               "--epochs", "1", "--batch-size", "16", "--workers", "0", "--device", "cpu", "--no-plots",
               "--no-progress", "--out", str(tmp_path / "ftout"), "--save-classifier", str(out),
               "--calibration", "isotonic", "--target-specificity", "0.8", "--bootstrap", "200"])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["kind"] == "finetune" and meta["calibration"]["PNEUMONIA"]["method"] == "isotonic"
    assert meta["thresholds"]["PNEUMONIA"]["rule"] == "specificity"
    report = json.loads((out / "report.json").read_text())
    assert report["validation"]["PNEUMONIA"]["metrics"]["specificity"] >= 0.8
    clf = load_classifier(str(out))
    from safetensors.torch import load_file
    exported = load_file(str(data / "export" / "image_encoder.safetensors"))
    state = clf.encoder.state_dict()
    assert any(not torch.equal(state[f"visual.{k}"], v) for k, v in exported.items() if k != "proj")


def test_load_errors_name_the_problem(data, tmp_path):
    with pytest.raises(ClassifierError, match="no classifier.json"):
        load_classifier(str(tmp_path))
    from mlip_ds.eval.linear_probe import main
    out = tmp_path / "c"
    assert main(["--encoder", str(data / "export"), "--train-data", str(data / "train"), "--test-data",
                 str(data / "test"), "--fractions", "1.0", "--seeds", "0", "--C", "1.0", "--workers", "0",
                 "--out", str(tmp_path / "p"), "--no-progress", "--save-classifier", str(out),
                 "--bootstrap", "50"]) == 0
    w = out / "encoder" / "image_encoder.safetensors"
    blob = bytearray(w.read_bytes())
    blob[-1] ^= 1
    w.write_bytes(bytes(blob))
    with pytest.raises(ClassifierError, match="sha256"):
        load_classifier(str(out))
    assert main(["--encoder", str(data / "export"), "--train-data", str(data / "train"), "--test-data",
                 str(data / "test"), "--save-classifier", str(out), "--calibration-fraction", "1.5"]) == 2
