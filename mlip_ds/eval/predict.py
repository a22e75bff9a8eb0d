"""Predict with a kept classifier on unlabelled images: a folder, DICOMs, or a CSV of paths.

``python -m mlip_ds.eval.predict --classifier DIR --input PATH --out preds.csv`` (or ``mlip-predict``)

* ``DIR``: a classifier folder written by ``linear_probe`` / ``finetune --save-classifier``
  (:mod:`mlip_ds.eval.classifier`).
* ``PATH``: a folder (walked recursively, in sorted order; hidden files skipped): every file with an
  image extension (png, jpg, jpeg, bmp, tif, tiff), ``.dcm`` / ``.dicom``, or no extension at all
  (DICOM archives often store ``IM000001``-style names; a file without extension that is neither a
  DICOM nor an image is listed with its error). Other files (``.txt``, ``.json``, ...) are ignored
  and counted. Or a ``.csv`` with a path column (``path``, ``image_path``, ``image``, ``filename``,
  ...; relative paths start at the CSV's folder). Or one image file.
* DICOMs are read with the project's reader (modality LUT, VOI LUT / window, MONOCHROME1 inverted:
  ``mlip_ds/sources/dicom.py``); images are converted to 8-bit grayscale; then the classifier's
  preprocessing (resize short side, centre crop, grayscale repeated to 3 channels, normalise).
* Output CSV, one row per input in input order: ``path``; per label ``<label>_prob`` (calibrated
  probability) and ``<label>_pred`` (1 when the probability reaches the label's threshold);
  for a multi-class classifier ``<class>_prob`` per class and ``predicted_class``; ``error``
  (empty, or why the file could not be read: its probability cells are then empty). An unreadable
  file never stops the run.
* Device: ``--device auto`` (default) uses CUDA when there is one, else the CPU.
Exit code 0 when the run completed (even with unreadable files; the count is printed), 2 on a
usage error (no classifier, no inputs).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_EXTS = (".dcm", ".dicom")
CSV_PATH_COLUMNS = ("path", "image_path", "image", "img_path", "filename", "file", "Path")


class PredictError(RuntimeError):
    """A user-facing error (bad classifier, no inputs): exit code 2."""


def list_inputs(path: str) -> tuple[list[str], list[str]]:
    """(image paths in order, notes)."""
    notes: list[str] = []
    if not os.path.exists(path):
        raise PredictError(f"--input not found: {path}")
    if os.path.isdir(path):
        out, ignored = [], 0
        for d, dirs, files in os.walk(path):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                ext = os.path.splitext(name)[1].lower()
                if ext in IMAGE_EXTS or ext in DICOM_EXTS or ext == "":
                    out.append(os.path.join(d, name))
                else:
                    ignored += 1
        if ignored:
            notes.append(f"{ignored} file(s) with other extensions ignored")
        if not out:
            raise PredictError(f"no images (or DICOMs) under {path}")
        return out, notes
    if path.lower().endswith(".csv"):
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = list(reader.fieldnames or [])
            rows = list(reader)
        col = next((c for c in CSV_PATH_COLUMNS if c in cols), None)
        if col is None:
            raise PredictError(f"{path}: no path column (looked for {CSV_PATH_COLUMNS}; columns: {cols})")
        root = os.path.dirname(os.path.abspath(path))
        out = [r[col] if os.path.isabs(r[col]) else os.path.join(root, r[col]) for r in rows if r[col]]
        if not out:
            raise PredictError(f"{path}: no paths in column {col!r}")
        return out, notes
    return [path], notes


def read_image(path: str):
    """Any radiograph file -> 8-bit grayscale PIL image; raises with the reason."""
    from mlip_ds.eval.datasets import _load_image
    from mlip_ds.sources.dicom import is_dicom, read_dicom

    if not os.path.isfile(path):
        raise FileNotFoundError("file not found")
    if is_dicom(path):
        return read_dicom(path)[0]
    return _load_image(path)


class _Images(Dataset):
    def __init__(self, paths: Sequence[str], transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, self.transform(read_image(self.paths[i])), None
        except Exception as exn:  # noqa: BLE001  (PIL / pydicom raise many types)
            msg = str(exn).replace("\n", " ").strip()
            return i, None, f"{type(exn).__name__}: {msg}" if msg else type(exn).__name__


def _collate(batch):
    good = [b for b in batch if b[1] is not None]
    bad = [(b[0], b[2]) for b in batch if b[1] is None]
    x = torch.stack([b[1] for b in good]) if good else None
    return [b[0] for b in good], x, bad


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PredictError("--device cuda asked for, but CUDA is not available")
    return name


def predict_paths(clf, paths: Sequence[str], batch_size: int = 32, workers: int = 0, progress: bool = True):
    """-> (probabilities (N, outputs) float with NaN rows for errors, decisions (N, ...) int (-1 for
    errors), errors list (None or reason) per path)."""
    from tqdm.auto import tqdm

    n_out = len(clf.output_names)
    probs = np.full((len(paths), n_out), np.nan)
    errors: list = [None] * len(paths)
    loader = DataLoader(_Images(paths, clf.transform), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_collate)
    with tqdm(total=len(paths), desc="predict", unit="img", disable=not progress) as bar:
        for idx, x, bad in loader:
            for i, reason in bad:
                errors[i] = reason
            if x is not None:
                probs[idx] = clf.probabilities(clf.logits(x))
            bar.update(len(idx) + len(bad))
    ok = ~np.isnan(probs).any(1)
    if clf.task == "multiclass":
        dec = np.full(len(paths), -1, np.int64)
        if ok.any():
            dec[ok] = clf.decide(probs[ok])
    else:
        dec = np.full((len(paths), n_out), -1, np.int64)
        if ok.any():
            dec[ok] = clf.decide(probs[ok])
    return probs, dec, errors


def write_predictions(out: str, clf, paths, probs, dec, errors, digits: int = 6) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    names = clf.output_names
    if clf.task == "multiclass":
        header = ["path"] + [f"{n}_prob" for n in names] + ["predicted_class", "error"]
    else:
        header = ["path"] + [f"{n}_prob" for n in names] + [f"{n}_pred" for n in names] + ["error"]
    tmp = out + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, p in enumerate(paths):
            if errors[i] is not None:
                w.writerow([p] + [""] * (len(header) - 2) + [errors[i]])
                continue
            cells = [f"{v:.{digits}f}" for v in probs[i]]
            if clf.task == "multiclass":
                cells.append(names[int(dec[i])])
            else:
                cells += [str(int(v)) for v in dec[i]]
            w.writerow([p] + cells + [""])
    os.replace(tmp, out)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlip-predict", description=__doc__.split("\n\n")[0] + " Writes a CSV of "
                                "calibrated probabilities and decisions per label; unreadable files are listed "
                                "with their reason.")
    p.add_argument("--classifier", required=True, help="classifier folder (linear_probe/finetune --save-classifier)")
    p.add_argument("--input", required=True, help="a folder of images / DICOMs, a CSV with a path column, or one file")
    p.add_argument("--out", required=True, help="output CSV")
    p.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU; default), cpu, cuda")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding the images (default 0)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from mlip_ds.eval.classifier import ClassifierError, load_classifier

    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
        clf = load_classifier(args.classifier, device=device)
        paths, notes = list_inputs(args.input)
    except (PredictError, ClassifierError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    probs, dec, errors = predict_paths(clf, paths, batch_size=args.batch_size, workers=args.workers,
                                       progress=not args.no_progress)
    write_predictions(args.out, clf, paths, probs, dec, errors)
    n_err = sum(e is not None for e in errors)
    thr = ", ".join(f"{n} >= {v:.4g}" for n, v in clf.thresholds.items()) or "argmax"
    print(f"[predict] {len(paths) - n_err} image(s) predicted, {n_err} unreadable (listed with the reason) -> "
          f"{args.out}; device {device}; decisions: {thr}", file=sys.stderr)
    for n in notes:
        print(f"[predict] note: {n}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
