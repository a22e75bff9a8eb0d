"""Linear-probe evaluation: probe maths, subsampling, label policies, reports, feature extraction, CLI."""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mlip_ds.data.transforms import eval_transform
from mlip_ds.eval import datasets as D
from mlip_ds.eval.features import extract_features
from mlip_ds.eval.linear_probe import (
    fraction_count,
    format_markdown,
    main,
    parse_encoder_spec,
    run_probe,
    stratified_subsample,
    write_reports,
)

torch.set_num_threads(1)

IMG = 16  # probe image size in these tests


# ---------------------------------------------------------------------------------------------
# helpers


def blobs(n, d=16, n_labels=2, seed=0, noise_only=False):
    """Gaussian features; label j = sign of a fixed projection (separable), or random labels."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    W = np.random.default_rng(123).normal(size=(d, n_labels))
    if noise_only:
        Y = (rng.random((n, n_labels)) < 0.5).astype(np.float32)
    else:
        Y = (X @ W > 0).astype(np.float32)
    return X, Y


class TinyEncoder(torch.nn.Module):
    """(B, 3, H, W) -> (B, 8): pooled grid + fixed linear map."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.pool = torch.nn.AdaptiveAvgPool2d(2)
        self.proj = torch.nn.Linear(12, 8)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(8, 12, generator=g))
            self.proj.bias.zero_()

    def forward(self, x):
        return self.proj(self.pool(x).flatten(1))


def png_bytes(value: int, size=24, fmt="PNG") -> bytes:
    arr = np.full((size, size), value, np.uint8)
    arr[: size // 2] = 255 - value  # a little structure
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format=fmt)
    return buf.getvalue()


def sample_json(key, labels):
    return {"id": key, "sections": {"findings": "", "impression": "no acute disease"}, "entities": [],
            "labels": labels, "meta": {}}


LABELS = ["cardiomegaly", "edema"]


def write_shards(root, n_per_shard=(6, 5), corrupt_keys=(), label_fn=None):
    """Shards following the schema + manifest.json; returns the expected [(key, labels_dict)] in order."""
    import webdataset as wds

    os.makedirs(root, exist_ok=True)
    label_fn = label_fn or (lambda i: {"cardiomegaly": [1, 0, -1][i % 3], "edema": [0, 1][i % 2]})
    expected, shards, i = [], [], 0
    for s, n in enumerate(n_per_shard):
        fname = f"shard-{s:06d}.tar"
        with wds.TarWriter(os.path.join(root, fname)) as w:
            for _ in range(n):
                key = f"s{i:05d}"
                labels = label_fn(i)
                img = b"this is not an image" if key in corrupt_keys else png_bytes(20 * i % 256)
                ext = "jpg" if i % 4 == 3 else "png"
                if ext == "jpg" and key not in corrupt_keys:
                    img = png_bytes(20 * i % 256, fmt="JPEG")
                w.write({"__key__": key, ext: img, "txt": "report", "json": json.dumps(sample_json(key, labels))})
                expected.append((key, labels))
                i += 1
        shards.append({"file": fname, "num_samples": n, "sha256": "x"})
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump({"shards": shards, "label_names": LABELS}, f)
    return expected


def expected_matrix(expected, names, policy="ones", skip=()):
    return np.stack([D.encode_labels(lab, names, policy) for k, lab in expected if k not in skip])


def assert_labels_equal(a, b):
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_array_equal(np.nan_to_num(a, nan=-9), np.nan_to_num(b, nan=-9))


# ---------------------------------------------------------------------------------------------
# the probe itself


def test_probe_separable_blobs_auc():
    Xtr, Ytr = blobs(600, seed=0)
    Xte, Yte = blobs(400, seed=1)
    res = run_probe(Xtr, Ytr, Xte, Yte, ["a", "b"], fractions=[0.1, 1.0], seeds=[0, 1, 2])
    full = res["summary"]["1"]
    tenth = res["summary"]["0.1"]
    assert full["mean_over_labels"]["mean"] > 0.98
    for name in ("a", "b"):
        assert full["per_label"][name]["mean"] > 0.97
        assert full["per_label"][name]["n_seeds"] == 3
    assert tenth["mean_over_labels"]["mean"] > 0.8
    assert len(res["per_seed"]) == 2 * 3 * 2
    assert res["metric"] == "auc" and not res["notes"]


