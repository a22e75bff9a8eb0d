"""Labelled image datasets for the linear probe.

Three sources, one item format. Every dataset yields ``(image_tensor, label_vector)`` where
``label_vector`` is a float32 array of length ``len(dataset.label_names)``:

* binary labels: 1.0 positive, 0.0 negative, NaN = masked out for that label (the "ignore"
  uncertain policy, or a missing value with ``missing="ignore"``);
* multi-class (class-per-folder tree with more than two classes): a single entry holding the
  class index as a float (``dataset.task == "multiclass"``, names in ``dataset.class_names``).

Sources:

(a) ``ShardLabelledDataset``  a WebDataset shard directory (``manifest.json`` decides the shard
    order when present, else the sorted ``*.tar``), a single ``.tar`` or a brace pattern
    ``dir/shard-{000000..000003}.tar``. Read once, in order (``shardshuffle=False``, not resampled).
    Labels come from the sample json ``"labels"`` (schema in ``mlip_ds/data/schema.py``).
(b) ``CsvLabelledDataset``    a CSV with an image-path column and label columns (values 1/0/-1,
    ``1.0``/``0.0``/``-1.0`` or blank). Relative paths resolve against the CSV's folder.
(c) ``FolderLabelledDataset`` ``root/<class>/<image>``. Two classes make a binary task whose one
    label is the positive class (the class that is not called "normal", else the second in sorted
    order, or ``positive_class=``); more than two make a multi-class task.

Uncertain labels (-1, CheXpert convention), ``uncertain=``:
  "ones" (default, U-Ones) -> 1, "zeros" (U-Zeros) -> 0, "ignore" -> NaN (masked for that label).
A label absent from a sample (name not in its json "labels", or a blank CSV cell) is, with the
default ``missing="zeros"``, negative (CheXpert's "not mentioned"), or masked with "ignore".

Corrupt samples (undecodable image or json, unreadable tar member) never stop the run: the
dataset warns naming the shard (or file) and key, and yields a ``Skipped`` marker in the
sample's place. ``collate_labelled`` drops the markers from a batch and hands them on, so
``mlip_ds.eval.features.extract_features`` can count them even with DataLoader workers.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import warnings
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")
MISSING_POLICIES = ("zeros", "ignore")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_SHARD_IMAGE_KEYS = ("png", "jpg", "jpeg")
_CSV_PATH_COLUMNS = ("path", "image_path", "image", "img_path", "filename", "file", "Path")
_CSV_NON_LABEL_COLUMNS = {"split", "id", "study_id", "subject_id", "patient_id", "view", "sex", "age"}


class DataPathError(FileNotFoundError):
    """A data path (shard dir, pattern, CSV, folder tree or image) does not exist or is unusable."""


class Skipped(NamedTuple):
    """Placeholder yielded instead of a sample that could not be read."""

    source: str  # shard url or image file
    key: str
    reason: str


def _warn_skip(source: str, key: str, reason: str) -> Skipped:
    warnings.warn(f"linear probe: skipping corrupt sample (shard/file {source}, key {key}): {reason}",
                  RuntimeWarning, stacklevel=3)
    return Skipped(str(source), str(key), str(reason))


# ---------------------------------------------------------------------------------------------
# labels


def encode_label(value, uncertain: str = "ones", missing: str = "zeros") -> float:
    """One raw label value (1, 0, -1, None/blank) -> 1.0 / 0.0 / NaN under the two policies."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain policy must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}")
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing policy must be one of {MISSING_POLICIES}, got {missing!r}")
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return 0.0 if missing == "zeros" else float("nan")
    v = int(float(value))
    if v == 1:
        return 1.0
    if v == 0:
        return 0.0
    if v == -1:
        return {"ones": 1.0, "zeros": 0.0, "ignore": float("nan")}[uncertain]
    raise ValueError(f"label value {value!r} is not one of 1, 0, -1")


def encode_labels(raw: dict, label_names: Sequence[str], uncertain: str = "ones",
                  missing: str = "zeros") -> np.ndarray:
    """``{"name": 1|0|-1}`` -> float32 vector over ``label_names`` (NaN = masked)."""
    return np.array([encode_label(raw.get(n), uncertain, missing) for n in label_names], dtype=np.float32)


def _load_image(data_or_path) -> Image.Image:
    """Decode fully (so truncated files fail here, not later) and return an 8-bit grayscale image.
    A DICOM path (``.dcm``, or no extension with the DICM preamble) goes through ``sources.dicom``."""
    if isinstance(data_or_path, str):
        from mlip_ds.sources.dicom import is_dicom, read_dicom
        if is_dicom(data_or_path):
            return read_dicom(data_or_path)[0]
    src = io.BytesIO(data_or_path) if isinstance(data_or_path, (bytes, bytearray)) else data_or_path
    with Image.open(src) as im:
        im.load()
        return im.convert("L")


