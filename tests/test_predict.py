"""mlip_ds.eval.predict: a tiny kept classifier on a folder of PNGs, an extension-less DICOM, a
corrupt file, and a CSV of paths."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, SHARED_DATA
from test_classifier import IMG, cxr_like, make_export, write_tree

from mlip_ds.eval.predict import main


def write_dicom(path, arr: np.ndarray):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    d = Dataset()
    d.file_meta = meta
    d.SOPClassUID, d.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    d.Rows, d.Columns = arr.shape
    d.SamplesPerPixel, d.BitsAllocated, d.BitsStored, d.HighBit, d.PixelRepresentation = 1, 16, 12, 11, 0
    d.PhotometricInterpretation = "MONOCHROME2"
    d.PixelData = arr.astype(np.uint16).tobytes()
    d.save_as(str(path), enforce_file_format=True)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from mlip_ds.eval.linear_probe import main as probe
    base = tmp_path_factory.mktemp("pred")
    make_export(base / "export")
    write_tree(base / "train", 40, 0)
    write_tree(base / "test", 10, 1)
    rc = probe(["--encoder", str(base / "export"), "--train-data", str(base / "train"), "--test-data",
                str(base / "test"), "--fractions", "1.0", "--seeds", "0", "--C", "1.0", "--workers", "0",
                "--out", str(base / "probe"), "--no-progress", "--save-classifier", str(base / "clf"),
                "--target-sensitivity", "0.9", "--bootstrap", "50"])
    assert rc == 0
    return base / "clf"


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(7)
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    cxr_like(rng, True).save(d / "a_pos.png")
    cxr_like(rng, False).save(d / "sub" / "b_neg.png")
    arr = np.asarray(cxr_like(rng, True), dtype=np.uint16) * 16  # 12-bit values
    write_dicom(d / "IM000001", arr)  # DICOM without extension
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (d / "notes.txt").write_text("ignored")
    return d, arr


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_folder_dicom_and_corrupt(classifier, inputs, tmp_path, capsys):
    d, arr = inputs
    out = tmp_path / "preds.csv"
    rc = main(["--classifier", str(classifier), "--input", str(d), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "3 image(s) predicted, 1 unreadable" in err and "device cpu" in err and "1 file(s)" in err
    rows = read_rows(out)
    assert [os.path.relpath(r["path"], d) for r in rows] == ["IM000001", "a_pos.png", "corrupt.png",
                                                             os.path.join("sub", "b_neg.png")]
    assert list(rows[0]) == ["path", "PNEUMONIA_prob", "PNEUMONIA_pred", "error"]
    bad = rows[2]
    assert bad["PNEUMONIA_prob"] == "" and bad["PNEUMONIA_pred"] == ""
    assert "cannot identify image file" in bad["error"] or "Error" in bad["error"]
    good = [r for r in rows if not r["error"]]
    assert len(good) == 3
    from mlip_ds.eval.classifier import load_classifier
    clf = load_classifier(str(classifier))
    thr = clf.thresholds["PNEUMONIA"]
    for r in good:
        p = float(r["PNEUMONIA_prob"])
        assert 0 <= p <= 1 and r["PNEUMONIA_pred"] == str(int(p >= thr))
    # the DICOM goes through the project's reader: same probability as the 8-bit image it holds
    from mlip_ds.sources.dicom import read_dicom
    img = read_dicom(str(d / "IM000001"))[0]
    x = clf.transform(img)[None]
    p_ref = clf.probabilities(clf.logits(x))[0, 0]
    assert float(rows[0]["PNEUMONIA_prob"]) == pytest.approx(p_ref, abs=1e-6)
    # the positive examples score higher than the negative one
    by = {os.path.basename(r["path"]): float(r["PNEUMONIA_prob"]) for r in good}
    assert by["a_pos.png"] > by["b_neg.png"]


def test_predict_csv_of_paths_and_workers(classifier, inputs, tmp_path, capsys):
    d, _ = inputs
    lst = tmp_path / "list.csv"
    lst.write_text("id,image_path\n1,in/a_pos.png\n2,in/missing.png\n3,in/IM000001\n")
    out = tmp_path / "o" / "p.csv"
    assert main(["--classifier", str(classifier), "--input", str(lst), "--out", str(out), "--no-progress",
                 "--workers", "1", "--batch-size", "2"]) == 0
    rows = read_rows(out)
    assert [os.path.basename(r["path"]) for r in rows] == ["a_pos.png", "missing.png", "IM000001"]
    assert "not found" in rows[1]["error"] and rows[0]["error"] == "" and rows[2]["error"] == ""


def test_predict_usage_errors(classifier, tmp_path, capsys):
    assert main(["--classifier", str(tmp_path / "none"), "--input", str(tmp_path), "--out",
                 str(tmp_path / "p.csv")]) == 2
    assert "classifier.json" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--classifier", str(classifier), "--input", str(tmp_path / "empty"), "--out",
                 str(tmp_path / "p.csv")]) == 2
    assert "no images" in capsys.readouterr().err
    assert main(["--classifier", str(classifier), "--input", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "p.csv")]) == 2


def test_console_script_declared():
    text = (ROOT / "setup.py").read_text()
    assert '"mlip-predict=mlip_ds.eval.predict:main"' in text
    r = subprocess.run([sys.executable, "-m", "mlip_ds.eval.predict", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--classifier" in r.stdout


KERMANY = SHARED_DATA / "kermany_pneumonia_224"


@pytest.mark.skipif(not (KERMANY / "test" / "NORMAL").is_dir(),
                    reason=f"the real Kermany images are not here ({KERMANY} is absent)")
def test_predict_on_real_kermany_images(classifier, tmp_path, capsys):
    """A few real 224 px pediatric CXRs (CC BY 4.0) through predict; the classifier is the tiny
    fabricated one, so only the plumbing is checked (decoding, sizes, CSV), not accuracy."""
    d = tmp_path / "k"
    for c in ("NORMAL", "PNEUMONIA"):
        (d / c).mkdir(parents=True)
        for name in sorted(os.listdir(KERMANY / "test" / c))[:3]:
            shutil.copy(KERMANY / "test" / c / name, d / c / name)
    out = tmp_path / "k.csv"
    assert main(["--classifier", str(classifier), "--input", str(d), "--out", str(out), "--no-progress"]) == 0
    rows = read_rows(out)
    assert len(rows) == 6 and all(r["error"] == "" and 0 <= float(r["PNEUMONIA_prob"]) <= 1 for r in rows)