def test_probe_noise_features_is_chance():
    Xtr, Ytr = blobs(600, seed=0, noise_only=True)
    Xte, Yte = blobs(600, seed=1, noise_only=True)
    res = run_probe(Xtr, Ytr, Xte, Yte, ["a", "b"], fractions=[1.0], seeds=[0, 1], C=1.0)
    m = res["summary"]["1"]["mean_over_labels"]["mean"]
    assert abs(m - 0.5) < 0.08, m


def test_linear_layer_head_mgca_protocol():
    """--head linear: the Adam-trained linear layer separates the blobs, is chance on noise, gives
    the same numbers for the same seed, and handles a multi-class task."""
    Xtr, Ytr = blobs(600, seed=0)
    Xte, Yte = blobs(400, seed=1)
    res = run_probe(Xtr, Ytr, Xte, Yte, ["a", "b"], fractions=[0.1, 1.0], seeds=[0, 1], head="linear")
    assert res["summary"]["1"]["mean_over_labels"]["mean"] > 0.97
    again = run_probe(Xtr, Ytr, Xte, Yte, ["a", "b"], fractions=[0.1], seeds=[0], head="linear")
    first = [r["metric"] for r in res["per_seed"] if r["fraction"] == 0.1 and r["seed"] == 0]
    assert first == [r["metric"] for r in again["per_seed"]]
    Ntr, NYtr = blobs(600, seed=0, noise_only=True)
    Nte, NYte = blobs(600, seed=1, noise_only=True)
    m = run_probe(Ntr, NYtr, Nte, NYte, ["a", "b"], fractions=[1.0], seeds=[0], head="linear")
    assert abs(m["summary"]["1"]["mean_over_labels"]["mean"] - 0.5) < 0.08
    from mlip_ds.eval.linear_head import LinearLayerHead
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 4, (3, 8))
    y = rng.integers(0, 3, 300)
    X = centers[y] + rng.normal(0, 1, (300, 8))
    head = LinearLayerHead(seed=0).fit(X[:200], y[:200])
    assert (head.predict(X[200:]) == y[200:]).mean() > 0.9
    assert np.allclose(head.predict_proba(X[200:]).sum(1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="head must be"):
        run_probe(Xtr, Ytr, Xte, Yte, ["a", "b"], fractions=[1.0], seeds=[0], head="svm")


def test_fraction_counts_and_both_classes():
    y = np.zeros(1000, int)
    y[:100] = 1  # 10 % positives
    for f, n, npos in [(0.01, 10, 1), (0.1, 100, 10), (0.5, 500, 50)]:
        idx, note = stratified_subsample(y, f, seed=0)
        assert len(idx) == n == fraction_count(f, 1000) and note is None
        assert y[idx].sum() == npos and len(np.unique(idx)) == n
    full, _ = stratified_subsample(y, 1.0, seed=0)
    assert len(full) == 1000
    # different seeds -> different subsets, same seed -> same subset
    a, _ = stratified_subsample(y, 0.1, seed=0)
    b, _ = stratified_subsample(y, 0.1, seed=1)
    c, _ = stratified_subsample(y, 0.1, seed=0)
    assert not np.array_equal(a, b) and np.array_equal(a, c)
    # rare class: 1% of 100 with 2 positives -> raised to 2, still both classes
    y2 = np.zeros(100, int)
    y2[:2] = 1
    for seed in range(5):
        idx, note = stratified_subsample(y2, 0.01, seed)
        assert len(idx) == 2 and set(y2[idx]) == {0, 1} and "raised" in note
        idx, _ = stratified_subsample(y2, 0.1, seed)
        assert len(idx) == 10 and y2[idx].sum() >= 1
    # impossible
    idx, reason = stratified_subsample(np.zeros(50, int), 0.1, 0)
    assert idx is None and "one class" in reason


def test_probe_row_counts_and_impossible_labels_skip():
    Xtr, Ytr = blobs(500, n_labels=3, seed=0)
    Ytr[:, 2] = 0  # no positives in training: impossible
    Xte, Yte = blobs(200, n_labels=3, seed=1)
    Yte[:, 1] = 1  # single class in test: AUC undefined
    res = run_probe(Xtr, Ytr, Xte, Yte, ["ok", "test1class", "train1class"], fractions=[0.1, 1.0], seeds=[0, 1])
    rows = res["per_seed"]
    ok = [r for r in rows if r["label"] == "ok"]
    assert {r["n_train"] for r in ok if r["fraction"] == 0.1} == {50}
    assert {r["n_train"] for r in ok if r["fraction"] == 1.0} == {500}
    assert all(min(r["class_counts"]) >= 1 and len(r["class_counts"]) == 2 for r in ok)
    assert all(r["metric"] is None for r in rows if r["label"] != "ok")
    assert res["summary"]["0.1"]["per_label"]["train1class"]["mean"] is None
    assert any("train1class" in n and "single class" in n and "training" in n for n in res["notes"])
    assert any("test1class" in n and "test set holds a single class" in n for n in res["notes"])
    # the mean is over the probed label only, and says so
    assert res["summary"]["1"]["mean_over_labels"]["mean"] == pytest.approx(res["summary"]["1"]["per_label"]["ok"]["mean"])
    md = format_markdown({"enc": res})
    assert "n/a" in md and "Notes:" in md


def test_uncertain_policies_and_masking():
    raw = {"a": -1, "b": 1, "c": 0}
    assert D.encode_labels(raw, ["a", "b", "c", "d"], "ones").tolist() == [1, 1, 0, 0]
    assert D.encode_labels(raw, ["a", "b", "c", "d"], "zeros").tolist() == [0, 1, 0, 0]
    v = D.encode_labels(raw, ["a", "b", "c", "d"], "ignore", missing="ignore")
    assert np.isnan(v[0]) and v[1] == 1 and v[2] == 0 and np.isnan(v[3])
    assert D.encode_label("-1.0", "zeros") == 0.0 and D.encode_label("", "ones") == 0.0
    with pytest.raises(ValueError):
        D.encode_label(1, "maybe")
    # masked labels are left out of the probe for that label only
    Xtr, Ytr = blobs(300, seed=0)
    Ytr[:100, 0] = np.nan
    Xte, Yte = blobs(200, seed=1)
    Yte[:50, 0] = np.nan
    res = run_probe(Xtr, Ytr, Xte, Yte, ["a", "b"], fractions=[1.0], seeds=[0], C=1.0)
    n = {r["label"]: r["n_train"] for r in res["per_seed"]}
    assert n == {"a": 200, "b": 300}
    assert res["summary"]["1"]["per_label"]["a"]["mean"] > 0.95


def test_markdown_and_json_reports(tmp_path):
    Xtr, Ytr = blobs(300, seed=0)
    Xte, Yte = blobs(200, seed=1)
    res_a = run_probe(Xtr, Ytr, Xte, Yte, ["a", "b"], fractions=[0.1, 1.0], seeds=[0, 1], C=1.0)
    rng = np.random.default_rng(5)
    res_b = run_probe(rng.normal(size=Xtr.shape), Ytr, rng.normal(size=Xte.shape), Yte, ["a", "b"],
                      fractions=[0.1, 1.0], seeds=[0, 1], C=1.0)
    md = format_markdown({"pretrained": res_a, "random-init": res_b})
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| label"))
    assert header == ("| label | pretrained 10% | pretrained 100% | random-init 10% | random-init 100% |")
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| label")]
    assert [r.split("|")[1].strip() for r in rows] == ["a", "b", "**mean**"]
    assert all(r.count("±") == 4 for r in rows)
    assert "ROC AUC" in md
    jp, mp, md2 = write_reports({"pretrained": res_a, "random-init": res_b}, str(tmp_path / "out"), extra={"x": 1})
    assert md2 == md and open(mp).read() == md
    payload = json.load(open(jp))
    assert payload["x"] == 1 and set(payload["encoders"]) == {"pretrained", "random-init"}
    enc = payload["encoders"]["pretrained"]
    assert len(enc["per_seed"]) == 2 * 2 * 2
    assert enc["summary"]["1"]["per_label"]["a"]["mean"] == pytest.approx(res_a["summary"]["1"]["per_label"]["a"]["mean"])
    # the pretrained (informative) features beat the random ones, as the table shows
    assert enc["summary"]["1"]["mean_over_labels"]["mean"] > payload["encoders"]["random-init"]["summary"]["1"]["mean_over_labels"]["mean"] + 0.2


def test_encoder_spec_parsing():
    assert parse_encoder_spec("pretrained=runs/x/export") == ("pretrained", "runs/x/export", False)
    assert parse_encoder_spec("random=random:runs/x/export") == ("random", "runs/x/export", True)
    assert parse_encoder_spec("runs/x/export") == ("export", "runs/x/export", False)


# ---------------------------------------------------------------------------------------------
# datasets + feature extraction


def test_extract_from_shards_in_order(tmp_path):
    expected = write_shards(str(tmp_path / "shards"))
    tf = eval_transform(IMG)
    ds = D.ShardLabelledDataset(str(tmp_path / "shards"), transform=tf)
    assert ds.label_names == LABELS and ds.num_samples_hint == 11
    enc = TinyEncoder()
    enc.train()
    X, Y = extract_features(enc, ds, batch_size=4, num_workers=0, device="cpu", progress=False)
    assert X.shape == (11, 8) and X.dtype == np.float32 and Y.shape == (11, 2)
    assert enc.training  # mode restored
    assert_labels_equal(Y, expected_matrix(expected, LABELS, "ones"))
    # same order again, and a brace pattern reads the same samples
    ds2 = D.ShardLabelledDataset(str(tmp_path / "shards" / "shard-{000000..000001}.tar"), transform=tf,
                                 label_names=["edema"], uncertain="ignore")
    X2, Y2 = extract_features(enc, ds2, batch_size=5, progress=False)
    np.testing.assert_allclose(X2, X, rtol=1e-5, atol=1e-5)
    assert_labels_equal(Y2, expected_matrix(expected, ["edema"], "ignore"))
    # ignore policy masks the uncertain ones
    ds3 = D.ShardLabelledDataset(str(tmp_path / "shards"), transform=tf, uncertain="ignore")
    _, Y3 = extract_features(enc, ds3, batch_size=4, progress=False)
    assert np.isnan(Y3[:, 0]).sum() == sum(1 for _, lab in expected if lab["cardiomegaly"] == -1)
    with pytest.raises(ValueError, match="not in the manifest"):
        D.ShardLabelledDataset(str(tmp_path / "shards"), label_names=["cardiomegally"])
    with pytest.raises(D.DataPathError, match="nope"):
        D.ShardLabelledDataset(str(tmp_path / "nope"))


def test_corrupt_shard_sample_is_skipped_and_counted(tmp_path):
    root = str(tmp_path / "shards")
    expected = write_shards(root, corrupt_keys={"s00002", "s00007"})
    ds = D.ShardLabelledDataset(root, transform=eval_transform(IMG))
    with pytest.warns(RuntimeWarning, match=r"shard-000000\.tar.*s00002"):
        X, Y, info = extract_features(TinyEncoder(), ds, batch_size=4, progress=False, return_info=True)
    assert X.shape[0] == 9 and info["num_skipped"] == 2 and len(ds.skipped) == 2
    assert {s.key for s in info["skipped"]} == {"s00002", "s00007"}
    assert_labels_equal(Y, expected_matrix(expected, LABELS, skip={"s00002", "s00007"}))
    # also counted when the samples are read in DataLoader worker processes
    ds_w = D.ShardLabelledDataset(root, transform=eval_transform(IMG))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Xw, Yw, info_w = extract_features(TinyEncoder(), ds_w, batch_size=4, num_workers=2, progress=False,
                                          return_info=True)
    assert Xw.shape[0] == 9 and info_w["num_skipped"] == 2 and len(ds_w.skipped) == 2


def test_truncated_shard_does_not_crash(tmp_path):
    root = str(tmp_path / "shards")
    write_shards(root, n_per_shard=(6, 6))
    p = os.path.join(root, "shard-000001.tar")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2 + 100])
    ds = D.ShardLabelledDataset(root, transform=eval_transform(IMG))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        X, _, info = extract_features(TinyEncoder(), ds, batch_size=4, progress=False, return_info=True)
    assert 6 <= X.shape[0] < 12  # shard 0 complete, shard 1 partly
    assert info["num_skipped"] >= 1
    assert any("shard-000001.tar" in str(w.message) for w in rec)


