"""Benchmark split builders on fabricated trees in the official layouts, and the leakage check
against shards written by tools/make_shards.py."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from test_predict import write_dicom

from mlip_ds.eval import splits as S
from mlip_ds.eval.leakage import main as leak_main


def img(path, seed, size=(40, 48)):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 255, size[::-1], dtype=np.uint8), mode="L").save(path)


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def table_and_dicoms(root, table, header, ids, lines, folder, pixels):
    """An RSNA / SIIM-like dataset: ROOT/``table`` (``header``, then ``lines(i, id)`` per id) and one
    DICOM per id, ``folder(i)/<id>.dcm`` holding ``pixels(i)``."""
    root.mkdir()
    with open(root / table, "w") as f:
        f.write(header + "\n")
        for i, key in enumerate(ids):
            f.write(lines(i, key))
            os.makedirs(folder(i), exist_ok=True)
            write_dicom(folder(i) / f"{key}.dcm", pixels(i))


def test_chexpert_5x200(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    cols = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding"] + S.CHEXPERT_OTHER[:1] + \
        ["Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
         "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
    rows, n = [], 0
    for t, task in enumerate(S.CHEXPERT_TASKS):
        for k in range(6):  # 6 eligible per task; plus excluded look-alikes
            n += 1
            rows.append((n, task, {}, "Frontal"))
        n += 1
        rows.append((n, task, {"Edema" if task != "Edema" else "Atelectasis": "1.0"}, "Frontal"))  # two positives
        n += 1
        rows.append((n, task, {"Support Devices": "-1.0"}, "Frontal"))  # uncertain other finding
        n += 1
        rows.append((n, task, {}, "Lateral"))
    with_img = []
    os.makedirs(root, exist_ok=True)
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for i, task, extra, view in rows:
            rel = f"CheXpert-v1.0-small/train/patient{i:05d}/study1/view1_{view.lower()}.jpg"
            rec = {c: "" for c in cols}
            rec.update({"Path": rel, "Sex": "F", "Age": "50", "Frontal/Lateral": view, "AP/PA": "AP", task: "1.0"})
            rec.update(extra)
            for c in S.CHEXPERT_TASKS + S.CHEXPERT_OTHER:
                if rec[c] == "" and i % 2:
                    rec[c] = "0.0"  # blank and 0.0 both mean negative
            w.writerow(rec)
            img(tmp_path / rel, i)
            with_img.append(rel)
    s = S.build("chexpert5x200", str(root), str(tmp_path / "out"), tree=True, n=3)
    out = rows_of(tmp_path / "out" / "chexpert5x200.csv")
    assert len(out) == 15 and {r["split"] for r in out} == {"test"}
    for r in out:
        assert sum(int(r[t]) for t in S.CHEXPERT_TASKS) == 1 and "frontal" in r["path"]
        i = int(r["patient_id"][len("patient"):])
        task = next(t for t in S.CHEXPERT_TASKS if r[t] == "1")
        assert (i - 1) % 9 < 6 and S.CHEXPERT_TASKS[(i - 1) // 9] == task  # only the 6 eligible rows
        assert r["study_id"] == f"{r['patient_id']}/study1"
    # the draw is DataFrame.sample(n, random_state=0): RandomState(0).choice over the eligible rows
    expect = sorted(np.random.RandomState(0).choice(6, 3, replace=False).tolist())
    got = sorted((int(r["patient_id"][7:]) - 1) % 9 for r in out if r["Atelectasis"] == "1")
    assert got == expect
    assert s["counts"]["test"]["images"] == 15
    from mlip_ds.eval.datasets import FolderLabelledDataset
    ds = FolderLabelledDataset(str(tmp_path / "out" / "chexpert5x200" / "test"))
    assert ds.task == "multiclass" and len(ds) == 15 and sorted(ds.class_names) == sorted(S.CHEXPERT_TASKS)
    with pytest.raises(S.SplitError, match="only 6 frontal"):
        S.build("chexpert5x200", str(root), str(tmp_path / "o2"), n=200)


def test_rsna_dicoms_and_probe_reads_them(tmp_path):
    root = tmp_path / "rsna"
    ids = [f"{i:08x}-0000-4000-8000-{i:012x}" for i in range(20)]
    table_and_dicoms(root, "stage_2_train_labels.csv", "patientId,x,y,width,height,Target", ids,
                     # a positive patient: two boxes, one image
                     lambda i, pid: f"{pid},1,2,3,4,1\n{pid},5,6,7,8,1\n" if i % 3 == 0 else f"{pid},,,,,0\n",
                     lambda i: root / "stage_2_train_images",
                     lambda i: np.random.default_rng(i).integers(0, 4000, (24, 24)))
    s = S.build("rsna", str(root), str(tmp_path / "out"), tree=True)
    out = rows_of(tmp_path / "out" / "rsna.csv")
    assert len(out) == 20 and s["counts"]["train"]["images"] == 14
    assert s["counts"]["test"]["images"] == 3 and s["counts"]["valid"]["images"] == 3
    assert {r["image_id"]: int(r["Pneumonia"]) for r in out} == {pid: int(i % 3 == 0) for i, pid in enumerate(ids)}
    assert [r["image_id"] for r in out] == sorted(ids)  # pandas groupby order
    split = S.mgca_three_way(20)
    assert [r["split"] for r in out] == [split[i] for i in range(20)]
    assert any("DICOM" in n for n in s["notes"])  # no tree for DICOMs
    from mlip_ds.data.transforms import eval_transform
    from mlip_ds.eval.datasets import CsvLabelledDataset
    ds = CsvLabelledDataset(str(tmp_path / "out" / "rsna.csv"), split="test", transform=eval_transform(16))
    assert ds.label_names == ["Pneumonia"] and len(ds) == 3 and ds[0][0].shape == (3, 16, 16)


def test_mgca_three_way_matches_sklearn_on_a_frame_like_list():
    from sklearn.model_selection import train_test_split
    rows = [f"id{i}" for i in range(101)]
    tr, rest = train_test_split(rows, test_size=0.3, random_state=0)
    te, va = train_test_split(rest, test_size=0.5, random_state=0)
    split = S.mgca_three_way(101)
    assert {rows[i] for i, s in split.items() if s == "test"} == set(te)
    assert {rows[i] for i, s in split.items() if s == "valid"} == set(va)
    assert {rows[i] for i, s in split.items() if s == "train"} == set(tr)


def test_siim_dedup_and_study(tmp_path):
    root = tmp_path / "siim"
    ids = [f"1.2.276.0.7230010.3.1.4.{i}" for i in range(10)]
    table_and_dicoms(root, "train-rle.csv", "ImageId, EncodedPixels", ids,
                     # image 4 has a second mask row
                     lambda i, iid: f"{iid}, {'-1' if i % 2 else '10 5 20 5'}\n" + (f"{iid}, 40 2\n" if i == 4 else ""),
                     lambda i: root / "dicom-images-train" / f"1.2.study{i}" / f"1.2.series{i}",
                     lambda i: np.full((8, 8), i * 100))
    s = S.build("siim", str(root), str(tmp_path / "out"))
    out = rows_of(tmp_path / "out" / "siim.csv")
    assert len(out) == 10 and any("duplicate" in n for n in s["notes"])
    assert {r["image_id"]: r["Pneumothorax"] for r in out} == {iid: str(int(i % 2 == 0)) for i, iid in enumerate(ids)}
    assert {r["study_id"] for r in out} == {f"1.2.study{i}" for i in range(10)}


def covidx_tree(root, with_val=False):
    classes = ["normal", "pneumonia", "COVID-19"]
    root.mkdir(exist_ok=True)
    for si, (split, n) in enumerate((("train", 15), ("test", 6)) + ((("val", 3),) if with_val else ())):
        with open(root / f"{split}.txt", "w") as f:
            for i in range(n):
                name = f"{split}_{i}.png"
                f.write(f"P{split}{i // 2} {name} {classes[i % 3]} cohen\n")
                img(root / split / name, 100 * si + i)
    return classes


def test_covidx_tree_and_valid(tmp_path):
    root = tmp_path / "covidx"
    classes = covidx_tree(root)
    s = S.build("covidx", str(root), str(tmp_path / "out"), tree=True)
    assert s["counts"]["train"]["images"] == 12 and s["counts"]["valid"]["images"] == 3
    assert s["counts"]["test"]["images"] == 6 and sorted(s["label_names"]) == sorted(classes)
    from mlip_ds.eval.datasets import FolderLabelledDataset
    ds = FolderLabelledDataset(str(tmp_path / "out" / "covidx" / "test"))
    assert ds.task == "multiclass" and len(ds) == 6
    root2 = tmp_path / "covidx2"
    covidx_tree(root2, with_val=True)
    s2 = S.build("covidx", str(root2), str(tmp_path / "out2"))
    assert s2["counts"]["train"]["images"] == 15 and s2["counts"]["valid"]["images"] == 3
    with pytest.raises(S.SplitError, match="train.txt"):
        S.build("covidx", str(tmp_path / "out"), str(tmp_path / "o3"))


def test_chestxray14_official_lists_patient_disjoint_valid(tmp_path):
    root = tmp_path / "nih"
    root.mkdir()
    entries, train_val, test = [], [], []
    for p in range(1, 21):
        for k in range(3):
            name = f"{p:08d}_{k:03d}.png"
            labels = ["No Finding", "Effusion|Mass", "Hernia"][k]
            entries.append((name, labels, k, p))
            (test if p > 16 else train_val).append(name)
            img(root / f"images_{1 + p % 2:03d}" / "images" / name, p * 10 + k)
    with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                    "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"])
        for name, labels, k, p in entries:
            w.writerow([name, labels, k, p, 50, "M", "PA", 40, 48, 0.14, 0.14])
    (root / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    s = S.build("chestxray14", str(root), str(tmp_path / "out"), valid_fraction=0.25)
    out = rows_of(tmp_path / "out" / "chestxray14.csv")
    assert s["counts"]["test"]["images"] == 12 and s["counts"]["valid"]["images"] == 12
    assert s["counts"]["train"]["images"] == 36
    by_split = {sp: {r["patient_id"] for r in out if r["split"] == sp} for sp in S.SPLITS}
    assert not (by_split["train"] & by_split["valid"]) and not (by_split["test"] & (by_split["train"] | by_split["valid"]))
    r = next(r for r in out if r["image_id"] == "00000001_001.png")
    assert (r["Effusion"], r["Mass"], r["Hernia"], r["Atelectasis"]) == ("1", "1", "0", "0")
    assert all(r[c] == "0" for r in out if r["image_id"].endswith("_000.png") for c in S.CHESTXRAY14_LABELS)
    assert r["study_id"] == "1_1"
    assert S.main(["chestxray14", "--root", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2


def test_leakage_finds_ids_pixels_and_near_duplicates(tmp_path, capsys):
    root = tmp_path / "covidx"
    covidx_tree(root)
    S.build("covidx", str(root), str(tmp_path / "split"))
    split_csv = tmp_path / "split" / "covidx.csv"
    # pretraining data: 4 train images, test_0 under another name, test_1 resized + JPEG, and a row whose
    # id is test_2's file name (its image is a train one)
    pre = tmp_path / "pre"
    pre.mkdir()
    Image.open(root / "test" / "test_0.png").save(pre / "copy_of_something.png")
    Image.open(root / "test" / "test_1.png").resize((80, 96)).save(pre / "bigger.jpg", quality=80)
    rows = [(f"{root}/train/train_{i}.png", f"tr{i}") for i in range(4)]
    rows += [(str(pre / "copy_of_something.png"), "x1"), (str(pre / "bigger.jpg"), "x2"),
             (f"{root}/train/train_5.png", "test_2.png")]
    with open(pre / "pre.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "report", "sid"])
        for p, sid in rows:
            w.writerow([p, "FINDINGS: clear lungs. IMPRESSION: normal.", sid])
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "csv", "--csv", str(pre / "pre.csv"),
                        "--out", str(tmp_path / "shards"), "--image-size", "32", "--id-col", "sid", "--quiet",
                        "--samples-per-shard", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rc = leak_main(["--shards", str(tmp_path / "shards"), "--test", str(split_csv), "--out",
                    str(tmp_path / "leak.json"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1, out
    rep = json.loads((tmp_path / "leak.json").read_text())
    assert rep["n_test"] == 6 and rep["n_shard_samples"] == 7
    leaked = {os.path.basename(p) for p in rep["leaked_test_images"]}
    assert leaked == {"test_0.png", "test_2.png"}
    how = {(os.path.basename(m["test_path"]), m["how"]) for m in rep["matches"]}
    assert ("test_0.png", "pixels") in how and ("test_2.png", "image id") in how
    assert {os.path.basename(p) for p in rep["suspected_test_images"]} == {"test_1.png"}
    assert "2 leaked, 1 suspected" in out
    # training images are in these shards by design: checking the train split finds them
    assert leak_main(["--shards", str(tmp_path / "shards"), "--test", str(split_csv), "--split", "train",
                      "--no-progress"]) == 1
    assert leak_main(["--shards", str(tmp_path / "shards"), "--test", str(root / "test"), "--no-progress",
                      "--strict"]) == 1
    clean = tmp_path / "clean"
    img(clean / "a.png", 999)
    assert leak_main(["--shards", str(tmp_path / "shards"), "--test", str(clean), "--no-progress"]) == 0
    assert leak_main(["--shards", str(tmp_path / "noshards"), "--test", str(clean), "--no-progress"]) == 2
