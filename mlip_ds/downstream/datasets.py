"""Detection / segmentation data: readers for the official layouts, RLE, splits and label fractions.

Every reader returns a ``DataSource``: lists of ``Record`` (one per image) for ``train`` and, where
the layout defines one, ``test``; ``class_names``; ``notes`` (rows that were skipped and why). A
record holds the image (a path or encoded bytes), its boxes in *original* pixels (``[x0, y0, x1,
y1]``, exclusive ends, 1-based class ``labels``) and/or a lazy mask source, and ``positive`` (the
image has a lesion). ``TransferDataset`` loads, resizes to a square ``image_size`` and converts
between the two annotation kinds where the task needs it: boxes are filled into a mask for
segmentation (MGCA's "RSNA boxes as masks"), a mask's 8-connected components become boxes for
detection.

``--data KIND:PATH`` kinds (``open_data``):

========== ====================================================================================
rsna       RSNA Pneumonia Detection: ``stage_2_train_labels.csv`` (``patientId,x,y,width,height,
           Target``; one row per box, ``Target`` 0 = no box) in PATH (or PATH is the CSV); images
           ``<patientId>.dcm`` anywhere under PATH (pydicom), or ``.png`` / ``.jpg`` with the same id.
object-cxr Object-CXR: ``train.csv`` (+ ``dev.csv``, then the test split) with ``image_name,
           annotation``; images in ``train/`` / ``dev/`` (or anywhere under PATH). Annotations are
           ``;``-separated: ``0 x1 y1 x2 y2`` rectangle, ``1 x1 y1 x2 y2`` ellipse (its bounding box),
           ``2 x1 y1 x2 y2 ... xn yn`` polygon (the box of its vertices); masks draw the shapes.
boxes-csv  a CSV of boxes: ``image,x0,y0,x1,y1[,label][,split]``, one row per box, blank
           coordinates = an image without lesions; paths relative to the CSV; ``split`` = train/test.
siim       SIIM-ACR Pneumothorax: a CSV with ``ImageId, EncodedPixels`` (``train-rle.csv`` /
           ``stage_2_train.csv``; several rows per image are OR-ed; ``-1`` = empty) and images
           ``<ImageId>.dcm`` (or .png/.jpg) under PATH. RLE: column-major (down the columns, then
           left to right); ``rle_mode="relative"`` (the competition's ``mask_functions.py``: each start
           is an offset from the end of the previous run, 0-based) or ``"standard"`` (1-based
           absolute starts, the stage-2 submission format).
mask-folder  ``PATH/images/<name>.<ext>`` + ``PATH/masks/<name>[_mask].<ext>`` (non-zero = lesion), or
           ``PATH/train/{images,masks}`` + ``PATH/test/{images,masks}``.
synthetic  mlip-ds shards: ``meta.findings`` boxes (shard pixels) and ``seg.png`` bit masks;
           ``finding`` = one of ``FINDINGS`` or ``"any"`` (every finding, one class).
========== ====================================================================================

Splits (``split_records``): without a predefined test split, a seeded split stratified by
``positive``, so images without lesions stay in the test set (and count: false positives on them
lower mAP). Label fractions (``fraction_subset``): a seeded subset of the training records,
``round(fraction * n)`` images, stratified by ``positive`` with at least one image of each kind.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_EXTS = (".dcm", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
KINDS = ("rsna", "object-cxr", "boxes-csv", "siim", "mask-folder", "synthetic")
RLE_MODES = ("relative", "standard")


class DataError(ValueError):
    """A data path or file that cannot be used; the message names the file and what is wrong."""


# ---------------------------------------------------------------------------------------------
# records and mask sources


@dataclass
class Record:
    id: str
    image: str | bytes
    boxes: np.ndarray | None = None  # (N, 4) float32, original pixels, exclusive ends
    labels: np.ndarray | None = None  # (N,) int64, 1-based class index
    mask: Callable | None = None  # mask(width, height) -> uint8 (H, W) in {0, 1}
    positive: bool = False

    def __post_init__(self):
        if self.boxes is not None:
            self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
            if self.labels is None:
                self.labels = np.ones(len(self.boxes), np.int64)
            self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)


@dataclass
class DataSource:
    kind: str
    path: str
    train: list
    test: list | None
    class_names: list
    notes: list = field(default_factory=list)


def _fit(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    mask = (np.asarray(mask) > 0).astype(np.uint8)
    if mask.shape != (height, width):
        mask = np.asarray(Image.fromarray(mask * 255).resize((width, height), Image.NEAREST)) > 0
    return mask.astype(np.uint8)


class BoxMask:
    """Filled boxes (pixels whose centres lie inside)."""

    def __init__(self, boxes):
        self.boxes = np.asarray(boxes, np.float32).reshape(-1, 4)

    def __call__(self, width: int, height: int) -> np.ndarray:
        m = np.zeros((height, width), np.uint8)
        for x0, y0, x1, y1 in self.boxes:
            xa, ya = max(0, int(np.floor(x0 + 0.5))), max(0, int(np.floor(y0 + 0.5)))
            xb, yb = min(width, int(np.floor(x1 + 0.5))), min(height, int(np.floor(y1 + 0.5)))
            m[ya:yb, xa:xb] = 1
        return m


class ShapeMask:
    """Object-CXR shapes: ("rect" | "ellipse", [x1, y1, x2, y2]) or ("polygon", [x1, y1, ...])."""

    def __init__(self, shapes):
        self.shapes = list(shapes)

    def __call__(self, width: int, height: int) -> np.ndarray:
        im = Image.new("L", (width, height), 0)
        d = ImageDraw.Draw(im)
        for kind, pts in self.shapes:
            corners = [min(pts[0], pts[2]), min(pts[1], pts[3]), max(pts[0], pts[2]), max(pts[1], pts[3])]
            if kind == "rect":
                d.rectangle(corners, fill=1)
            elif kind == "ellipse":
                d.ellipse(corners, fill=1)
            else:
                d.polygon([(pts[i], pts[i + 1]) for i in range(0, len(pts) - 1, 2)], fill=1)
        return np.asarray(im, np.uint8)


class RleMask:
    """The union of SIIM RLE strings, decoded at the image's size."""

    def __init__(self, rles: Sequence[str], mode: str = "relative"):
        self.rles = [r for r in rles if r.strip() not in ("", "-1")]
        self.mode = mode

    def __call__(self, width: int, height: int) -> np.ndarray:
        m = np.zeros((height, width), np.uint8)
        for r in self.rles:
            m |= rle_decode(r, height, width, self.mode)
        return m