def _write_csv_tree(root):
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    rows = []
    for i in range(8):
        name = f"img/{i}.png"
        with open(os.path.join(root, name), "wb") as f:
            f.write(png_bytes(30 * i))
        rows.append({"path": name, "split": "train" if i < 6 else "test",
                     "a": [1, 0, -1, ""][i % 4], "b": ["1.0", "0.0"][i % 2], "note": "x"})
    with open(os.path.join(root, "labels.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "split", "a", "b", "note"])
        w.writeheader()
        w.writerows(rows)
    return rows


def test_extract_from_csv(tmp_path):
    rows = _write_csv_tree(str(tmp_path))
    ds = D.open_labelled_dataset(str(tmp_path / "labels.csv"), transform=eval_transform(IMG), uncertain="zeros")
    assert isinstance(ds, D.CsvLabelledDataset) and ds.label_names == ["a", "b"] and len(ds) == 8
    X, Y = extract_features(TinyEncoder(), ds, batch_size=3, progress=False)
    assert X.shape == (8, 8)
    exp = np.array([[[1, 0, 0, 0][i % 4], [1, 0][i % 2]] for i in range(8)], np.float32)
    np.testing.assert_array_equal(Y, exp)
    tr = D.CsvLabelledDataset(str(tmp_path / "labels.csv"), label_names=["a"], split="train",
                              uncertain="ignore", missing="ignore", transform=eval_transform(IMG))
    assert len(tr) == 6
    _, Ytr = extract_features(TinyEncoder(), tr, batch_size=4, progress=False)
    assert np.isnan(Ytr[:, 0]).tolist() == [False, False, True, True, False, False]
    # a missing image file is skipped, not fatal
    os.remove(tmp_path / rows[1]["path"])
    with pytest.warns(RuntimeWarning, match=r"1\.png"):
        X2, _, info = extract_features(TinyEncoder(), ds, batch_size=3, progress=False, return_info=True)
    assert X2.shape[0] == 7 and info["num_skipped"] == 1
    with pytest.raises(D.DataPathError, match="missing.csv"):
        D.open_labelled_dataset(str(tmp_path / "missing.csv"))


def _write_folder_tree(root, classes, n=6):
    for ci, c in enumerate(classes):
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((20, 20, 3), 40 * ci + i, np.uint8)).save(os.path.join(root, c, f"{i}.jpeg"))


def test_extract_from_folder_tree_binary_and_multiclass(tmp_path):
    _write_folder_tree(str(tmp_path / "bin"), ["NORMAL", "PNEUMONIA"])
    ds = D.open_labelled_dataset(str(tmp_path / "bin"), transform=eval_transform(IMG))
    assert isinstance(ds, D.FolderLabelledDataset) and ds.task == "binary" and ds.label_names == ["PNEUMONIA"]
    X, Y = extract_features(TinyEncoder(), ds, batch_size=5, progress=False)
    assert X.shape == (12, 8) and Y[:, 0].tolist() == [0] * 6 + [1] * 6

    _write_folder_tree(str(tmp_path / "multi"), ["a", "b", "c"], n=10)
    ds3 = D.FolderLabelledDataset(str(tmp_path / "multi"), transform=eval_transform(IMG))
    assert ds3.task == "multiclass" and ds3.class_names == ["a", "b", "c"]
    X3, Y3 = extract_features(TinyEncoder(), ds3, batch_size=8, progress=False)
    assert sorted(set(Y3[:, 0].tolist())) == [0, 1, 2]
    res = run_probe(X3, Y3, X3, Y3, ds3.label_names, fractions=[0.5, 1.0], seeds=[0, 1], task="multiclass",
                    class_names=ds3.class_names, C=1.0)
    assert res["metric"] == "accuracy" and res["summary"]["1"]["mean_over_labels"]["mean"] > 0.9
    assert {r["n_train"] for r in res["per_seed"] if r["fraction"] == 0.5} == {15}
    md = format_markdown({"enc": res})
    assert "| **accuracy** |" in md and "accuracy" in md.splitlines()[0]


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def real_export(tmp_path):
    """A real (untrained) tiny export written by mlip_ds.export, with the probe's image size."""
    from mlip_ds.export import export_model
    from mlip_ds.model.towers import build_model, load_model_config
    cfg = load_model_config("tiny")
    cfg["vision_cfg"]["image_size"] = IMG
    cfg["vision_cfg"]["patch_size"] = 8
    cfg["preprocess"]["image_size"] = IMG
    torch.manual_seed(123)  # not the CLI's random-init seed, so "pretrained" != "random"
    export_model(build_model(cfg), cfg, str(tmp_path / "export"))
    return tmp_path / "export"


def test_cli_end_to_end(tmp_path, real_export, capsys):
    lab = lambda i: {"cardiomegaly": i % 2, "edema": [1, 0, -1][i % 3]}  # noqa: E731
    write_shards(str(tmp_path / "train"), n_per_shard=(20, 20), label_fn=lab)
    write_shards(str(tmp_path / "test"), n_per_shard=(10, 10), label_fn=lab)
    out = tmp_path / "probe"
    rc = main(["--encoder", f"pretrained={tmp_path / 'export'}", "--encoder", f"random=random:{tmp_path / 'export'}",
               "--train-data", str(tmp_path / "train"), "--test-data", str(tmp_path / "test"),
               "--labels", "cardiomegaly,edema", "--fractions", "0.1,1.0", "--seeds", "0,1", "--C", "1.0",
               "--workers", "0", "--batch-size", "8", "--device", "cpu", "--out", str(out), "--no-progress"])
    assert rc == 0
    payload = json.loads((out / "probe.json").read_text())
    assert payload["encoders"]["pretrained"]["summary"] != payload["encoders"]["random"]["summary"]
    stdout = capsys.readouterr().out
    assert "| label | pretrained 10% | pretrained 100% | random 10% | random 100% |" in stdout
    assert (out / "probe.md").read_text() in stdout
    assert (out / "probe.png").read_bytes()[:4] == b"\x89PNG"
    payload = json.loads((out / "probe.json").read_text())
    assert set(payload["encoders"]) == {"pretrained", "random"}
    assert payload["encoders"]["random"]["encoder"]["random_init"] is True
    assert payload["encoders"]["pretrained"]["n_train"] == 40 and payload["encoders"]["pretrained"]["n_test"] == 20
    assert len(payload["encoders"]["pretrained"]["per_seed"]) == 2 * 2 * 2


def test_cli_clear_errors(tmp_path, real_export, capsys):
    write_shards(str(tmp_path / "data"))
    base = ["--encoder", f"p={tmp_path / 'export'}", "--workers", "0", "--no-progress", "--out", str(tmp_path / "o")]
    rc = main(base + ["--train-data", str(tmp_path / "nodata"), "--test-data", str(tmp_path / "data")])
    assert rc == 2 and f"{tmp_path / 'nodata'}" in capsys.readouterr().err
    rc = main(["--encoder", f"p={tmp_path / 'noexport'}", "--train-data", str(tmp_path / "data"),
               "--test-data", str(tmp_path / "data"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "export dir" in err and f"{tmp_path / 'noexport'}" in err
    rc = main(base + ["--train-data", str(tmp_path / "data" / "shard-{000000..000009}.tar"),
                      "--test-data", str(tmp_path / "data")])
    assert rc == 2 and "shard-000002.tar" in capsys.readouterr().err
