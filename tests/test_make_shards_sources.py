"""make_shards real-data sources: MIMIC-CXR(-JPG) and Open-i / IU X-ray in their official layouts
(trees fabricated here), DICOM input (known pixel values), determinism across workers, bad input."""
from __future__ import annotations

import csv
import gzip
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlip_ds.cli import make_shards
from mlip_ds.data.schema import validate_sample_json
from mlip_ds.sources.dicom import is_dicom, read_dicom

ROOT = Path(__file__).resolve().parents[1]

wds = pytest.importorskip("webdataset")
pydicom = pytest.importorskip("pydicom")

OPENI_TGZ = ROOT.parent / "shared" / "data" / "openi_reports" / "NLMCXR_reports.tgz"
R2GEN_JSON = ROOT.parent / "shared" / "data" / "iu_xray_r2gen" / "annotation_r2gen_split.json"


# ----------------------------------------------------------------------------- helpers

def _run(argv, capsys):
    try:
        code = make_shards.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _read(out: Path):
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["file"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False)) if urls else []
    docs = {}
    for s in samples:
        doc = json.loads(s["json"])
        validate_sample_json(doc, s["__key__"])
        docs[doc["id"]] = (doc, s)
    return manifest, docs


def _png(path: Path, shape=(40, 48), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


def _dicom(path: Path, arr, photometric="MONOCHROME2", bits_stored=12, **tags):
    """A minimal, valid uncompressed DICOM (16-bit unsigned) written with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = np.asarray(arr).shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = np.asarray(arr, dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _gray(path) -> np.ndarray:
    img, _ = read_dicom(str(path))
    assert img.mode == "L"
    return np.asarray(img)


# ----------------------------------------------------------------------------- DICOM

RAMP = np.array([[0, 1000, 2000, 3000, 4095]] * 2)


def test_dicom_monochrome_window_and_lut(tmp_path):
    # no VOI: min..max -> 0..255
    assert _gray(_dicom(tmp_path / "m2.dcm", RAMP))[0].tolist() == [0, 62, 125, 187, 255]
    # MONOCHROME1 (white = low values), stored without extension: found by its DICM preamble, inverted
    m1 = _dicom(tmp_path / "IM000001", RAMP, "MONOCHROME1")
    assert is_dicom(str(m1)) and not is_dicom(str(tmp_path / "x.png"))
    assert _gray(m1)[0].tolist() == [255, 193, 130, 68, 0]
    # window (LINEAR, PS3.3 C.11.2.1.2.1): center 2000.5, width 2001 -> 1000..3000 maps onto the
    # 12-bit output range 0..4095, i.e. 0..255 after scaling; outside is clipped
    w = _gray(_dicom(tmp_path / "w.dcm", RAMP, WindowCenter=2000.5, WindowWidth=2001))[0].tolist()
    assert w == [0, 0, 128, 255, 255]
    # modality LUT first: stored 0..4095 -> 2 * v - 1000; the window is in those units
    r = _gray(_dicom(tmp_path / "r.dcm", RAMP, RescaleSlope=2, RescaleIntercept=-1000,
                     WindowCenter=3000.5, WindowWidth=4001))[0].tolist()
    assert r == [0, 0, 128, 255, 255]
    # VOI LUT sequence (8-bit table: v // 16) wins over the window: output 0..255 used as is
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.LUTData = (np.arange(4096) // 16).astype(np.uint16).tobytes()
    v = _gray(_dicom(tmp_path / "v.dcm", RAMP, VOILUTSequence=Sequence([lut]),
                     WindowCenter=100, WindowWidth=10))[0].tolist()
    assert v == [0, 62, 125, 187, 255]


def test_dicom_through_csv_source_and_bad_dicom(tmp_path, capsys):
    _dicom(tmp_path / "a.dcm", RAMP * 0 + np.arange(5) * 1000, "MONOCHROME1")
    _dicom(tmp_path / "b", RAMP)                        # no extension
    (tmp_path / "c.dcm").write_bytes(b"not a dicom at all")
    (tmp_path / "d.csv").write_text("image,report\na.dcm,Lungs clear.\nb,Lungs clear.\nc.dcm,Lungs clear.\n")
    code, out, _ = _run(["csv", "--csv", tmp_path / "d.csv", "--out", tmp_path / "o", "--image-size", 2,
                         "--quiet"], capsys)
    assert code == 0
    manifest, docs = _read(tmp_path / "o")
    assert manifest["num_samples"] == 2
    (bad,) = manifest["skipped"]
    assert bad["row"] == 3 and bad["reason"].startswith("unreadable image: ") and "c.dcm" in bad["reason"]
    png = np.asarray(Image.open(io.BytesIO(docs["a"][1]["png"])))
    assert png.shape == (2, 5) and png[0].tolist() == [255, 191, 127, 64, 0]   # inverted, 8-bit
    assert docs["b"][0]["meta"]["orig_size"] == [5, 2]


# ----------------------------------------------------------------------------- MIMIC-CXR

CHEXPERT_COLS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
                 "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
                 "Pneumonia", "Pneumothorax", "Support Devices"]
REPORT_1 = ("                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n"
            " INDICATION:  ___F with cough\n\n FINDINGS: \n\n Small left pleural effusion.  No pneumothorax.\n\n"
            " IMPRESSION: \n\n Possible small effusion.\n")


def _write_csv(path: Path, header, rows):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _mimic_tree(d: Path, image_ext="jpg"):
    """Official MIMIC-CXR-JPG layout; reports in a separate folder (as mimic-cxr-reports.zip)."""
    images = [  # dicom_id, subject, study, view, split, has image
        ("d1", "10000032", "50000001", "PA", "train", True),
        ("d2", "10000032", "50000001", "LATERAL", "train", True),   # left out: view
        ("d3", "10000032", "50000002", "AP", "train", True),        # report has no findings/impression
        ("d4", "10000033", "50000003", "PA", "validate", True),     # left out: split
        ("d5", "10000033", "50000004", "PA", "train", False),       # missing image
        ("d6", "10000034", "50000005", "AP", "train", True),        # no CheXpert row: labels from linker
        ("d7", "10000034", "50000005", "PA", None, True),           # not in the split CSV
        ("d8", "10000035", "50000006", "PA", "train", True),        # CheXpert row with a bad value
    ]
    meta = [[i, s, st, "CHEST (PA AND LAT)", v, 3056, 2544] for i, s, st, v, _, _ in images]
    meta.insert(3, ["dx", "abc", "50000009", "", "PA", 1, 1])       # malformed row (data row 4)
    _write_csv(d / "mimic-cxr-2.0.0-metadata.csv.gz",
               ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                "Rows", "Columns"], meta)
    _write_csv(d / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"],
               [[i, st, s, sp] for i, s, st, _, sp, _ in images if sp])
    lab = {c: "" for c in CHEXPERT_COLS}
    lab.update({"Atelectasis": "1.0", "Pleural Effusion": "-1.0", "Edema": "0.0"})
    _write_csv(d / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *CHEXPERT_COLS],
               [["10000032", "50000001", *lab.values()], ["10000032", "50000002", *[""] * 13, "1.0"],
                ["10000033", "50000003", *[""] * 8, "1.0", *[""] * 5],
                ["10000035", "50000006", "2.0", *[""] * 13]])
    for n, (i, s, st, _, _, has) in enumerate(images):
        if has:
            path = d / "files" / f"p{s[:2]}" / f"p{s}" / f"s{st}" / f"{i}.{image_ext}"
            if image_ext == "dcm":
                _dicom(path, np.full((40, 48), 100 * n), "MONOCHROME1")
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.random.default_rng(n).integers(0, 256, (48, 40), dtype=np.uint8)).save(path, quality=90)
    reports = d / "reports"
    texts = {("10000032", "50000001"): REPORT_1,
             ("10000032", "50000002"): "FINAL REPORT\nINDICATION: chest pain.\nTECHNIQUE: portable AP.\n",
             ("10000033", "50000003"): "IMPRESSION: Normal.", ("10000033", "50000004"): "IMPRESSION: Normal.",
             ("10000034", "50000005"): "FINDINGS: The heart is enlarged.\nIMPRESSION: Cardiomegaly.",
             ("10000035", "50000006"): "IMPRESSION: Normal."}
    for (s, st), text in texts.items():
        p = reports / "files" / f"p{s[:2]}" / f"p{s}" / f"s{st}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return d


def test_mimic_cxr_layout_split_views_labels(tmp_path, capsys):
    _mimic_tree(tmp_path)
    base = ["mimic-cxr", "--root", tmp_path, "--reports-dir", tmp_path / "reports", "--split", "train",
            "--image-size", 16, "--no-link", "--quiet"]
    code, out, _ = _run([*base, "--out", tmp_path / "o"], capsys)
    assert code == 0, out
    manifest, docs = _read(tmp_path / "o")
    assert manifest["source"] == "mimic-cxr" and sorted(docs) == ["p10000032/s50000001/d1", "p10000034/s50000005/d6"]
    assert manifest["left_out"] == {"other split": 1, "other view": 1}
    reasons = {s["id"]: s["reason"] for s in manifest["skipped"]}
    assert len(reasons) == 5, reasons
    assert reasons["p10000035/s50000006/d8"] == ("bad label value: mimic-cxr-2.0.0-chexpert.csv.gz row 4 "
                                                 "column 'Atelectasis' = '2.0'")
    assert reasons["p10000032/s50000002/d3"].startswith("no report text: ") and "s50000002.txt" in reasons["p10000032/s50000002/d3"]
    assert reasons["p10000033/s50000004/d5"].startswith("missing image: ") and "d5.jpg" in reasons["p10000033/s50000004/d5"]
    assert reasons["p10000034/s50000005/d7"].startswith("bad row: ") and "split" in reasons["p10000034/s50000005/d7"]
    bad = next(s for s in manifest["skipped"] if s["row"] == 4)
    assert bad["reason"].startswith("bad row: mimic-cxr-2.0.0-metadata.csv.gz row 4") and "'abc'" in bad["reason"]
    assert "no report text: 1" in out and "bad row: 2" in out

    doc, sample = docs["p10000032/s50000001/d1"]
    assert sample["txt"].decode() == "FINDINGS: Small left pleural effusion.  No pneumothorax.\n\nIMPRESSION: Possible small effusion."
    assert doc["sections"] == {"findings": "Small left pleural effusion.  No pneumothorax.",
                               "impression": "Possible small effusion."}
    assert doc["labels"] == {"atelectasis": 1, "edema": 0, "pleural_effusion": -1}
    assert doc["meta"]["view"] == "PA" and doc["meta"]["split"] == "train" and doc["meta"]["labels_from"] == "source"
    assert doc["meta"]["image"] == "files/p10/p10000032/s50000001/d1.jpg" and doc["entities"] == []
    assert docs["p10000034/s50000005/d6"][0]["labels"] == {}          # no CheXpert row, not linked
    assert manifest["label_names"][:2] == ["atelectasis", "cardiomegaly"] and len(manifest["label_names"]) == 14

    # other views and the -1 policy
    code, _, _ = _run([*base, "--out", tmp_path / "o2", "--views", "all", "--uncertain", "drop"], capsys)
    assert code == 0
    manifest, docs = _read(tmp_path / "o2")
    assert "p10000032/s50000001/d2" in docs and manifest["left_out"] == {"other split": 1, "other view": 0}
    assert docs["p10000032/s50000001/d1"][0]["labels"] == {"atelectasis": 1, "edema": 0}

    # a missing table fails at once, naming it
    (tmp_path / "mimic-cxr-2.0.0-split.csv").unlink()
    code, _, err = _run([*base, "--out", tmp_path / "o3"], capsys)
    assert code == 2 and "mimic-cxr-2.0.0-split" in err


def test_mimic_cxr_dicom_and_workers_give_same_bytes(tmp_path, capsys):
    _mimic_tree(tmp_path, image_ext="dcm")
    digests = []
    for name, workers in (("w1", 1), ("w2", 2)):
        code, _, _ = _run(["mimic-cxr", "--root", tmp_path, "--reports-dir", tmp_path / "reports", "--split", "train",
                           "--views", "all", "--image-ext", "dcm", "--image-size", 16, "--samples-per-shard", 2,
                           "--workers", workers, "--no-link", "--quiet", "--out", tmp_path / name], capsys)
        assert code == 0
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        digests.append([(s["file"], s["sha256"]) for s in manifest["shards"]])
    assert digests[0] == digests[1] and len(digests[0]) == 2
    assert (tmp_path / "w1" / "shard-000000.tar").read_bytes() == (tmp_path / "w2" / "shard-000000.tar").read_bytes()
    _, docs = _read(tmp_path / "w1")
    img = np.asarray(Image.open(io.BytesIO(docs["p10000032/s50000001/d1"][1]["png"])))
    assert img.shape == (16, 19) and (img == 255).all()   # a flat MONOCHROME1 frame: min = max -> 0, inverted


def test_mimic_cxr_linked_labels(tmp_path, capsys):
    pytest.importorskip("scispacy", reason="scispacy is not installed (pip install -e .)")
    _mimic_tree(tmp_path)
    code, _, _ = _run(["mimic-cxr", "--root", tmp_path, "--reports-dir", tmp_path / "reports", "--split", "train",
                       "--image-size", 16, "--quiet", "--out", tmp_path / "o"], capsys)
    assert code == 0
    manifest, docs = _read(tmp_path / "o")
    doc, sample = docs["p10000032/s50000001/d1"]
    text = sample["txt"].decode()
    assert {(e["name"], e["negated"]) for e in doc["entities"]} >= {("pleural effusion", False), ("pneumothorax", True)}
    assert all(text[e["start"]:e["end"]] for e in doc["entities"])
    assert doc["labels"] == {"atelectasis": 1, "edema": 0, "pleural_effusion": -1}     # the CheXpert CSV wins
    linked, _ = docs["p10000034/s50000005/d6"]
    assert linked["meta"]["labels_from"] == "linker" and linked["labels"]["cardiomegaly"] == 1
    assert linked["labels"]["no_finding"] == 0 and "cardiomegaly" in manifest["label_names"]


# ----------------------------------------------------------------------------- Open-i

def _real_xml(dest: Path, names):
    if not OPENI_TGZ.is_file():
        pytest.skip(f"the Open-i report XML is not staged here ({OPENI_TGZ} is absent)")
    dest.mkdir(parents=True)
    with tarfile.open(OPENI_TGZ) as tf:
        for name in names:
            (dest / name).write_bytes(tf.extractfile(f"ecgen-radiology/{name}").read())


def test_openi_real_xml(tmp_path, capsys):
    xml_dir, images = tmp_path / "ecgen-radiology", tmp_path / "NLMCXR_png"
    _real_xml(xml_dir, ["1.xml", "10.xml", "2.xml"])
    (xml_dir / "3.xml").write_text("<eCitation><Abstract></eCitation>")            # malformed
    (xml_dir / "4.xml").write_text('<eCitation><AbstractText Label="INDICATION">cough</AbstractText>'
                                   '<parentImage id="CXR4_IM-1"/></eCitation>')      # no findings/impression
    import xml.etree.ElementTree as ET
    ids = {n: [p.get("id") for p in ET.parse(xml_dir / n).getroot().findall("parentImage")] for n in ("1.xml", "2.xml", "10.xml")}
    assert ids["1.xml"] == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]
    for k, image_id in enumerate(i for n in ids.values() for i in n):
        if image_id != ids["10.xml"][-1]:                                           # one image missing
            _png(images / f"{image_id}.png", seed=k)
    code, out, _ = _run(["openi", "--xml-dir", xml_dir, "--images", images, "--out", tmp_path / "o",
                         "--image-size", 16, "--no-link", "--quiet"], capsys)
    assert code == 0, out
    manifest, docs = _read(tmp_path / "o")
    n_images = sum(len(v) for v in ids.values())
    assert manifest["source"] == "openi" and manifest["num_samples"] == n_images - 1
    kinds = sorted(s["reason"].split(":")[0] for s in manifest["skipped"])
    assert kinds == ["malformed XML", "missing image", "no report text"]
    assert any("3.xml" in s["reason"] for s in manifest["skipped"])
    doc, sample = docs["CXR1_1_IM-0001-3001"]
    assert doc["sections"]["findings"].startswith("The cardiac silhouette and mediastinum size are within normal limits.")
    assert doc["sections"]["impression"] == "Normal chest x-XXXX."
    assert sample["txt"].decode() == f"FINDINGS: {doc['sections']['findings']}\n\nIMPRESSION: Normal chest x-XXXX."
    assert doc["meta"]["report_id"] == "CXR1" and doc["meta"]["mesh"] == ["normal"]
    # numeric file order: 1.xml, 2.xml, 10.xml
    assert [d[0]["meta"]["xml"] for d in sorted(docs.values(), key=lambda d: d[0]["meta"]["row"])][-1] == "10.xml"


def test_openi_annotation_json_split(tmp_path, capsys):
    images = tmp_path / "images"
    ann = {"train": [{"id": "CXR1_1_IM-0001", "report": "The lungs are clear.", "split": "train",
                      "image_path": ["CXR1_1_IM-0001/0.png", "CXR1_1_IM-0001/1.png"]}],
           "val": [{"id": "CXR2_IM-0652", "report": "Heart size normal. No effusion.", "split": "val",
                    "image_path": ["CXR2_IM-0652/0.png", "CXR2_IM-0652/1.png"]},
                   {"id": "CXR3_IM-1", "report": "  ", "split": "val", "image_path": ["CXR3_IM-1/0.png"]},
                   {"id": "CXR4_IM-1", "split": "val"}],
           "test": []}
    for entry in ann["train"] + ann["val"][:2]:
        for k, p in enumerate(entry["image_path"]):
            _png(images / p, seed=k)
    (tmp_path / "annotation.json").write_text(json.dumps(ann))
    code, _, _ = _run(["openi", "--annotation", tmp_path / "annotation.json", "--images", images, "--split", "val",
                       "--out", tmp_path / "o", "--image-size", 16, "--no-link", "--quiet"], capsys)
    assert code == 0
    manifest, docs = _read(tmp_path / "o")
    assert sorted(docs) == ["CXR2_IM-0652/0", "CXR2_IM-0652/1"]                     # the val split only
    assert docs["CXR2_IM-0652/1"][0]["meta"]["view_index"] == 1
    assert docs["CXR2_IM-0652/0"][0]["sections"] == {"findings": "Heart size normal. No effusion.", "impression": ""}
    assert sorted(s["reason"].split(":")[0] for s in manifest["skipped"]) == ["bad row", "no report text"]
    code, _, err = _run(["openi", "--annotation", tmp_path / "annotation.json", "--images", images,
                         "--out", tmp_path / "o2"], capsys)
    assert code == 2 and "--split" in err


def test_real_r2gen_annotation_parses():
    if not R2GEN_JSON.is_file():
        pytest.skip(f"the R2Gen annotation.json is not staged here ({R2GEN_JSON} is absent)")
    from mlip_ds.sources.openi import read_annotation_jobs
    jobs = read_annotation_jobs(str(R2GEN_JSON), "/nonexistent/images", "test")
    assert len({j.meta["report_id"] for j in jobs}) == 590
    assert all(j.error is None for j in jobs) and all(j.image_ref.endswith(".png") for j in jobs)


# ----------------------------------------------------------------------------- resume

def _resume_csv(d: Path):
    for i in range(7):
        if i != 2:
            _png(d / f"i{i}.png", seed=i)
    (d / "d.csv").write_text("image,report\n" + "".join(f"i{i}.png,Lungs clear {i}.\n" for i in range(7)))
    return d / "d.csv"


def _stat(path: Path):
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_resume_rewrites_only_the_damaged_shard(tmp_path, capsys):
    base = ["csv", "--csv", _resume_csv(tmp_path), "--out", tmp_path / "o", "--image-size", 16,
            "--samples-per-shard", 2, "--quiet"]
    assert _run(base, capsys)[0] == 0
    first = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert [s["jobs"] for s in first["shards"]] == [[0, 2], [2, 5], [5, 7]]   # row 3 (job 2) is skipped
    shards = [tmp_path / "o" / s["file"] for s in first["shards"]]
    before = [_stat(p) for p in shards]
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])                                 # a partial shard

    code, _, err = _run(base, capsys)
    assert code == 2 and "--resume" in err
    code, out, _ = _run([*base, "--resume", "--workers", 2], capsys)
    assert code == 0 and "kept 2 verified shard(s), wrote 1" in out
    again = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert again["shards"] == first["shards"] and again["skipped"] == first["skipped"]
    assert shards[1].read_bytes() == data                                          # rewritten, same bytes
    assert _stat(shards[0]) == before[0] and _stat(shards[2]) == before[2]      # verified, not touched
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["manifest.json"] + [p.name for p in shards]

    # other options: nothing of the earlier run is trusted
    code, out, _ = _run([*base[:-3], "--image-size", 8, "--samples-per-shard", 2, "--quiet", "--resume"], capsys)
    assert code == 0 and "kept 0 verified shard(s), wrote 3" in out


@pytest.mark.slow
def test_resume_after_kill(tmp_path):
    """SIGKILL a real run once two shards are complete; --resume keeps them and finishes the rest,
    giving the same bytes as an uninterrupted run."""
    import os
    import signal
    import subprocess
    import time

    tool = [sys.executable, str(ROOT / "tools" / "make_shards.py"), "synthetic", "--num-samples", "150",
            "--samples-per-shard", "5", "--image-size", "32", "--quiet"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([*tool, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = out / ".shard-journal"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.is_dir() and len(list(journal.glob("*.json"))) >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    done = sorted(json.loads(p.read_text())["file"] for p in journal.glob("*.json"))
    assert len(done) >= 2
    before = {name: _stat(out / name) for name in done}

    r = subprocess.run([*tool, "--out", str(out), "--resume", "--workers", "2"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"kept {len(done)} verified shard(s)" in r.stdout
    assert {name: _stat(out / name) for name in done} == before
    assert not journal.exists() and not [n for n in os.listdir(out) if ".tmp" in n]

    ref = tmp_path / "ref"
    subprocess.run([*tool, "--out", str(ref)], check=True, capture_output=True, timeout=300)
    resumed = json.loads((out / "manifest.json").read_text())
    clean = json.loads((ref / "manifest.json").read_text())
    assert resumed["shards"] == clean["shards"] and len(clean["shards"]) == 30