class FileMask:
    def __init__(self, path: str):
        self.path = path

    def __call__(self, width: int, height: int) -> np.ndarray:
        with Image.open(self.path) as im:
            im.load()
            arr = np.asarray(im.convert("L") if im.mode not in ("L", "1", "I", "I;16") else im)
        return _fit(arr, width, height)


class BitMask:
    """A synthetic shard's ``seg.png``: bit ``bit`` (or any bit with ``bit=None``)."""

    def __init__(self, png: bytes, bit: int | None):
        self.png = png
        self.bit = bit

    def __call__(self, width: int, height: int) -> np.ndarray:
        with Image.open(io.BytesIO(self.png)) as im:
            seg = np.asarray(im)
        m = seg != 0 if self.bit is None else (seg & np.uint8(1 << self.bit)) != 0
        return _fit(m, width, height)


# ---------------------------------------------------------------------------------------------
# RLE (SIIM-ACR: column-major)


def rle_decode(rle: str, height: int, width: int, mode: str = "relative") -> np.ndarray:
    """RLE string -> uint8 (height, width) mask; pixels are numbered down the columns (column-major).

    ``relative``: pairs (offset, length), each offset counted from the end of the previous run
    (0-based), as in the SIIM-ACR ``mask_functions.rle2mask``. ``standard``: pairs (start, length)
    with 1-based absolute starts. ``"-1"`` / empty -> an empty mask.
    """
    if mode not in RLE_MODES:
        raise ValueError(f"rle mode must be one of {RLE_MODES}, got {mode!r}")
    s = (rle or "").strip()
    flat = np.zeros(height * width, np.uint8)
    if s in ("", "-1"):
        return flat.reshape(width, height).T.copy()
    try:
        nums = np.array([int(float(v)) for v in s.split()], dtype=np.int64)
    except ValueError as exn:
        raise DataError(f"bad RLE string {s[:60]!r}: {exn}") from None
    if len(nums) % 2:
        raise DataError(f"bad RLE string (odd number of values): {s[:60]!r}")
    pos = 0
    for a, n in zip(nums[0::2], nums[1::2]):
        if n < 0 or a < 0:
            raise DataError(f"bad RLE string (negative value): {s[:60]!r}")
        start = pos + a if mode == "relative" else a - 1
        if start < 0 or start + n > flat.size:
            other = "standard" if mode == "relative" else "relative"
            raise DataError(f"RLE run [{start}, {start + n}) lies outside a {height}x{width} image "
                            f"({mode} RLE); is it {other} RLE (rle_mode / --rle {other})?")
        flat[start:start + n] = 1
        pos = start + n
    return flat.reshape(width, height).T.copy()