# ---------------------------------------------------------------------------------------------
# (a) WebDataset shards


def resolve_shards(spec: str) -> tuple[list[str], dict | None]:
    """Shard directory / single tar / brace pattern -> (ordered shard paths, manifest or None).

    Raises DataPathError naming the path when nothing usable is there.
    """
    import braceexpand

    spec = str(spec)
    if os.path.isdir(spec):
        manifest_path = os.path.join(spec, "manifest.json")
        if os.path.isfile(manifest_path):
            with open(manifest_path) as f:
                manifest = json.load(f)
            files = [os.path.join(spec, s["file"]) for s in manifest.get("shards", [])]
            missing = [p for p in files if not os.path.isfile(p)]
            if missing:
                raise DataPathError(f"{manifest_path} lists shards that do not exist: {missing[:5]}")
            if not files:
                raise DataPathError(f"{manifest_path} lists no shards")
            return files, manifest
        files = sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not files:
            raise DataPathError(f"shard directory {spec} has no manifest.json and no *.tar files")
        return files, None
    files = list(braceexpand.braceexpand(spec))
    missing = [p for p in files if not os.path.isfile(p)]
    if missing:
        raise DataPathError(f"shard path/pattern {spec}: not found: {missing[:5]}"
                            + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    manifest = None
    parent = os.path.dirname(files[0])
    if os.path.isfile(os.path.join(parent, "manifest.json")):
        with open(os.path.join(parent, "manifest.json")) as f:
            manifest = json.load(f)
    return files, manifest


class ShardLabelledDataset(IterableDataset):
    """Labelled samples from WebDataset shards, in deterministic order (see module docstring).

    ``label_names`` default: the manifest's "label_names", else ``mlip_ds.data.schema.FINDINGS``.
    With DataLoader workers the shards are split round-robin between workers (order is then
    interleaved by batch, deterministic for a fixed ``num_workers``).
    """

    task = "binary"

    def __init__(self, spec: str, label_names: Sequence[str] | None = None,
                 transform: Callable | None = None, uncertain: str = "ones", missing: str = "zeros"):
        encode_label(1, uncertain, missing)  # validates both policies early
        self.spec = str(spec)
        self.shards, self.manifest = resolve_shards(self.spec)
        if label_names is None:
            if self.manifest and self.manifest.get("label_names"):
                label_names = list(self.manifest["label_names"])
            else:
                from mlip_ds.data.schema import FINDINGS
                label_names = list(FINDINGS)
        label_names = list(label_names)
        if self.manifest and self.manifest.get("label_names"):
            unknown = [n for n in label_names if n not in self.manifest["label_names"]]
            if unknown:
                raise ValueError(f"labels {unknown} are not in the manifest of {self.spec} "
                                 f"(label_names: {self.manifest['label_names']})")
        self.label_names = label_names
        self.class_names = None
        self.transform = transform
        self.uncertain = uncertain
        self.missing = missing
        self.skipped: list[Skipped] = []  # filled in-process; extract_features fills it from workers too
        self.num_samples_hint = None
        if self.manifest:
            by_file = {os.path.join(os.path.dirname(self.shards[0]), s["file"]): s.get("num_samples")
                       for s in self.manifest.get("shards", [])}
            counts = [by_file.get(p) for p in self.shards]
            if all(isinstance(c, int) for c in counts):
                self.num_samples_hint = int(sum(counts))

    def __repr__(self):
        return f"ShardLabelledDataset({self.spec!r}, {len(self.shards)} shards, labels={self.label_names})"

    def __iter__(self):
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        shards = self.shards if info is None else self.shards[info.id::info.num_workers]
        for shard in shards:
            # one pipeline per shard, so that a tar-level error can name its shard
            pending: list[Skipped] = []

            def handler(exn: Exception, shard=shard, pending=pending) -> bool:
                msg = str(exn.args[0]) if exn.args else repr(exn)
                pending.append(_warn_skip(shard, "?", f"unreadable tar data: {type(exn).__name__}: {msg}"))
                return True

            pipe = wds.WebDataset([shard], shardshuffle=False, resampled=False, handler=handler,
                                  nodesplitter=None, workersplitter=None, empty_check=False)
            for sample in pipe:
                while pending:
                    yield self._record(pending.pop(0))
                yield self._record(self._decode(sample))
            while pending:
                yield self._record(pending.pop(0))

    def _record(self, item):
        if isinstance(item, Skipped):
            self.skipped.append(item)
        return item

    def _decode(self, sample: dict):
        key = sample.get("__key__", "?")
        url = sample.get("__url__", "?")
        try:
            img_key = next((k for k in _SHARD_IMAGE_KEYS if k in sample), None)
            if img_key is None:
                raise KeyError(f"no image member (looked for {_SHARD_IMAGE_KEYS}); members: "
                               f"{sorted(k for k in sample if not k.startswith('__'))}")
            if "json" not in sample:
                raise KeyError("no json member")
            meta = json.loads(sample["json"])
            labels = encode_labels(meta.get("labels") or {}, self.label_names, self.uncertain, self.missing)
            image = _load_image(sample[img_key])
            if self.transform is not None:
                image = self.transform(image)
        except Exception as exn:  # noqa: BLE001 - any undecodable sample is skipped, not fatal
            return _warn_skip(url, key, f"{type(exn).__name__}: {exn}")
        return image, labels


# ---------------------------------------------------------------------------------------------
# (b) CSV


def _parse_label_cell(v: str) -> bool:
    v = (v or "").strip()
    if v == "":
        return True
    try:
        return float(v) in (1.0, 0.0, -1.0)
    except ValueError:
        return False


class _ImageFileDataset(Dataset):
    """Images listed by path with a label matrix; a corrupt image is skipped and recorded."""

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        try:
            image = _load_image(path)
            if self.transform is not None:
                image = self.transform(image)
        except Exception as exn:  # noqa: BLE001
            item = _warn_skip(path, str(i), f"{type(exn).__name__}: {exn}")
            self.skipped.append(item)
            return item
        return image, self.labels[i].copy()


class CsvLabelledDataset(_ImageFileDataset):
    """Rows of a CSV: one image-path column + label columns.

    ``image_column``: default the first of ``path, image_path, image, img_path, filename, file``.
    ``label_names``: default every other column whose values are all 1/0/-1/blank (minus split/id
    columns). ``split``: keep only rows whose ``split_column`` equals it. ``image_root``: where
    relative paths start (default: the CSV's folder).
    """

    task = "binary"

    def __init__(self, csv_path: str, label_names: Sequence[str] | None = None,
                 transform: Callable | None = None, uncertain: str = "ones", missing: str = "zeros",
                 image_column: str | None = None, image_root: str | None = None,
                 split: str | None = None, split_column: str = "split"):
        encode_label(1, uncertain, missing)
        self.csv_path = str(csv_path)
        if not os.path.isfile(self.csv_path):
            raise DataPathError(f"CSV file not found: {self.csv_path}")
        with open(self.csv_path, newline="") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
        if not columns:
            raise ValueError(f"{self.csv_path}: empty CSV (no header)")
        if image_column is None:
            image_column = next((c for c in _CSV_PATH_COLUMNS if c in columns), None)
            if image_column is None:
                raise ValueError(f"{self.csv_path}: no image-path column found (looked for "
                                 f"{_CSV_PATH_COLUMNS}; columns: {columns}); pass image_column=")
        elif image_column not in columns:
            raise ValueError(f"{self.csv_path}: image column {image_column!r} not in {columns}")
        if split is not None:
            if split_column not in columns:
                raise ValueError(f"{self.csv_path}: split={split!r} given but no {split_column!r} column")
            rows = [r for r in rows if r[split_column] == split]
        if label_names is None:
            label_names = [c for c in columns
                           if c != image_column and c not in _CSV_NON_LABEL_COLUMNS
                           and rows and all(_parse_label_cell(r[c]) for r in rows)]
            if not label_names:
                raise ValueError(f"{self.csv_path}: no label columns (1/0/-1/blank) found; pass label_names=")
        label_names = list(label_names)
        unknown = [n for n in label_names if n not in columns]
        if unknown:
            raise ValueError(f"{self.csv_path}: label columns {unknown} not in {columns}")
        root = image_root if image_root is not None else os.path.dirname(os.path.abspath(self.csv_path))
        self.paths = [r[image_column] if os.path.isabs(r[image_column]) else os.path.join(root, r[image_column])
                      for r in rows]
        try:
            self.labels = np.stack([encode_labels(r, label_names, uncertain, missing) for r in rows]) \
                if rows else np.zeros((0, len(label_names)), np.float32)
        except ValueError as exn:
            raise ValueError(f"{self.csv_path}: {exn}") from exn
        self.label_names = label_names
        self.class_names = None
        self.transform = transform
        self.skipped: list[Skipped] = []
        self.num_samples_hint = len(self.paths)

    def __repr__(self):
        return f"CsvLabelledDataset({self.csv_path!r}, {len(self)} rows, labels={self.label_names})"



# ---------------------------------------------------------------------------------------------
# (c) class-per-folder tree


def _default_positive(class_names: Sequence[str]) -> str:
    normal = [c for c in class_names if c.lower() in ("normal", "negative", "no_finding", "healthy")]
    if len(normal) == 1:
        return next(c for c in class_names if c != normal[0])
    return sorted(class_names)[1]


class FolderLabelledDataset(_ImageFileDataset):
    """``root/<class>/<image>``; classes are the sub-folders in sorted order.

    Two classes: binary, ``label_names == [positive_class]``. More: multi-class,
    ``label_names == ["class"]`` and the label is the class index into ``class_names``.
    ``class_names`` may be passed (e.g. the train split's) so that test indices match.
    """

    def __init__(self, root: str, transform: Callable | None = None, class_names: Sequence[str] | None = None,
                 positive_class: str | None = None):
        self.root = str(root)
        if not os.path.isdir(self.root):
            raise DataPathError(f"image folder tree not found: {self.root}")
        found = sorted(d for d in os.listdir(self.root) if os.path.isdir(os.path.join(self.root, d)))
        if class_names is None:
            class_names = found
        class_names = list(class_names)
        extra = sorted(set(found) - set(class_names))
        if extra:
            raise ValueError(f"{self.root}: class folders {extra} are not among the expected classes {class_names}")
        if len(class_names) < 2:
            raise ValueError(f"{self.root}: need at least 2 class sub-folders, found {found}")
        self.class_names = class_names
        self.paths: list[str] = []
        targets: list[int] = []
        for ci, c in enumerate(class_names):
            d = os.path.join(self.root, c)
            if not os.path.isdir(d):
                continue  # a class absent from this split: no samples of it
            for name in sorted(os.listdir(d)):
                if name.lower().endswith(IMAGE_EXTS):
                    self.paths.append(os.path.join(d, name))
                    targets.append(ci)
        if not self.paths:
            raise DataPathError(f"{self.root}: no images ({IMAGE_EXTS}) under the class folders {class_names}")
        self.targets = np.asarray(targets, dtype=np.int64)
        if len(class_names) == 2:
            self.task = "binary"
            pos = positive_class if positive_class is not None else _default_positive(class_names)
            if pos not in class_names:
                raise ValueError(f"positive_class {pos!r} not in {class_names}")
            self.positive_class = pos
            self.label_names = [pos]
            self.labels = (self.targets == class_names.index(pos)).astype(np.float32)[:, None]
        else:
            self.task = "multiclass"
            self.positive_class = None
            self.label_names = ["class"]
            self.labels = self.targets.astype(np.float32)[:, None]
        self.transform = transform
        self.skipped: list[Skipped] = []
        self.num_samples_hint = len(self.paths)

    def __repr__(self):
        return f"FolderLabelledDataset({self.root!r}, {len(self)} images, classes={self.class_names})"



# ---------------------------------------------------------------------------------------------
# helpers


def collate_labelled(batch):
    """Collate ``(image, labels)`` items, dropping ``Skipped`` markers.

    Returns ``(images or None, labels or None, skipped_list)``.
    """
    skipped = [b for b in batch if isinstance(b, Skipped)]
    good = [b for b in batch if not isinstance(b, Skipped)]
    if not good:
        return None, None, skipped
    images = torch.stack([torch.as_tensor(b[0]) for b in good])
    labels = torch.from_numpy(np.stack([np.asarray(b[1], dtype=np.float32) for b in good]))
    return images, labels, skipped


def detect_kind(path: str) -> str:
    """"csv", "folder" (class sub-folders with images, no manifest/tars) or "shards"."""
    p = str(path)
    if p.lower().endswith(".csv"):
        return "csv"
    if os.path.isdir(p):
        if os.path.isfile(os.path.join(p, "manifest.json")) or glob.glob(os.path.join(p, "*.tar")):
            return "shards"
        return "folder"
    return "shards"


def open_labelled_dataset(path: str, transform: Callable | None = None, label_names: Sequence[str] | None = None,
                          uncertain: str = "ones", missing: str = "zeros", split: str | None = None,
                          class_names: Sequence[str] | None = None, kind: str | None = None):
    """Open any of the three sources by looking at ``path`` (see ``detect_kind``).

    Raises DataPathError naming the path when it does not exist.
    """
    p = str(path)
    if ("{" not in p) and not os.path.exists(p):
        raise DataPathError(f"data path not found: {p}")
    kind = kind or detect_kind(p)
    if kind == "csv":
        return CsvLabelledDataset(p, label_names=label_names, transform=transform, uncertain=uncertain,
                                  missing=missing, split=split)
    if kind == "folder":
        return FolderLabelledDataset(p, transform=transform, class_names=class_names)
    if kind == "shards":
        return ShardLabelledDataset(p, label_names=label_names, transform=transform, uncertain=uncertain,
                                    missing=missing)
    raise ValueError(f"unknown data kind {kind!r}")
