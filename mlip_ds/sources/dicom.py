"""DICOM radiographs -> 8-bit grayscale images, for every ``make_shards`` source.

A radiograph's stored values are not display values: the modality LUT (rescale slope/intercept or
a LUT) maps them to physical units, the VOI LUT or window (center/width) picks the range a reader
looks at, and MONOCHROME1 images store white as the lowest value. :func:`read_dicom` applies these
with pydicom's ``apply_modality_lut`` / ``apply_voi_lut``, scales the VOI output range (not the
pixel min/max, so a window keeps its meaning) to 0..255 and inverts MONOCHROME1.
Without a VOI LUT or window the pixel min..max is scaled to 0..255.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

DICOM_MAGIC_OFFSET = 128


def is_dicom(path: str) -> bool:
    """A ``.dcm`` / ``.dicom`` path, or a file without extension that has the ``DICM`` preamble
    (DICOM files are often stored without extension, e.g. ``IM000001``)."""
    ext = os.path.splitext(path)[1].lower()
    if ext in (".dcm", ".dicom"):
        return True
    if ext:
        return False
    try:
        with open(path, "rb") as f:
            f.seek(DICOM_MAGIC_OFFSET)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _voi_range(ds, arr: np.ndarray) -> tuple[float, float] | None:
    """The output range of the VOI transform pydicom applies, or None when there is none."""
    from pydicom.pixels import apply_voi_lut

    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        # every table entry, through pydicom: the range the table really uses (a "16-bit" LUT often
        # holds 12-bit values)
        entries, first = int(seq[0].LUTDescriptor[0]) or 65536, int(seq[0].LUTDescriptor[1])
        table = apply_voi_lut(np.arange(first, first + entries, dtype=np.int64), ds)
        return float(table.min()), float(table.max())
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        # a window maps everything below / above it to the two ends of its output range
        lo, hi = float(arr.min()), float(arr.max())
        span = max(abs(lo), abs(hi), 1.0) * 4 + 2.0 ** 32
        ends = apply_voi_lut(np.array([-span, span]), ds)
        return float(ends[0]), float(ends[1])
    return None


def dicom_to_gray8(ds) -> np.ndarray:
    """A pydicom Dataset's first frame as a uint8 array (display values: white = dense)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    arr = ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        # colour (RGB / YBR, already converted to RGB by pydicom): plain luminance
        return np.asarray(Image.fromarray(np.asarray(arr, dtype=np.uint8)).convert("L"))
    arr = apply_modality_lut(arr, ds)
    voi = _voi_range(ds, arr)
    if voi is not None:
        arr = apply_voi_lut(arr, ds)
        lo, hi = voi
    else:
        lo, hi = float(np.min(arr)), float(np.max(arr))
    arr = np.asarray(arr, dtype=np.float64)
    scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


def read_dicom(path: str) -> tuple[Image.Image, tuple[int, int]]:
    """Read a DICOM file -> (8-bit 'L' image, (w, h)). Raises what pydicom raises for a bad file
    (the caller turns it into a skip reason naming the file)."""
    import pydicom

    ds = pydicom.dcmread(path)
    img = Image.fromarray(dicom_to_gray8(ds))
    return img, img.size