def rle_encode(mask: np.ndarray, mode: str = "relative") -> str:
    """uint8/bool (height, width) mask -> RLE string (column-major); an empty mask -> ``"-1"``."""
    if mode not in RLE_MODES:
        raise ValueError(f"rle mode must be one of {RLE_MODES}, got {mode!r}")
    flat = (np.asarray(mask).T.reshape(-1) > 0).astype(np.int8)
    if not flat.any():
        return "-1"
    d = np.diff(np.concatenate([[0], flat, [0]]))
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    out, pos = [], 0
    for a, b in zip(starts, ends):
        out += [int(a - pos) if mode == "relative" else int(a + 1), int(b - a)]
        pos = b
    return " ".join(map(str, out))


# ---------------------------------------------------------------------------------------------
# image loading


def _is_dicom(src) -> bool:
    if isinstance(src, (bytes, bytearray)):
        return len(src) > 132 and bytes(src[128:132]) == b"DICM"
    if str(src).lower().endswith(".dcm"):
        return True
    try:
        with open(src, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr, np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def load_dicom(src) -> np.ndarray:
    try:
        import pydicom
    except ImportError as exn:  # pragma: no cover - pydicom is a declared extra
        raise DataError(f"reading DICOM needs pydicom (pip install pydicom): {exn}") from None
    ds = pydicom.dcmread(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src, force=True)
    arr = ds.pixel_array
    if arr.ndim == 3:  # multi-frame: first frame; colour: mean over channels
        arr = arr.mean(-1) if getattr(ds, "SamplesPerPixel", 1) > 1 else arr[0]
    arr = np.asarray(arr, np.float64)
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut

        arr = apply_modality_lut(arr, ds)
        if "WindowCenter" in ds or "VOILUTSequence" in ds:
            arr = apply_voi_lut(arr, ds)
    except Exception:  # noqa: BLE001 - LUTs are optional refinements; raw values still make an image
        pass
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = arr.max() - arr
    return _to_uint8(arr)


def load_gray(src) -> np.ndarray:
    """A path or encoded bytes (PNG/JPEG/... or DICOM) -> uint8 (H, W); 16-bit is min-max scaled."""
    if _is_dicom(src):
        return load_dicom(src)
    with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as im:
        im.load()
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            return _to_uint8(np.asarray(im))
        return np.asarray(im.convert("L"), np.uint8)


def mask_to_boxes(mask: np.ndarray) -> np.ndarray:
    """8-connected components of a mask -> (N, 4) boxes ``[x0, y0, x1, y1]`` (exclusive ends)."""
    from scipy import ndimage

    lab, n = ndimage.label(np.asarray(mask) > 0, structure=np.ones((3, 3), int))
    boxes = [[sl[1].start, sl[0].start, sl[1].stop, sl[0].stop] for sl in ndimage.find_objects(lab) if sl]
    return np.asarray(boxes, np.float32).reshape(-1, 4)


# ---------------------------------------------------------------------------------------------
# readers


def _index_images(root: str) -> dict:
    """stem -> path of every image under root; .dcm first, then .png, .jpg, ... when a stem repeats."""
    found: dict[str, str] = {}
    rank = {e: i for i, e in enumerate(IMAGE_EXTS)}
    for d, _, files in os.walk(root):
        for name in files:
            stem, ext = os.path.splitext(name)
            ext = ext.lower()
            if ext in rank:
                p = os.path.join(d, name)
                if stem not in found or rank[ext] < rank[os.path.splitext(found[stem])[1].lower()]:
                    found[stem] = p
    return found


def _read_csv(path: str) -> tuple[list, list]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = [c for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    return [c.strip() for c in cols], rows


def _need(cols, wanted, path):
    missing = [c for c in wanted if c not in cols]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} (columns: {cols})")


def _missing_note(kind, ids, where):
    if not ids:
        return []
    return [f"{kind}: {len(ids)} image(s) listed in {where} not found, skipped (e.g. {ids[:3]})"]


def _find_csv(path: str, names: Sequence[str], what: str) -> tuple[str, str]:
    """(csv path, image root) from PATH = a CSV or a folder holding one of ``names``."""
    if os.path.isfile(path):
        return path, os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(path):
        raise DataError(f"{what}: {path} not found")
    for n in names:
        if os.path.isfile(os.path.join(path, n)):
            return os.path.join(path, n), path
    raise DataError(f"{what}: no {' / '.join(names)} in {path}")


def read_rsna(path: str) -> DataSource:
    csv_path, root = _find_csv(path, ("stage_2_train_labels.csv", "stage_1_train_labels.csv"), "rsna")
    cols, rows = _read_csv(csv_path)
    _need(cols, ["patientId", "x", "y", "width", "height", "Target"], csv_path)
    images = _index_images(root)
    order, boxes = [], {}
    for r in rows:
        pid = r["patientId"]
        if pid not in boxes:
            order.append(pid)
            boxes[pid] = []
        if r["Target"] not in ("", "0", "0.0") and r["x"] != "":
            x, y, w, h = (float(r[k]) for k in ("x", "y", "width", "height"))
            if w > 0 and h > 0:
                boxes[pid].append([x, y, x + w, y + h])
    recs, missing = [], []
    for pid in order:
        if pid not in images:
            missing.append(pid)
            continue
        recs.append(Record(pid, images[pid], boxes=np.asarray(boxes[pid], np.float32).reshape(-1, 4),
                           positive=bool(boxes[pid])))
    if not recs:
        raise DataError(f"rsna: none of the {len(order)} patientIds of {csv_path} has an image "
                        f"(<patientId>.dcm/.png/.jpg) under {root}")
    return DataSource("rsna", path, recs, None, ["pneumonia"], _missing_note("rsna", missing, csv_path))


def parse_object_cxr(annotation: str) -> tuple[np.ndarray, list]:
    """Object-CXR annotation -> ((N, 4) boxes, shapes for ShapeMask)."""
    boxes, shapes = [], []
    for part in (annotation or "").split(";"):
        vals = part.strip().split()
        if not vals:
            continue
        kind = vals[0]
        pts = [float(v) for v in vals[1:]]
        if kind not in ("0", "1", "2") or len(pts) < 4 or len(pts) % 2:
            raise DataError(f"bad Object-CXR annotation {part.strip()[:60]!r} (expected '0|1 x1 y1 x2 y2' "
                            "or '2 x1 y1 ... xn yn')")
        xs, ys = pts[0::2], pts[1::2]
        x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
        if x1 > x0 and y1 > y0:
            boxes.append([x0, y0, x1, y1])
            shapes.append(({"0": "rect", "1": "ellipse", "2": "polygon"}[kind], pts))
    return np.asarray(boxes, np.float32).reshape(-1, 4), shapes


def _object_cxr_records(csv_path: str, image_dirs: Sequence[str]) -> tuple[list, list]:
    cols, rows = _read_csv(csv_path)
    _need(cols, ["image_name", "annotation"], csv_path)
    index: dict = {}
    for d in image_dirs:
        if os.path.isdir(d):
            for name in sorted(os.listdir(d)):
                index.setdefault(name, os.path.join(d, name))
    recs, missing = [], []
    for r in rows:
        name = r["image_name"]
        p = index.get(name) or index.get(os.path.basename(name))
        if p is None:
            missing.append(name)
            continue
        try:
            boxes, shapes = parse_object_cxr(r["annotation"])
        except DataError as exn:
            raise DataError(f"{csv_path}, image {name}: {exn}") from None
        recs.append(Record(os.path.splitext(name)[0], p, boxes=boxes, mask=ShapeMask(shapes),
                           positive=len(boxes) > 0))
    return recs, _missing_note("object-cxr", missing, csv_path)


def read_object_cxr(path: str) -> DataSource:
    if os.path.isfile(path):
        root = os.path.dirname(os.path.abspath(path))
        stem = os.path.splitext(os.path.basename(path))[0]
        train, notes = _object_cxr_records(path, [os.path.join(root, stem), root])
        return DataSource("object-cxr", path, train, None, ["foreign_object"], notes)
    csv_path, root = _find_csv(path, ("train.csv",), "object-cxr")
    train, notes = _object_cxr_records(csv_path, [os.path.join(root, "train"), root])
    test = None
    if os.path.isfile(os.path.join(root, "dev.csv")):
        test, n2 = _object_cxr_records(os.path.join(root, "dev.csv"), [os.path.join(root, "dev"), root])
        notes += n2
    if not train:
        raise DataError(f"object-cxr: no images of {csv_path} found in {root}/train or {root}")
    return DataSource("object-cxr", path, train, test, ["foreign_object"], notes)


def read_boxes_csv(path: str) -> DataSource:
    if not os.path.isfile(path):
        raise DataError(f"boxes-csv: {path} not found")
    cols, rows = _read_csv(path)
    _need(cols, ["image", "x0", "y0", "x1", "y1"], path)
    root = os.path.dirname(os.path.abspath(path))
    has_label, has_split = "label" in cols, "split" in cols
    class_names = sorted({r["label"] for r in rows if has_label and r["label"] and r["x0"]}) or ["lesion"]
    cid = {n: i + 1 for i, n in enumerate(class_names)}
    order, data = [], {}
    for i, r in enumerate(rows, start=2):
        img = r["image"]
        if img not in data:
            order.append(img)
            data[img] = {"boxes": [], "labels": [], "split": r.get("split", "") if has_split else ""}
        if r["x0"] != "":
            try:
                b = [float(r[k]) for k in ("x0", "y0", "x1", "y1")]
            except ValueError:
                raise DataError(f"{path}, line {i}: bad box {[r[k] for k in ('x0', 'y0', 'x1', 'y1')]}") from None
            if b[2] <= b[0] or b[3] <= b[1]:
                raise DataError(f"{path}, line {i}: box {b} has x1 <= x0 or y1 <= y0")
            data[img]["boxes"].append(b)
            data[img]["labels"].append(cid[r["label"]] if has_label and r["label"] else 1)
    train, test, missing = [], [], []
    for img in order:
        p = img if os.path.isabs(img) else os.path.join(root, img)
        if not os.path.isfile(p):
            missing.append(img)
            continue
        d = data[img]
        rec = Record(os.path.splitext(img)[0], p, boxes=np.asarray(d["boxes"], np.float32).reshape(-1, 4),
                     labels=np.asarray(d["labels"], np.int64), positive=bool(d["boxes"]))
        (test if d["split"].lower() == "test" else train).append(rec)
    if not train:
        raise DataError(f"boxes-csv: no usable training images in {path}")
    return DataSource("boxes-csv", path, train, test if has_split else None, class_names,
                      _missing_note("boxes-csv", missing, path))


def read_siim(path: str, rle_mode: str = "relative") -> DataSource:
    if rle_mode not in RLE_MODES:
        raise DataError(f"siim: rle mode must be one of {RLE_MODES}, got {rle_mode!r}")
    csv_path, root = _find_csv(path, ("train-rle.csv", "stage_2_train.csv", "train.csv"), "siim")
    cols, rows = _read_csv(csv_path)
    _need(cols, ["ImageId", "EncodedPixels"], csv_path)
    images = _index_images(root)
    order, rles = [], {}
    for r in rows:
        iid = r["ImageId"]
        if iid not in rles:
            order.append(iid)
            rles[iid] = []
        rles[iid].append(r["EncodedPixels"])
    recs, missing = [], []
    for iid in order:
        if iid not in images:
            missing.append(iid)
            continue
        m = RleMask(rles[iid], rle_mode)
        recs.append(Record(iid, images[iid], mask=m, positive=bool(m.rles)))
    if not recs:
        raise DataError(f"siim: none of the {len(order)} ImageIds of {csv_path} has an image under {root}")
    return DataSource("siim", path, recs, None, ["pneumothorax"], _missing_note("siim", missing, csv_path))


def _mask_pairs(root: str) -> tuple[list, list]:
    img_dir, mask_dir = os.path.join(root, "images"), os.path.join(root, "masks")
    if not (os.path.isdir(img_dir) and os.path.isdir(mask_dir)):
        raise DataError(f"mask-folder: {root} needs images/ and masks/ sub-folders")
    masks = {}
    for name in sorted(os.listdir(mask_dir)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTS:
            masks.setdefault(stem, os.path.join(mask_dir, name))
            if stem.endswith("_mask"):
                masks.setdefault(stem[:-5], os.path.join(mask_dir, name))
    recs, missing = [], []
    for name in sorted(os.listdir(img_dir)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTS:
            continue
        if stem not in masks:
            missing.append(name)
            continue
        with Image.open(masks[stem]) as im:
            positive = bool(np.asarray(im).any())
        recs.append(Record(stem, os.path.join(img_dir, name), mask=FileMask(masks[stem]), positive=positive))
    notes = [f"mask-folder: {len(missing)} image(s) in {img_dir} have no mask, skipped (e.g. {missing[:3]})"] \
        if missing else []
    return recs, notes


def read_mask_folder(path: str) -> DataSource:
    if not os.path.isdir(path):
        raise DataError(f"mask-folder: {path} not found")
    if os.path.isdir(os.path.join(path, "train")) and os.path.isdir(os.path.join(path, "test")):
        train, n1 = _mask_pairs(os.path.join(path, "train"))
        test, n2 = _mask_pairs(os.path.join(path, "test"))
        return DataSource("mask-folder", path, train, test, ["lesion"], n1 + n2)
    recs, notes = _mask_pairs(path)
    if not recs:
        raise DataError(f"mask-folder: no image/mask pairs in {path}")
    return DataSource("mask-folder", path, recs, None, ["lesion"], notes)


def _shard_files(path: str) -> list:
    if os.path.isfile(path) and path.endswith(".tar"):
        return [path]
    if not os.path.isdir(path):
        raise DataError(f"synthetic: shard folder {path} not found")
    man = os.path.join(path, "manifest.json")
    if os.path.isfile(man):
        with open(man) as f:
            files = [os.path.join(path, s["file"]) for s in json.load(f).get("shards", [])]
    else:
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".tar"))
    if not files:
        raise DataError(f"synthetic: no shards in {path}")
    return files


def read_synthetic(path: str, finding: str = "any") -> DataSource:
    from mlip_ds.data.schema import FINDINGS

    if finding != "any" and finding not in FINDINGS:
        raise DataError(f"synthetic: finding must be 'any' or one of {list(FINDINGS)}, got {finding!r}")
    bit = None if finding == "any" else FINDINGS.index(finding)
    recs, notes = [], []
    for shard in _shard_files(path):
        groups: dict = {}
        order = []
        with tarfile.open(shard) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                key, _, ext = base.partition(".")
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext] = tf.extractfile(m).read()
        for key in order:
            g = groups[key]
            img = g.get("png") or g.get("jpg")
            if img is None or "json" not in g or "seg.png" not in g:
                notes.append(f"synthetic: {os.path.basename(shard)}/{key} lacks image, json or seg.png, skipped")
                continue
            meta = json.loads(g["json"])
            found = (meta.get("meta") or {}).get("findings") or []
            boxes = []
            for fd in found:
                if finding != "any" and fd.get("name") != finding:
                    continue
                b = [float(v) for v in fd["bbox"]]
                if b[2] > b[0] and b[3] > b[1] and b not in boxes:
                    boxes.append(b)
            recs.append(Record(key, img, boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                               mask=BitMask(g["seg.png"], bit), positive=bool(boxes)))
    if not recs:
        raise DataError(f"synthetic: no usable samples in {path}")
    return DataSource("synthetic", path, recs, None, [finding if finding != "any" else "any_finding"], notes)


