"""tools/make_shards.py: shard round trip, determinism, CSV bad-input handling, synthetic via the CLI."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlip_ds.cli import make_shards
from mlip_ds.data.schema import FINDINGS, SCHEMA_VERSION, validate_sample_json
from mlip_ds.sources.csv_source import parse_label, split_sections

ROOT = Path(__file__).resolve().parents[1]

wds = pytest.importorskip("webdataset")


# ----------------------------------------------------------------------------- helpers

def _img(path: Path, shape, mode=None, seed=0):
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        arr = rng.integers(0, 4096, shape, dtype=np.uint16)
        Image.fromarray(arr).save(path)
    else:
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path.name


def _write_csv(path: Path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _good_dataset(d: Path):
    """Five good rows: gray PNG, RGB JPEG, 16-bit PNG, tall and wide images; CheXpert-style labels."""
    (d / "imgs").mkdir()
    names = [
        "imgs/" + _img(d / "imgs" / "p1.png", (48, 64), seed=1),
        "imgs/" + _img(d / "imgs" / "p2.jpg", (64, 40, 3), seed=2),
        "imgs/" + _img(d / "imgs" / "p3.png", (40, 40), mode="I;16", seed=3),
        "imgs/" + _img(d / "imgs" / "p4.png", (60, 36), seed=4),
        "imgs/" + _img(d / "imgs" / "p5.png", (36, 60), seed=5),
    ]
    reports = [
        "INDICATION: cough.\nFINDINGS: Small left pleural effusion.\nIMPRESSION: Effusion.",
        "findings: heart is enlarged. impression: cardiomegaly.",
        "No acute cardiopulmonary process.",
        "Impression: clear lungs.",
        "FINDINGS: Lungs clear.  IMPRESSION:  Normal chest. ✓",
    ]
    labels = [("1.0", "", "0"), ("0", "1", ""), ("", "", ""), ("-1.0", "0.0", "1"), ("0", "0", "-1")]
    _write_csv(d / "data.csv", ["image", "report", "Pleural Effusion", "Cardiomegaly", "No Finding"],
               [[n, r, *lab] for n, r, lab in zip(names, reports, labels)])
    return d / "data.csv"


def _run(argv, capsys=None):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    try:
        code = make_shards.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = err = ""
    if capsys is not None:
        captured = capsys.readouterr()
        out, err = captured.out, captured.err
    return code, out, err


def _read_all(out_dir: Path, manifest_name="manifest.json"):
    manifest = json.loads((out_dir / manifest_name).read_text())
    urls = [str(out_dir / s["file"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False)) if urls else []
    return manifest, samples


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- units

def test_split_sections():
    assert split_sections("INDICATION: x\nFINDINGS: a b.\nIMPRESSION: c.") == {"findings": "a b.", "impression": "c."}
    assert split_sections("findings: a. impression: b.") == {"findings": "a.", "impression": "b."}
    assert split_sections("just text") == {"findings": "just text", "impression": ""}
    assert split_sections("Impression: only this") == {"findings": "", "impression": "only this"}


def test_parse_label():
    assert [parse_label(v) for v in ("1", "1.0", "0", "0.0", "-1", "-1.0", "", "  ")] == [1, 1, 0, 0, -1, -1, None, None]
    for bad in ("2", "yes", "0.5", "nan"):
        with pytest.raises(ValueError):
            parse_label(bad)


# ----------------------------------------------------------------------------- csv round trip

def test_csv_round_trip(tmp_path, capsys):
    csv_path = _good_dataset(tmp_path)
    out = tmp_path / "out"
    code, stdout, _ = _run(["csv", "--csv", csv_path, "--out", out, "--image-size", 32,
                            "--samples-per-shard", 2, "--quiet"], capsys)
    assert code == 0
    assert "wrote 5 samples in 3 shards" in stdout
    manifest, samples = _read_all(out)

    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["source"] == "csv"
    assert manifest["num_samples"] == 5 and manifest["skipped"] == []
    assert manifest["label_names"] == ["pleural_effusion", "cardiomegaly", "no_finding"]
    assert manifest["created_with"]["image_size"] == 32
    assert [s["num_samples"] for s in manifest["shards"]] == [2, 2, 1]
    assert [s["file"] for s in manifest["shards"]] == [f"shard-00000{i}.tar" for i in range(3)]
    for s in manifest["shards"]:
        assert _sha(out / s["file"]) == s["sha256"]
    assert sorted(os.listdir(out)) == ["manifest.json"] + [s["file"] for s in manifest["shards"]]

    assert [s["__key__"] for s in samples] == ["imgs_p1", "imgs_p2", "imgs_p3", "imgs_p4", "imgs_p5"]
    for s in samples:
        assert {k for k in s if not k.startswith("__")} == {"png", "txt", "json"}
        doc = json.loads(s["json"])
        validate_sample_json(doc, s["__key__"])
        assert doc["entities"] == []
        img = Image.open(io.BytesIO(s["png"]))
        assert img.mode == "L" and min(img.size) == 32
        assert list(img.size) == doc["meta"]["size"]
    docs = [json.loads(s["json"]) for s in samples]
    assert docs[0]["id"] == "imgs/p1"
    assert docs[0]["sections"] == {"findings": "Small left pleural effusion.", "impression": "Effusion."}
    assert docs[1]["sections"] == {"findings": "heart is enlarged.", "impression": "cardiomegaly."}
    assert docs[2]["sections"] == {"findings": "No acute cardiopulmonary process.", "impression": ""}
    assert docs[4]["sections"]["impression"] == "Normal chest. ✓"
    assert samples[4]["txt"].decode("utf-8").endswith("✓")
    assert [d["labels"] for d in docs] == [
        {"pleural_effusion": 1, "no_finding": 0},
        {"pleural_effusion": 0, "cardiomegaly": 1},
        {},
        {"pleural_effusion": -1, "cardiomegaly": 0, "no_finding": 1},
        {"pleural_effusion": 0, "cardiomegaly": 0, "no_finding": -1},
    ]
    assert docs[0]["meta"]["orig_size"] == [64, 48] and docs[0]["meta"]["size"] == [43, 32]
    assert docs[3]["meta"]["size"] == [32, 53]          # tall image: width is the short side
    assert min(docs[2]["meta"]["size"]) == 32            # 40 px 16-bit image, resized down

    # tar headers are fixed (what makes the bytes reproducible)
    with tarfile.open(out / "shard-000000.tar") as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == ["imgs_p1.json", "imgs_p1.png", "imgs_p1.txt",
                                         "imgs_p2.json", "imgs_p2.png", "imgs_p2.txt"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "mlip", "mlip", 0o444)}


def test_csv_options_report_files_label_cols_meta_jpg(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    _img(tmp_path / "a.png", (64, 64))
    (tmp_path / "r" / "a.txt").write_text("FINDINGS: fine.\nIMPRESSION: normal.", encoding="utf-8")
    _write_csv(tmp_path / "x.csv",
               ["study", "path", "report_file", "Edema", "Sex", "Ignored"],
               [["s1", "a.png", "r/a.txt", "1", "F", "whatever"]])
    out = tmp_path / "out"
    code, _, _ = _run(["csv", "--csv", tmp_path / "x.csv", "--out", out, "--image-col", "path",
                       "--report-file-col", "report_file", "--label-cols", "Edema", "--meta-cols", "Sex",
                       "--id-col", "study", "--root", tmp_path, "--format", "jpg", "--image-size", 32,
                       "--quiet"], capsys)
    assert code == 0
    manifest, samples = _read_all(out)
    assert manifest["label_names"] == ["edema"]
    (s,) = samples
    assert "jpg" in s and "png" not in s
    doc = json.loads(s["json"])
    assert doc["id"] == "s1" and s["__key__"] == "s1"
    assert doc["labels"] == {"edema": 1}
    assert doc["meta"]["Sex"] == "F" and doc["meta"]["report_file"] == "r/a.txt"
    assert doc["sections"] == {"findings": "fine.", "impression": "normal."}
    assert Image.open(io.BytesIO(s["jpg"])).size == (32, 32)


# ----------------------------------------------------------------------------- determinism

def test_determinism_and_workers(tmp_path, capsys):
    csv_path = _good_dataset(tmp_path)
    digests = []
    for name, workers in (("a", 1), ("b", 1), ("c", 2)):
        code, _, _ = _run(["csv", "--csv", csv_path, "--out", tmp_path / name, "--image-size", 32,
                           "--samples-per-shard", 3, "--workers", workers, "--quiet"], capsys)
        assert code == 0
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        digests.append([(s["file"], s["sha256"]) for s in manifest["shards"]])
    assert digests[0] == digests[1] == digests[2]
    assert len(digests[0]) == 2


# ----------------------------------------------------------------------------- bad input

def _bad_dataset(d: Path):
    """One CSV with both a report text and a report file column; each row is bad in a known way."""
    for i in range(1, 8):
        _img(d / f"ok{i}.png", (40, 40), seed=i)
    full = (d / "ok1.png").read_bytes()
    (d / "trunc.png").write_bytes(full[: len(full) // 2])        # corrupt: truncated PNG
    (d / "garbage.jpg").write_bytes(b"this is not an image")      # corrupt: not an image
    (d / "good.txt").write_text("FINDINGS: clear.\nIMPRESSION: normal.", encoding="utf-8")
    (d / "latin1.txt").write_bytes("Befund: Ergu\u00df".encode("latin-1"))  # not UTF-8
    (d / "empty.txt").write_text(" \n", encoding="utf-8")
    rows = [  # image, report text, report file, label        text mode / file mode
        ["ok1.png", "FINDINGS: fine. IMPRESSION: normal.", "good.txt", "1"],  # 1  ok / ok
        ["missing.png", "text", "good.txt", "0"],       # 2  missing image
        ["trunc.png", "text", "good.txt", "0"],         # 3  truncated image
        ["garbage.jpg", "text", "good.txt", "0"],       # 4  not an image
        ["ok2.png", "   ", "good.txt", "0"],            # 5  empty report / ok
        ["ok3.png", "text", "latin1.txt", "0"],         # 6  ok / report file not UTF-8
        ["ok4.png", "text", "good.txt", "maybe"],       # 7  unknown label value
        ["ok5.png", "text", "nope.txt", "1"],           # 8  ok / missing report file
        ["ok1.png", "again", "good.txt", "1"],          # 9  duplicate id (image of row 1)
        ["ok6.png", "text", "", "-1.0"],                # 10 ok / blank report file cell
        ["ok7.png", "text", "empty.txt", ""],           # 11 ok / empty report file
    ]
    _write_csv(d / "data.csv", ["image", "report", "report_file", "Edema"], rows)
    # bad bytes straight in the CSV's report column (data row 2)
    with open(d / "bytes.csv", "wb") as f:
        f.write(b"image,report,Edema\nok1.png,fine,1\nok2.png,bad \xff\xfe bytes,0\n")


def test_csv_bad_rows_are_skipped_with_reasons(tmp_path, capsys):
    _bad_dataset(tmp_path)
    common = ["--csv", tmp_path / "data.csv", "--label-cols", "Edema", "--image-size", 32, "--quiet"]
    code, stdout, _ = _run(["csv", "--out", tmp_path / "o1", *common], capsys)
    assert code == 0
    manifest, samples = _read_all(tmp_path / "o1")
    assert [json.loads(s["json"])["meta"]["row"] for s in samples] == [1, 6, 8, 10, 11]
    assert manifest["num_samples"] == 5
    skipped = {s["row"]: s for s in manifest["skipped"]}
    assert sorted(skipped) == [2, 3, 4, 5, 7, 9]
    reason = {row: s["reason"] for row, s in skipped.items()}
    assert reason[2].startswith("missing image: ") and "missing.png" in reason[2]
    assert reason[3].startswith("unreadable image: ") and "trunc.png" in reason[3]
    assert reason[4].startswith("unreadable image: ") and "garbage.jpg" in reason[4]
    assert reason[5].startswith("empty report")
    assert reason[7].startswith("bad label value: ") and "'maybe'" in reason[7] and "Edema" in reason[7]
    assert reason[9].startswith("duplicate id: ") and "row 1" in reason[9]
    assert skipped[2]["id"] == "missing" and skipped[9]["id"] == "ok1"
    assert "skipped 6 rows:" in stdout and "unreadable image: 2" in stdout and "missing image: 1" in stdout

    code, stdout, _ = _run(["csv", "--out", tmp_path / "o2", "--report-file-col", "report_file", *common], capsys)
    assert code == 0
    manifest, samples = _read_all(tmp_path / "o2")
    assert [json.loads(s["json"])["meta"]["row"] for s in samples] == [1, 5]
    assert json.loads(samples[1]["json"])["sections"] == {"findings": "clear.", "impression": "normal."}
    reason = {s["row"]: s["reason"] for s in manifest["skipped"]}
    assert sorted(reason) == [2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert reason[6].startswith("report not UTF-8: ") and "latin1.txt" in reason[6]
    assert reason[8].startswith("missing report file: ") and "nope.txt" in reason[8]
    assert reason[10].startswith("missing report file: ")
    assert reason[11].startswith("empty report: ") and "empty.txt" in reason[11]
    assert "report not UTF-8: 1" in stdout and "missing report file: 2" in stdout

    code, _, _ = _run(["csv", "--csv", tmp_path / "bytes.csv", "--out", tmp_path / "o3",
                       "--image-size", 32, "--quiet"], capsys)
    assert code == 0
    manifest, samples = _read_all(tmp_path / "o3")
    assert len(samples) == 1
    assert [(s["row"], s["reason"].split(":")[0]) for s in manifest["skipped"]] == [(2, "report not UTF-8")]


def test_strict_stops_at_first_bad_row(tmp_path, capsys):
    _bad_dataset(tmp_path)
    out = tmp_path / "strict"
    code, _, err = _run(["csv", "--csv", tmp_path / "data.csv", "--label-cols", "Edema", "--out", out,
                         "--image-size", 32, "--samples-per-shard", 1, "--strict", "--quiet"], capsys)
    assert code == 2
    assert "row 2" in err and "missing image" in err and "missing.png" in err and "data.csv" in err
    assert os.listdir(out) == []                          # no shards, no manifest, no temp files


def test_all_rows_bad_exits_1(tmp_path, capsys):
    _write_csv(tmp_path / "d.csv", ["image", "report"], [["nope.png", "x"]])
    code, stdout, err = _run(["csv", "--csv", tmp_path / "d.csv", "--out", tmp_path / "o", "--quiet"], capsys)
    assert code == 1 and "no samples" in err
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["skipped"][0]["row"] == 1


def test_missing_csv_or_column_fails_at_once(tmp_path, capsys):
    code, _, err = _run(["csv", "--csv", tmp_path / "nope.csv", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "nope.csv" in err
    _write_csv(tmp_path / "d.csv", ["img", "report"], [["a.png", "x"]])
    code, _, err = _run(["csv", "--csv", tmp_path / "d.csv", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "'image'" in err and "d.csv" in err
    code, _, err = _run(["csv", "--csv", tmp_path / "d.csv", "--out", tmp_path / "o", "--image-col", "img",
                         "--label-cols", "Edema"], capsys)
    assert code == 2 and "'Edema'" in err
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_overwrite(tmp_path, capsys):
    csv_path = _good_dataset(tmp_path)
    out = tmp_path / "out"
    base = ["csv", "--csv", csv_path, "--out", out, "--image-size", 32, "--quiet"]
    assert _run(base + ["--samples-per-shard", 1], capsys)[0] == 0
    assert len(list(out.glob("shard-*.tar"))) == 5
    code, _, err = _run(base, capsys)
    assert code == 2 and "--overwrite" in err
    assert _run(base + ["--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar"]
    # another prefix in the same folder is independent
    assert _run(base + ["--prefix", "test"], capsys)[0] == 0
    assert (out / "test-manifest.json").is_file() and (out / "test-000000.tar").is_file()


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_cli(tmp_path):
    generate_sample = pytest.importorskip("mlip_ds.sources.synthetic").generate_sample
    tool = str(ROOT / "tools" / "make_shards.py")

    def run(out, *extra):
        proc = subprocess.run([sys.executable, tool, "synthetic", "--out", str(out), "--num-samples", "5",
                               "--samples-per-shard", "2", "--image-size", "32", "--gen-size", "64",
                               "--quiet", *extra], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc

    proc = run(tmp_path / "a")
    assert "wrote 5 samples in 3 shards" in proc.stdout
    run(tmp_path / "b", "--workers", "2")
    run(tmp_path / "t", "--start-index", "100")
    ma, samples = _read_all(tmp_path / "a")
    mb = json.loads((tmp_path / "b" / "manifest.json").read_text())
    mt, test_samples = _read_all(tmp_path / "t")
    assert ma["shards"] == mb["shards"]                       # same bytes with 1 or 2 workers
    assert ma["source"] == "synthetic" and ma["num_samples"] == 5 and ma["skipped"] == []
    for s in ma["shards"]:
        assert _sha(tmp_path / "a" / s["file"]) == s["sha256"]
    assert not {s["__key__"] for s in samples} & {s["__key__"] for s in test_samples}
    for s in samples:
        assert {k for k in s if not k.startswith("__")} == {"png", "txt", "json", "seg.png"}
        doc = json.loads(s["json"])
        validate_sample_json(doc, s["__key__"])
        img = Image.open(io.BytesIO(s["png"]))
        seg = Image.open(io.BytesIO(s["seg.png"]))
        assert img.mode == "L" and img.size == seg.size == (32, 32)
        assert doc["meta"]["orig_size"] == [64, 64] and doc["meta"]["size"] == [32, 32]
        assert s["txt"].decode("utf-8").strip()
        assert set(doc["labels"]) <= set(ma["label_names"])
        assert doc["entities"] and doc["sections"]["findings"]
        # boxes follow the 64 -> 32 px resize and still cover the (nearest-resized) mask bits
        ref = generate_sample(doc["meta"]["index"], seed=0, size=64).meta["findings"]
        seg_arr = np.asarray(seg)
        for f, f64 in zip(doc["meta"]["findings"], ref):
            x0, y0, x1, y1 = f["bbox"]
            a0, b0, a1, b1 = f64["bbox"]
            assert (x0, y0, x1, y1) == (a0 // 2, b0 // 2, max(-(-a1 // 2), a0 // 2 + 1), max(-(-b1 // 2), b0 // 2 + 1))
            ys, xs = np.nonzero(seg_arr & (1 << FINDINGS.index(f["name"])))
            if len(xs):
                assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
