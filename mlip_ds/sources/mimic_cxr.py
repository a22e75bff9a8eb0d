"""MIMIC-CXR(-JPG) source for ``tools/make_shards.py mimic-cxr``: the official PhysioNet layout.

  ROOT/mimic-cxr-2.0.0-metadata.csv[.gz]  dicom_id, subject_id, study_id, ViewPosition, ...
  ROOT/mimic-cxr-2.0.0-split.csv[.gz]     dicom_id, study_id, subject_id, split (train/validate/test)
  ROOT/mimic-cxr-2.0.0-chexpert.csv[.gz]  subject_id, study_id, 14 CheXpert labels (1.0/0.0/-1.0/blank)
  ROOT/files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg        (MIMIC-CXR-JPG; .dcm with image_ext="dcm")
  REPORTS/files/pXX/pSUBJECT/sSTUDY.txt              (from MIMIC-CXR's mimic-cxr-reports.zip)

One job (a :class:`~mlip_ds.sources.csv_source.CsvRow`) per image of the chosen split and views,
in metadata CSV order. Only the findings and impression of a report are kept (a study without
either is skipped with reason ``no report text``). Labels come from the CheXpert CSV; its uncertain
``-1`` is kept as -1 by default (the schema's "uncertain"), or mapped by ``uncertain``: "positive"
(U-Ones), "negative" (U-Zeros) or "drop" (U-Ignore: the label is left out). Blank = not mentioned =
left out. Studies without a CheXpert row get labels derived from the linked entities instead.
"""
from __future__ import annotations

import csv
import gzip
import os
from typing import Iterator, Optional

from mlip_ds.sources.csv_source import CsvRow, CsvSourceError, make_key, normalize_label_name, parse_label

PREFIX = "mimic-cxr-2.0.0-"
SPLITS = ("train", "validate", "test")
FRONTAL_VIEWS = ("PA", "AP")
UNCERTAIN_POLICIES = {"keep": -1, "positive": 1, "negative": 0, "drop": None}
_ID_COLS = ("subject_id", "study_id")


def find_table(root: str, name: str) -> str:
    """``ROOT/mimic-cxr-2.0.0-<name>.csv.gz`` or ``.csv``; CsvSourceError naming both when absent."""
    for ext in (".csv.gz", ".csv"):
        path = os.path.join(root, PREFIX + name + ext)
        if os.path.isfile(path):
            return path
    raise CsvSourceError(f"{os.path.join(root, PREFIX + name)}.csv(.gz) not found (is --root the MIMIC-CXR-JPG folder?)")


def read_table(path: str, required: tuple) -> Iterator[tuple[int, dict]]:
    """(1-based data row, record) of a (gzipped) CSV; CsvSourceError for missing columns."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise CsvSourceError(f"{path}: required column(s) {missing} not found")
        for n, rec in enumerate(reader, start=1):
            yield n, {k: (v or "").strip() for k, v in rec.items() if k is not None}


def _study_dir(subject_id: str, study_id: str) -> str:
    return os.path.join("files", f"p{subject_id[:2]}", f"p{subject_id}", f"s{study_id}")


def _read_chexpert(path: str, uncertain: str) -> tuple[list, dict]:
    """(label names, {(subject_id, study_id): labels dict or 'bad label value: ...'})."""
    mapped = UNCERTAIN_POLICIES[uncertain]
    out: dict = {}
    names: list = []
    for n, rec in read_table(path, _ID_COLS):
        if not names:
            names = [c for c in rec if c not in _ID_COLS]
        labels: dict = {}
        for col in names:
            try:
                value = parse_label(rec.get(col, ""))
            except ValueError:
                labels = f"bad label value: {os.path.basename(path)} row {n} column {col!r} = {rec.get(col)!r}"
                break
            if value == -1:
                value = mapped
            if value is not None:
                labels[normalize_label_name(col)] = value
        out[(rec["subject_id"], rec["study_id"])] = labels
    return [normalize_label_name(c) for c in names], out


def read_jobs(root: str, split: str, views: Optional[tuple] = FRONTAL_VIEWS, reports_dir: Optional[str] = None,
              image_ext: str = "jpg", uncertain: str = "keep") -> tuple[list, list, dict]:
    """(label names, jobs, counts of images left out by split / view) for one official split.

    ``views=None`` keeps every view. Fatal CsvSourceError for a missing table or column; a bad
    metadata row, an image absent from the split CSV or a bad CheXpert value becomes a job with
    ``error`` set (skipped and listed in the manifest)."""
    if split not in SPLITS:
        raise CsvSourceError(f"split {split!r} is not one of {SPLITS}")
    if not os.path.isdir(root):
        raise CsvSourceError(f"MIMIC-CXR folder not found: {root}")
    reports_dir = reports_dir or root
    meta_path = find_table(root, "metadata")
    split_path = find_table(root, "split")
    splits = {rec["dicom_id"]: rec["split"] for _, rec in read_table(split_path, ("dicom_id", "split"))}
    label_names, chexpert = _read_chexpert(find_table(root, "chexpert"), uncertain)
    wanted = None if views is None else {v.upper() for v in views}
    jobs: list = []
    left_out = {"other split": 0, "other view": 0}
    meta_name = os.path.basename(meta_path)
    for n, rec in read_table(meta_path, ("dicom_id", "subject_id", "study_id", "ViewPosition")):
        dicom_id, subject, study = rec["dicom_id"], rec["subject_id"], rec["study_id"]
        view = rec["ViewPosition"].upper()
        sample_id = f"p{subject}/s{study}/{dicom_id}"
        job = CsvRow(row=n, id=sample_id, key=make_key(f"s{study}_{dicom_id}"), image_path="", image_ref="",
                     source="mimic-cxr", clinical_only=True)
        if not (dicom_id and subject.isdigit() and study.isdigit()):
            job.error = (f"bad row: {meta_name} row {n}: dicom_id / subject_id / study_id must be set and "
                         f"numeric ids, got {dicom_id!r} / {subject!r} / {study!r}")
            jobs.append(job)
            continue
        if wanted is not None and view not in wanted:
            left_out["other view"] += 1
            continue
        if dicom_id not in splits:
            job.error = f"bad row: {meta_name} row {n}: dicom_id {dicom_id} is not in {os.path.basename(split_path)}"
            jobs.append(job)
            continue
        if splits[dicom_id] != split:
            left_out["other split"] += 1
            continue
        rel = os.path.join(_study_dir(subject, study), f"{dicom_id}.{image_ext}")
        job.image_ref, job.image_path = rel, os.path.join(root, rel)
        job.report_ref = _study_dir(subject, study) + ".txt"
        job.report_path = os.path.join(reports_dir, job.report_ref)
        labels = chexpert.get((subject, study))
        if isinstance(labels, str):
            job.error = labels
        elif labels:
            job.labels = labels
        job.meta = {"subject_id": subject, "study_id": study, "dicom_id": dicom_id, "view": view, "split": split}
        jobs.append(job)
    return label_names, jobs, left_out