def parse_data_spec(spec: str) -> tuple[str, str]:
    kind, sep, path = spec.partition(":")
    if not sep or kind not in KINDS or not path:
        raise DataError(f"--data {spec!r}: expected KIND:PATH with KIND one of {list(KINDS)}")
    return kind, path


def open_data(spec: str, finding: str = "any", rle_mode: str = "relative") -> DataSource:
    """``KIND:PATH`` -> DataSource (see the module docstring)."""
    kind, path = parse_data_spec(spec)
    if kind == "rsna":
        return read_rsna(path)
    if kind == "object-cxr":
        return read_object_cxr(path)
    if kind == "boxes-csv":
        return read_boxes_csv(path)
    if kind == "siim":
        return read_siim(path, rle_mode)
    if kind == "mask-folder":
        return read_mask_folder(path)
    return read_synthetic(path, finding)


# ---------------------------------------------------------------------------------------------
# splits and label fractions


def split_records(records: Sequence[Record], test_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Seeded train/test split stratified by ``positive`` (each group keeps its share in the test
    set, at least one when the group has two or more images). Order inside each split is kept."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test_idx = []
    pos = np.array([r.positive for r in records], bool)
    for flag in (True, False):
        idx = np.flatnonzero(pos == flag)
        if len(idx) == 0:
            continue
        n = int(np.floor(test_fraction * len(idx) + 0.5))
        if len(idx) >= 2:
            n = min(max(n, 1), len(idx) - 1)
        test_idx += rng.choice(idx, size=n, replace=False).tolist()
    is_test = np.zeros(len(records), bool)
    is_test[test_idx] = True
    return ([r for r, t in zip(records, is_test) if not t], [r for r, t in zip(records, is_test) if t])


def fraction_indices(records: Sequence[Record], fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded ``fraction`` of the records, stratified by ``positive`` (>= 1 of
    each kind present); all indices for fraction >= 1. Different seeds give different subsets."""
    from mlip_ds.eval.common import fraction_count, stratified_subsample

    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction >= 1.0:
        return np.arange(len(records))
    y = np.array([int(r.positive) for r in records])
    idx, _ = stratified_subsample(y, fraction, seed)
    if idx is None:  # a single kind of image: plain random subset
        n = max(1, fraction_count(fraction, len(records)))
        idx = np.sort(np.random.default_rng(seed).choice(len(records), size=n, replace=False))
    return np.asarray(idx)


def fraction_subset(records: Sequence[Record], fraction: float, seed: int) -> list:
    """The records of ``fraction_indices`` (order kept)."""
    return [records[i] for i in fraction_indices(records, fraction, seed)]


def describe(records: Sequence[Record]) -> dict:
    n_boxes = sum(len(r.boxes) for r in records if r.boxes is not None)
    return {"images": len(records), "positive": int(sum(r.positive for r in records)), "boxes": int(n_boxes)}


# ---------------------------------------------------------------------------------------------
# the torch dataset


class TransferDataset(torch.utils.data.Dataset):
    """Records -> dicts ``{"image": (3, S, S) float in [0, 1], "boxes": (N, 4), "labels": (N,),
    "mask": (1, S, S) float (segment), "id", "index"}`` at ``image_size`` S (squashed, not cropped).

    ``task="detect"``: boxes scaled to S (clipped, at least 1 px wide and high); records with a mask
    only get boxes from its connected components. ``task="segment"``: the mask, area-resized and
    thresholded at 0.5; records with boxes only get the filled boxes. ``cache`` keeps the resized
    uint8 arrays in memory (each image is decoded once per process).
    """

    def __init__(self, records: Sequence[Record], task: str, image_size: int, cache: bool = True):
        if task not in ("detect", "segment"):
            raise ValueError(f"task must be 'detect' or 'segment', got {task!r}")
        self.records = list(records)
        self.task = task
        self.size = int(image_size)
        self.cache = {} if cache else None

    def __len__(self):
        return len(self.records)

    def _load(self, i: int) -> tuple:
        rec = self.records[i]
        try:
            gray = load_gray(rec.image)
        except DataError:
            raise
        except Exception as exn:  # noqa: BLE001 - name the file
            src = rec.image if isinstance(rec.image, str) else f"<bytes of {rec.id}>"
            raise DataError(f"cannot read image {src}: {type(exn).__name__}: {exn}") from None
        h, w = gray.shape
        s = self.size
        img = np.array(Image.fromarray(gray).resize((s, s), Image.BILINEAR), np.uint8)
        if self.task == "segment":
            if rec.mask is not None:
                m = rec.mask(w, h)
            else:
                m = BoxMask(rec.boxes if rec.boxes is not None else np.zeros((0, 4)))(w, h)
            m = np.asarray(Image.fromarray((m > 0).astype(np.uint8) * 255).resize((s, s), Image.BOX)) >= 128
            return img, m.astype(np.uint8), None, None
        if rec.boxes is not None:
            boxes, labels = rec.boxes.copy(), rec.labels.copy()
        elif rec.mask is not None:
            boxes = mask_to_boxes(rec.mask(w, h))
            labels = np.ones(len(boxes), np.int64)
        else:
            boxes, labels = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        boxes = boxes * np.array([s / w, s / h, s / w, s / h], np.float32)
        boxes = np.clip(boxes, 0, s)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, labels = boxes[keep], labels[keep]
        for k in (0, 1):  # at least one pixel wide / high, kept inside the image
            small = boxes[:, k + 2] - boxes[:, k] < 1.0
            c = (boxes[small, k] + boxes[small, k + 2]) / 2
            lo = np.clip(c - 0.5, 0, s - 1.0)
            boxes[small, k], boxes[small, k + 2] = lo, lo + 1.0
        return img, None, boxes.astype(np.float32), labels.astype(np.int64)

    def __getitem__(self, i: int) -> dict:
        if self.cache is not None and i in self.cache:
            img, m, boxes, labels = self.cache[i]
        else:
            img, m, boxes, labels = self._load(i)
            if self.cache is not None:
                self.cache[i] = (img, m, boxes, labels)
        x = torch.from_numpy(img).float().div_(255.0).unsqueeze(0).expand(3, -1, -1).contiguous()
        out = {"image": x, "id": self.records[i].id, "index": i}
        if self.task == "segment":
            out["mask"] = torch.from_numpy(m).float().unsqueeze(0)
        else:
            out["boxes"] = torch.from_numpy(boxes)
            out["labels"] = torch.from_numpy(labels)
        return out


def collate(batch: list) -> list:
    """Keep a batch as a list of item dicts (detection targets differ in length)."""
    return list(batch)
