"""Standard benchmark splits, built from the user's own copy of each dataset.

``python -m mlip_ds.eval.splits KIND --root DATASET_DIR --out OUT [--tree]`` writes

* ``OUT/<kind>.csv``: ``path`` (absolute), ``split`` (train / valid / test), ``image_id``,
  ``patient_id``, ``study_id``, then one 0/1 column per label; what the probe and fine-tuning read
  (``--train-data OUT/<kind>.csv --train-split train --test-data OUT/<kind>.csv --test-split test``)
  and what ``mlip_ds.eval.leakage`` checks against the pretraining shards;
* ``OUT/<kind>.json``: the protocol, the counts per split and label, and notes (images listed but
  not found, duplicates merged);
* with ``--tree`` (single-label sets whose images are not DICOM): ``OUT/<kind>/<split>/<class>/``
  symbolic links, the class-per-folder tree (multi-class accuracy for COVIDx and 5x200).

Kinds and the official layouts they read (the protocols are MGCA's / GLoRIA's, whose numbers users
report against; ``sklearn.model_selection.train_test_split(random_state=0)`` on the same row order
gives the same index sets as their pandas code):

chexpert5x200  ``ROOT/train.csv`` of CheXpert-v1.0(-small) (``Path``, ``Frontal/Lateral``, the 14
               observations, 1 / 0 / -1 / blank). Frontal images positive for exactly one of
               Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion and 0 (blank = 0)
               for the other 12 findings (No Finding not looked at); 200 per task, drawn as
               ``DataFrame.sample(n=200, random_state=0)`` does (``RandomState(0).choice``). All
               ``test``. ``Path`` is relative to the folder above ``ROOT`` (it starts with
               ``CheXpert-v1.0-small/``).
rsna           ``ROOT/stage_2_train_labels.csv`` (``patientId,x,y,width,height,Target``, one row per
               box) and ``<patientId>.dcm`` under ROOT (``stage_2_train_images/``). One image per
               patient, label ``Pneumonia`` = any box; patients in sorted order (pandas groupby);
               70 / 15 / 15 % train / test / valid as MGCA (test_size=0.3, then half of it valid).
siim           ``ROOT/train-rle.csv`` (``ImageId, EncodedPixels``; ``-1`` = no pneumothorax) and
               ``<ImageId>.dcm`` under ROOT (``dicom-images-train/<study>/<series>/``). Label
               ``Pneumothorax``. Rows of one ImageId are merged (MGCA keeps the duplicate rows, which
               can put one image in two splits; noted in the JSON); 70 / 15 / 15 % as RSNA.
               ``study_id`` = the DICOM's study folder.
covidx         ``ROOT/train.txt`` and ``ROOT/test.txt`` (``patient_id filename class source``,
               space-separated; optional ``ROOT/val.txt``), images in ``ROOT/train/``,
               ``ROOT/test/`` (``ROOT/val/``). Classes as written (normal / pneumonia / COVID-19, or
               positive / negative), one 0/1 column each. Without val.txt, valid = 20 % of train
               (``train_test_split(train_size=0.8, random_state=0)``, MGCA).
chestxray14    ``ROOT/Data_Entry_2017_v2020.csv`` (or ``Data_Entry_2017.csv``: ``Image Index``,
               ``Finding Labels`` joined by ``|``, ``Follow-up #``, ``Patient ID``),
               ``ROOT/train_val_list.txt`` and ``ROOT/test_list.txt`` (the official lists), images
               anywhere under ROOT (``images_001/images/...``). 14 labels. valid = ``--valid-fraction``
               (default 0.1) of train_val's *patients* (seeded), so no patient is in two splits.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import Sequence

import numpy as np

CHEXPERT_TASKS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
CHEXPERT_OTHER = ["Enlarged Cardiomediastinum", "Lung Lesion", "Lung Opacity", "Pneumonia", "Pneumothorax",
                  "Pleural Other", "Fracture", "Support Devices"]
CHESTXRAY14_LABELS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                      "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
                      "Hernia"]
KINDS = ("chexpert5x200", "rsna", "siim", "covidx", "chestxray14")
SPLITS = ("train", "valid", "test")


class SplitError(RuntimeError):
    """The dataset folder is not in the expected layout (message names the file)."""


def _read_csv(path: str) -> tuple[list, list]:
    if not os.path.isfile(path):
        raise SplitError(f"{path} not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = [(c or "").strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    return cols, rows


def _need(cols, wanted, path):
    missing = [c for c in wanted if c not in cols]
    if missing:
        raise SplitError(f"{path}: missing column(s) {missing} (columns: {cols})")


def _index(root: str, exts=(".dcm", ".png", ".jpg", ".jpeg")) -> dict:
    from mlip_ds.downstream.datasets import _index_images
    return {k: v for k, v in _index_images(root).items() if os.path.splitext(v)[1].lower() in exts}


def mgca_three_way(n: int, test_fac: float = 0.15, seed: int = 0) -> dict:
    """MGCA's ``train_test_split(df, test_size=2*test_fac, random_state=0)`` then
    ``train_test_split(rest, test_size=0.5, random_state=0)`` -> (test, valid): split per row index."""
    from sklearn.model_selection import train_test_split
    idx = np.arange(n)
    train, rest = train_test_split(idx, test_size=test_fac * 2, random_state=seed)
    test, valid = train_test_split(rest, test_size=0.5, random_state=seed)
    out = {}
    for name, part in (("train", train), ("test", test), ("valid", valid)):
        for i in part:
            out[int(i)] = name
    return out


def _rec(path, split, labels, image_id, patient_id="", study_id="", cls=None):
    return {"path": os.path.abspath(path) if path else "", "split": split, "image_id": image_id,
            "patient_id": patient_id, "study_id": study_id, "labels": labels, "class": cls}


# ---------------------------------------------------------------------------------------------
# the five builders: each returns (records, label names, protocol, notes)


def _value(v: str) -> float:
    try:
        return float(v) if v != "" else 0.0
    except ValueError:
        return float("nan")


def build_chexpert5x200(root: str, n: int = 200, seed: int = 0):
    path = os.path.join(root, "train.csv")
    cols, rows = _read_csv(path)
    _need(cols, ["Path", "Frontal/Lateral"] + CHEXPERT_TASKS + CHEXPERT_OTHER, path)
    frontal = [r for r in rows if r["Frontal/Lateral"] == "Frontal"]
    recs, notes, missing = [], [], []
    parent = os.path.dirname(os.path.abspath(root))
    for i, task in enumerate(CHEXPERT_TASKS):
        want = {t: 1.0 if t == task else 0.0 for t in CHEXPERT_TASKS + CHEXPERT_OTHER}
        pool = [r for r in frontal if all(_value(r[t]) == v for t, v in want.items())]
        if len(pool) < n:
            raise SplitError(f"{path}: only {len(pool)} frontal images positive for {task} alone, need {n}")
        pick = np.random.RandomState(seed).choice(len(pool), size=n, replace=False)
        for j in pick:
            r = pool[int(j)]
            rel = r["Path"]
            cands = [os.path.join(parent, rel), os.path.join(root, rel.split("/", 1)[1] if "/" in rel else rel)]
            img = next((c for c in cands if os.path.isfile(c)), None)
            parts = rel.split("/")
            patient = next((p for p in parts if p.startswith("patient")), "")
            study = next((p for p in parts if p.startswith("study")), "")
            if img is None:
                missing.append(rel)
                continue
            recs.append(_rec(img, "test", {t: int(t == task) for t in CHEXPERT_TASKS}, rel, patient,
                             f"{patient}/{study}" if patient else "", cls=task))
    if missing:
        notes.append(f"{len(missing)} sampled image(s) not found under {parent} (e.g. {missing[:3]}), left out")
    proto = f"MGCA/GLoRIA CheXpert 5x200: frontal, one-hot over the 5 tasks and 8 other findings, {n} per task, seed {seed}"
    return recs, list(CHEXPERT_TASKS), proto, notes


def _mgca_binary(root: str, keys: Sequence[str], positive: dict, finding: str, key_name: str, seed: int,
                 ids) -> tuple[list, list]:
    """RSNA's and SIIM's split: ``keys`` (one image each) in the given order, 70/15/15 by
    ``mgca_three_way``, one 0/1 label ``finding`` (class ``finding`` or Normal). ``ids(key, path)``
    gives (patient_id, study_id). Keys without an image under ``root`` are left out and noted."""
    split = mgca_three_way(len(keys), 0.15, seed)
    images = _index(root)
    recs, missing = [], []
    for i, key in enumerate(keys):
        if key not in images:
            missing.append(key)
            continue
        patient, study = ids(key, images[key])
        recs.append(_rec(images[key], split[i], {finding: int(positive[key])}, key, patient, study,
                         cls=finding if positive[key] else "Normal"))
    notes = [f"{len(missing)} {key_name}(s) without an image, left out (e.g. {missing[:3]})"] if missing else []
    return recs, notes


def build_rsna(root: str, seed: int = 0):
    path = os.path.join(root, "stage_2_train_labels.csv")
    cols, rows = _read_csv(path)
    _need(cols, ["patientId", "Target"], path)
    pos: dict[str, bool] = {}
    for r in rows:
        pos[r["patientId"]] = pos.get(r["patientId"], False) or r["Target"] in ("1", "1.0")
    recs, notes = _mgca_binary(root, sorted(pos), pos, "Pneumonia", "patientId", seed,
                               lambda pid, image: (pid, pid))
    return recs, ["Pneumonia"], f"MGCA RSNA: patients sorted, 70/15/15 train/test/valid, random_state={seed}", notes


def build_siim(root: str, seed: int = 0):
    path = os.path.join(root, "train-rle.csv")
    if not os.path.isfile(path) and os.path.isfile(os.path.join(root, "stage_2_train.csv")):
        path = os.path.join(root, "stage_2_train.csv")
    cols, rows = _read_csv(path)
    _need(cols, ["ImageId", "EncodedPixels"], path)
    order, pos = [], {}
    for r in rows:
        iid = r["ImageId"]
        if iid not in pos:
            order.append(iid)
            pos[iid] = False
        pos[iid] = pos[iid] or r["EncodedPixels"] not in ("-1", "")
    # study_id: the DICOM's study folder (dicom-images-train/<study>/<series>/<ImageId>.dcm)
    recs, notes = _mgca_binary(root, order, pos, "Pneumothorax", "ImageId", seed,
                               lambda iid, image: ("", os.path.basename(os.path.dirname(os.path.dirname(image)))))
    if len(order) < len(rows):
        notes.insert(0, f"{len(rows) - len(order)} duplicate ImageId row(s) merged (one image, one split)")
    return recs, ["Pneumothorax"], f"MGCA SIIM: ImageIds deduplicated in file order, 70/15/15, random_state={seed}", notes


def _read_covidx_list(path: str) -> list[tuple[str, str, str]]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 3:
                raise SplitError(f"{path} line {n}: expected 'patient_id filename class [source]', got {line!r}")
            out.append((parts[0], parts[1], parts[2]))
    return out


def build_covidx(root: str, seed: int = 0):
    from sklearn.model_selection import train_test_split
    lists = {s: os.path.join(root, f"{s}.txt") for s in ("train", "val", "test")}
    for s in ("train", "test"):
        if not os.path.isfile(lists[s]):
            raise SplitError(f"{lists[s]} not found (COVIDx layout: train.txt, test.txt, train/, test/)")
    entries = {s: _read_covidx_list(p) for s, p in lists.items() if os.path.isfile(p)}
    classes = sorted({c for es in entries.values() for _, _, c in es})
    parts = []
    if "val" in entries:
        parts = [("train", "train", entries["train"]), ("valid", "val", entries["val"])]
        proto = "COVIDx official train/val/test lists"
    else:
        tr, va = train_test_split(np.arange(len(entries["train"])), train_size=0.8, random_state=seed)
        parts = [("train", "train", [entries["train"][i] for i in sorted(tr)]),
                 ("valid", "train", [entries["train"][i] for i in sorted(va)])]
        proto = f"COVIDx official train/test lists; valid = 20% of train (MGCA, random_state={seed})"
    parts.append(("test", "test", entries["test"]))
    recs, missing = [], []
    for split, folder, es in parts:
        for pid, fname, c in es:
            p = os.path.join(root, folder, fname)
            if not os.path.isfile(p):
                missing.append(os.path.join(folder, fname))
                continue
            recs.append(_rec(p, split, {k: int(k == c) for k in classes}, fname, pid, "", cls=c))
    notes = [f"{len(missing)} listed image(s) not found, left out (e.g. {missing[:3]})"] if missing else []
    return recs, classes, proto, notes


def build_chestxray14(root: str, seed: int = 0, valid_fraction: float = 0.1):
    path = next((os.path.join(root, n) for n in ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
                 if os.path.isfile(os.path.join(root, n))), None)
    if path is None:
        raise SplitError(f"no Data_Entry_2017_v2020.csv / Data_Entry_2017.csv in {root}")
    cols, rows = _read_csv(path)
    _need(cols, ["Image Index", "Finding Labels", "Patient ID"], path)
    lists = {}
    for name in ("train_val_list.txt", "test_list.txt"):
        p = os.path.join(root, name)
        if not os.path.isfile(p):
            raise SplitError(f"{p} not found (the official ChestX-ray14 split lists)")
        with open(p) as f:
            lists[name] = {ln.strip() for ln in f if ln.strip()}
    by_name = {r["Image Index"]: r for r in rows}
    train_val = sorted(lists["train_val_list.txt"] & set(by_name))
    patients = sorted({by_name[n]["Patient ID"] for n in train_val})
    rng = np.random.default_rng(seed)
    n_valid = int(round(valid_fraction * len(patients)))
    valid_patients = set(rng.permutation(patients)[:n_valid].tolist()) if n_valid else set()
    images = _index(root, (".png", ".jpg", ".jpeg"))
    recs, missing, unknown = [], [], []
    for r in rows:
        name = r["Image Index"]
        if name in lists["test_list.txt"]:
            split = "test"
        elif name in lists["train_val_list.txt"]:
            split = "valid" if r["Patient ID"] in valid_patients else "train"
        else:
            unknown.append(name)
            continue
        stem = os.path.splitext(name)[0]
        if stem not in images:
            missing.append(name)
            continue
        findings = set(r["Finding Labels"].split("|"))
        follow = r.get("Follow-up #", "")
        recs.append(_rec(images[stem], split, {k: int(k in findings) for k in CHESTXRAY14_LABELS}, name,
                         r["Patient ID"], f"{r['Patient ID']}_{follow}" if follow != "" else ""))
    notes = []
    if missing:
        notes.append(f"{len(missing)} listed image(s) not found, left out (e.g. {missing[:3]})")
    if unknown:
        notes.append(f"{len(unknown)} image(s) in neither official list, left out")
    proto = (f"ChestX-ray14 official train_val/test lists; valid = {valid_fraction:g} of train_val patients "
             f"(seed {seed})")
    return recs, list(CHESTXRAY14_LABELS), proto, notes


BUILDERS = {"chexpert5x200": build_chexpert5x200, "rsna": build_rsna, "siim": build_siim, "covidx": build_covidx,
            "chestxray14": build_chestxray14}


# ---------------------------------------------------------------------------------------------
# writing


def write_split(out_dir: str, kind: str, recs: list, label_names: Sequence[str], protocol: str, notes: list,
                root: str, tree: bool = False) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"{kind}.csv")
    cols = ["path", "split", "image_id", "patient_id", "study_id"] + list(label_names)
    with open(csv_path + ".tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in recs:
            w.writerow([r["path"], r["split"], r["image_id"], r["patient_id"], r["study_id"]]
                       + [r["labels"][n] for n in label_names])
    os.replace(csv_path + ".tmp", csv_path)
    counts = {}
    for s in SPLITS:
        part = [r for r in recs if r["split"] == s]
        if part:
            counts[s] = {"images": len(part), **{n: sum(r["labels"][n] for r in part) for n in label_names}}
    tree_dir = None
    if tree:
        if any(r["class"] is None for r in recs):
            notes.append("--tree skipped: multi-label set (no single class per image)")
        elif any(r["path"].lower().endswith((".dcm", ".dicom")) for r in recs):
            notes.append("--tree skipped: DICOM images (the folder reader takes image files; use the CSV)")
        else:
            tree_dir = os.path.join(out_dir, kind)
            for r in recs:
                d = os.path.join(tree_dir, r["split"], r["class"])
                os.makedirs(d, exist_ok=True)
                link = os.path.join(d, r["image_id"].replace("/", "_"))
                if os.path.lexists(link):
                    os.remove(link)
                os.symlink(r["path"], link)
    summary = {"kind": kind, "root": os.path.abspath(root), "protocol": protocol, "csv": csv_path, "tree": tree_dir,
               "label_names": list(label_names), "counts": counts, "notes": notes}
    with open(os.path.join(out_dir, f"{kind}.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def build(kind: str, root: str, out_dir: str, tree: bool = False, seed: int = 0, **kw) -> dict:
    if kind not in BUILDERS:
        raise SplitError(f"unknown kind {kind!r}; one of {KINDS}")
    if not os.path.isdir(root):
        raise SplitError(f"--root {root} is not a folder")
    recs, labels, proto, notes = BUILDERS[kind](root, seed=seed, **kw)
    if not recs:
        raise SplitError(f"{kind}: no images found under {root} ({'; '.join(notes)})")
    return write_split(out_dir, kind, recs, labels, proto, notes, root, tree=tree)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlip_ds.eval.splits",
                                description="Build a standard benchmark split (CSV + optional class-folder tree) from "
                                            "your own copy of the dataset.")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--root", required=True, help="the dataset folder in its official layout")
    p.add_argument("--out", required=True, help="output folder for <kind>.csv / <kind>.json [/ <kind>/ tree]")
    p.add_argument("--tree", action="store_true", help="also a class-per-folder tree of symlinks (single-label sets)")
    p.add_argument("--seed", type=int, default=0, help="random_state of the split (0 = MGCA's)")
    p.add_argument("--valid-fraction", type=float, default=0.1, help="chestxray14: patients of train_val for valid")
    p.add_argument("--n", type=int, default=200, help="chexpert5x200: images per task")
    args = p.parse_args(argv)
    kw = {}
    if args.kind == "chestxray14":
        kw["valid_fraction"] = args.valid_fraction
    if args.kind == "chexpert5x200":
        kw["n"] = args.n
    try:
        s = build(args.kind, args.root, args.out, tree=args.tree, seed=args.seed, **kw)
    except SplitError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    print(json.dumps({k: s[k] for k in ("csv", "tree", "counts", "notes")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
