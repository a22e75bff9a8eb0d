"""Write samples into deterministic WebDataset tar shards plus a ``manifest.json``.

Used by ``tools/make_shards.py`` (the CLI). Pipeline:

    jobs (row / index) --ordered_map(workers)--> Result(sample | skip reason) --> ShardSetWriter

* A *sample* is a dict of ready bytes: ``{"__key__", "png"|"jpg", "txt", "json"[, "seg.png"]}``
  (the schema is in :mod:`mlip_ds.data.schema`); its JSON is checked with ``validate_sample_json``
  before it is written.
* Shards are byte-deterministic: members are written with ``webdataset.TarWriter`` with a fixed
  mtime (0), uid/gid 0, uname/gname ``mlip``, mode 0444, in sorted member order, and images are
  encoded with fixed settings; the same input therefore gives the same shard bytes (sha256),
  whatever the number of workers (``Pool.imap`` keeps the job order).
* Each shard is written under a temporary name in the output folder and renamed into place when
  complete; the manifest is written the same way, last. Each shard's record also holds the range of
  jobs it consumed and goes to a journal as soon as the shard is in place, so that an interrupted
  run can be finished with ``--resume`` (:mod:`mlip_ds.data.shard_resume`).
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import re
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from mlip_ds.data.schema import SCHEMA_VERSION, validate_sample_json

TAR_MTIME = 0
TAR_USER = "mlip"
TAR_MODE = 0o444
IMAGE_FORMATS = ("png", "jpg")
DEFAULT_JPEG_QUALITY = 95
SHARD_DIGITS = 6


# --------------------------------------------------------------------------- images

def to_gray8(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit grayscale ('L'). 16-bit / int / float images are min-max scaled."""
    if img.mode == "L":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("L")


def short_side_size(size: tuple, short_side: int) -> tuple:
    """(w, h) scaled so that min(w, h) == short_side (aspect kept, rounded, >= 1)."""
    w, h = size
    s = short_side / min(w, h)
    if w <= h:
        return short_side, max(1, int(round(h * s)))
    return max(1, int(round(w * s))), short_side


def resize_short_side(img: Image.Image, short_side: int, resample=Image.Resampling.LANCZOS) -> Image.Image:
    """Resize (down or up) so that the short side is ``short_side``; no-op when it already is."""
    target = short_side_size(img.size, short_side)
    if target == img.size:
        return img
    if resample == Image.Resampling.NEAREST:
        return img.resize(target, resample)
    return img.resize(target, resample, reducing_gap=3.0)


def encode_image(img: Image.Image, fmt: str, jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """Encode with fixed settings (deterministic bytes): PNG level 6, or baseline JPEG."""
    import io

    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=6)
    elif fmt == "jpg":
        img.save(buf, format="JPEG", quality=jpeg_quality, optimize=False, progressive=False)
    else:
        raise ValueError(f"unknown image format {fmt!r}, expected one of {IMAGE_FORMATS}")
    return buf.getvalue()


# --------------------------------------------------------------------------- samples

def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def make_sample(key: str, image_bytes: bytes, fmt: str, text: str, doc: dict,
                seg_bytes: Optional[bytes] = None) -> dict:
    """Assemble one sample's members; validates ``doc`` (raises SchemaError naming the key)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
        raise ValueError(f"sample key {key!r} must match [A-Za-z0-9_-]+ (a '.' would split it)")
    # Round trip through JSON: numpy scalars become plain numbers before validation.
    doc = json.loads(json.dumps(doc, default=_json_default))
    validate_sample_json(doc, key)
    sample = {
        "__key__": key,
        fmt: image_bytes,
        "txt": text.encode("utf-8"),
        "json": json.dumps(doc, ensure_ascii=False).encode("utf-8"),
    }
    if seg_bytes is not None:
        sample["seg.png"] = seg_bytes
    return sample


@dataclass
class Result:
    """What a worker returns for one job: a sample, or the reason it was skipped."""
    row: int
    id: str
    sample: Optional[dict] = None
    reason: Optional[str] = None


@dataclass(frozen=True)
class EncodeOptions:
    image_size: int = 256
    fmt: str = "png"
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    link: bool = False  # fill entities with the knowledge linker (and labels where the row has none)


_LINKER = {}


def _link(text: str) -> tuple[list[dict], dict]:
    """Entities and CheXpert-style labels of a report; the linker is built once per process."""
    from mlip_ds.knowledge.linker import ReportLinker, labels_from_entities
    if "linker" not in _LINKER:
        _LINKER["linker"] = ReportLinker()
    entities = _LINKER["linker"].link(text)
    return entities, labels_from_entities(entities)


# ---- synthetic source

def _scale_box(box, sx: float, sy: float):
    """[x0, y0, x1, y1] scaled. Integer pixel boxes (exclusive ends, ``seg[y0:y1, x0:x1]``) stay
    integer and grow to cover: floor for the start, ceil for the end."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4
            and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in box)):
        return box
    if all(isinstance(v, (int, np.integer)) for v in box):
        x0, y0, x1, y1 = (int(v) for v in box)
        return [int(math.floor(x0 * sx + 1e-9)), int(math.floor(y0 * sy + 1e-9)),
                max(int(math.ceil(x1 * sx - 1e-9)), int(math.floor(x0 * sx + 1e-9)) + 1),
                max(int(math.ceil(y1 * sy - 1e-9)), int(math.floor(y0 * sy + 1e-9)) + 1)]
    x0, y0, x1, y1 = (float(v) for v in box)
    return [round(x0 * sx, 3), round(y0 * sy, 3), round(x1 * sx, 3), round(y1 * sy, 3)]


def scale_boxes(obj, sx: float, sy: float):
    """Scale every box found in ``obj``: values under keys 'box' / 'bbox' / 'xyxy' (one [x0,y0,x1,y1])
    and 'boxes' / 'bboxes' (a list of them, or of dicts holding one). Returns a new object."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k in ("box", "bbox", "xyxy"):
                out[k] = _scale_box(v, sx, sy)
            elif k in ("boxes", "bboxes") and isinstance(v, (list, tuple)):
                out[k] = [_scale_box(b, sx, sy) if not isinstance(b, dict) else scale_boxes(b, sx, sy) for b in v]
            else:
                out[k] = scale_boxes(v, sx, sy)
        return out
    if isinstance(obj, (list, tuple)):
        return [scale_boxes(v, sx, sy) for v in obj]
    return obj


@dataclass(frozen=True)
class SyntheticOptions:
    encode: EncodeOptions
    seed: int = 0
    gen_size: int = 256


def process_synthetic(opts: SyntheticOptions, index: int) -> Result:
    """Generate synthetic sample ``index`` and encode it (runs in a worker)."""
    from mlip_ds.sources.synthetic import generate_sample

    s = generate_sample(index, seed=opts.seed, size=opts.gen_size)
    img = Image.fromarray(np.ascontiguousarray(s.image, dtype=np.uint8))
    orig = img.size
    img = resize_short_side(img, opts.encode.image_size)
    sx, sy = img.size[0] / orig[0], img.size[1] / orig[1]
    seg = Image.fromarray(np.ascontiguousarray(s.seg, dtype=np.uint8))
    seg = seg.resize(img.size, Image.Resampling.NEAREST) if seg.size != img.size else seg
    meta = dict(s.meta)
    if (sx, sy) != (1.0, 1.0):
        meta = scale_boxes(meta, sx, sy)
    meta.setdefault("source", "synthetic")
    meta.setdefault("index", index)
    meta.setdefault("seed", opts.seed)
    if s.findings is not None and "findings" not in meta:
        meta["findings"] = scale_boxes(list(s.findings), sx, sy) if (sx, sy) != (1.0, 1.0) else list(s.findings)
    meta["orig_size"] = list(orig)
    meta["size"] = list(img.size)
    from mlip_ds.sources.csv_source import make_key

    key = make_key(s.key)
    doc = {"id": s.key, "sections": dict(s.sections), "entities": list(s.entities),
           "labels": dict(s.labels), "meta": meta}
    sample = make_sample(key, encode_image(img, opts.encode.fmt, opts.encode.jpeg_quality),
                         opts.encode.fmt, s.report, doc, encode_image(seg, "png"))
    return Result(row=index, id=s.key, sample=sample)


# ---- csv source

def process_csv_row(opts: EncodeOptions, r) -> Result:
    """Load, check and encode one CsvRow (runs in a worker); a bad row gives Result.reason."""
    from mlip_ds.sources.csv_source import RowError, clinical_text, open_image, read_report, split_sections

    if r.error:
        return Result(row=r.row, id=r.id, reason=r.error)
    try:
        text = read_report(r)
        sections = r.sections
        if r.clinical_only:
            text, sections = clinical_text(text, r.report_path or f"row {r.row}")
        img, orig = open_image(r.image_path, short_side=opts.image_size)
    except RowError as e:
        return Result(row=r.row, id=r.id, reason=str(e))
    try:
        img = resize_short_side(to_gray8(img), opts.image_size)
    except Exception as e:
        return Result(row=r.row, id=r.id, reason=f"unreadable image: {r.image_path} ({type(e).__name__}: {e})")
    meta = dict(r.meta)  # --meta-cols first: the fields below always mean what the README says
    meta.update({"source": r.source, "row": r.row, "image": r.image_ref})
    if r.report_ref is not None:
        meta["report_file"] = r.report_ref
    meta["orig_size"] = list(orig)
    meta["size"] = list(img.size)
    entities, labels = _link(text) if opts.link else ([], {})
    if r.labels:  # labels of the source (CSV columns, MIMIC-CXR's CheXpert CSV) win over derived ones
        labels = dict(r.labels)
        meta["labels_from"] = "source"
    elif opts.link:
        meta["labels_from"] = "linker"
    doc = {"id": r.id, "sections": dict(sections) if sections is not None else split_sections(text),
           "entities": entities, "labels": labels, "meta": meta}
    sample = make_sample(r.key, encode_image(img, opts.fmt, opts.jpeg_quality), opts.fmt, text, doc)
    return Result(row=r.row, id=r.id, sample=sample)


# --------------------------------------------------------------------------- running

class _PoolMap:
    """``Pool.imap`` over jobs, started at construction (before any progress-bar thread exists);
    ``close()`` (also called when exhausted) terminates the pool."""

    def __init__(self, fn: Callable, jobs: Iterable, workers: int, chunksize: int):
        self._pool = multiprocessing.get_context().Pool(workers)
        self._it = self._pool.imap(fn, jobs, chunksize=chunksize)

    def __iter__(self):
        return self

    def __next__(self):
        if self._pool is None:
            raise StopIteration
        try:
            return next(self._it)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.terminate()
            pool.join()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def ordered_map(fn: Callable, jobs: Iterable, workers: int = 1, total: Optional[int] = None) -> Iterator:
    """``map(fn, jobs)`` in job order; with workers > 1 through a process pool (fn must pickle).
    The order of results never depends on ``workers``."""
    if workers <= 1:
        return map(fn, jobs)
    chunksize = 4 if total is None else max(1, min(32, total // (workers * 16)))
    return _PoolMap(fn, jobs, workers, chunksize)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:0{SHARD_DIGITS}d}.tar"


def manifest_name(prefix: str = "shard") -> str:
    """``manifest.json`` for the default prefix, ``<prefix>-manifest.json`` otherwise."""
    return "manifest.json" if prefix == "shard" else f"{prefix}-manifest.json"


def existing_outputs(out_dir: str, prefix: str = "shard") -> list:
    """Files a run with this prefix would (over)write: its shards and its manifest."""
    if not os.path.isdir(out_dir):
        return []
    pat = re.compile(rf"{re.escape(prefix)}-\d{{{SHARD_DIGITS}}}\.tar")
    names = sorted(n for n in os.listdir(out_dir) if pat.fullmatch(n) or n == manifest_name(prefix))
    return [os.path.join(out_dir, n) for n in names]


class ShardSetWriter:
    """Write samples into ``<out>/<prefix>-NNNNNN.tar``, ``samples_per_shard`` each (last may be short)."""

    def __init__(self, out_dir: str, prefix: str = "shard", samples_per_shard: int = 256,
                 on_shard: Optional[Callable[[int, dict], None]] = None):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self.out_dir = out_dir
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.on_shard = on_shard      # called with (index, record) once a shard is in place
        self.shards: list = []
        self._written_here: list = []  # files this writer wrote (not reused ones)
        self._next_job = 0             # first job of the next shard's range
        self._last_job = -1
        self._file = None
        self._tar = None
        self._tmp = None
        self._count = 0
        os.makedirs(out_dir, exist_ok=True)

    def _open(self):
        name = shard_name(self.prefix, len(self.shards))
        self._tmp = os.path.join(self.out_dir, f".{name}.tmp{os.getpid()}")
        self._file = open(self._tmp, "wb")
        self._tar = wds.TarWriter(self._file, user=TAR_USER, group=TAR_USER, mode=TAR_MODE,
                                  encoder=False, mtime=TAR_MTIME)
        self._count = 0

    def _finish(self):
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = shard_name(self.prefix, len(self.shards))
        path = os.path.join(self.out_dir, name)
        digest = sha256_file(self._tmp)
        os.replace(self._tmp, path)
        record = {"file": name, "num_samples": self._count, "sha256": digest,
                  "jobs": [self._next_job, self._last_job + 1]}
        self._next_job = self._last_job + 1
        self.shards.append(record)
        self._written_here.append(name)
        self._file = self._tar = self._tmp = None
        if self.on_shard is not None:
            self.on_shard(len(self.shards) - 1, record)

    def reuse(self, record: dict) -> None:
        """Take a verified shard of an earlier run as the next shard (``--resume``)."""
        expected = shard_name(self.prefix, len(self.shards))
        if self._tar is not None or record["file"] != expected or record["jobs"][0] != self._next_job:
            raise RuntimeError(f"cannot resume: {record['file']} does not follow the shards written so far "
                               f"(expected {expected} from job {self._next_job}); rerun with --overwrite")
        self.shards.append({k: record[k] for k in ("file", "num_samples", "sha256", "jobs")})
        self._next_job = record["jobs"][1]

    def write(self, sample: dict, job: Optional[int] = None) -> None:
        """Add a sample; ``job`` (its index in the input) defines the shard's job range."""
        if self._tar is None:
            self._open()
        self._last_job = self._last_job + 1 if job is None else job
        self._tar.write(sample)
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._finish()

    def close(self) -> list:
        if self._tar is not None:
            self._finish()
        return self.shards

    def abort(self, keep_finished: bool = False) -> None:
        """Drop the shard being written and (unless ``keep_finished``) the shards this writer
        finished; reused shards of an earlier run are never removed."""
        if self._file is not None:
            try:
                try:
                    self._tar.close()  # else tarfile's __del__ later writes to the closed file
                except Exception:
                    pass
                self._file.close()
            finally:
                if self._tmp and os.path.exists(self._tmp):
                    os.remove(self._tmp)
        for name in ([] if keep_finished else self._written_here):
            path = os.path.join(self.out_dir, name)
            if os.path.exists(path):
                os.remove(path)
        self.shards = []
        self._file = self._tar = self._tmp = None


class StrictError(Exception):
    """Raised in strict mode at the first skipped row; ``result`` holds its row, id and reason."""

    def __init__(self, result: Result):
        self.result = result
        super().__init__(f"row {result.row} (id {result.id!r}): {result.reason}")


def write_atomic(path: str, data: bytes) -> None:
    tmp = f"{os.path.join(os.path.dirname(path) or '.', '.' + os.path.basename(path))}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_dataset(results: Iterable, out_dir: str, *, source: str, created_with: dict,
                  label_names: list, prefix: str = "shard", samples_per_shard: int = 256,
                  strict: bool = False, total: Optional[int] = None, progress: bool = True,
                  extra: Optional[dict] = None, fingerprint: Optional[str] = None) -> dict:
    """Consume results in job order (Result, or shard_resume.Reuse for a verified shard of an
    earlier run), write shards and the manifest; return the manifest dict.

    Skipped results go to manifest["skipped"] (with their job index); with ``strict`` the first
    one raises StrictError, and the shards of this run are removed. On any other exception (Ctrl-C,
    a bug) the finished shards stay, each with its journal record when ``fingerprint`` is given,
    so that ``--resume`` can finish the run; no manifest is written.
    """
    from mlip_ds.data import shard_resume

    skipped = []

    def on_shard(index: int, record: dict) -> None:
        if fingerprint is not None:
            s, e = record["jobs"]
            shard_resume.write_record(out_dir, prefix, index,
                                      {**record, "skipped": [x for x in skipped if s <= x["job"] < e]}, fingerprint)

    writer = ShardSetWriter(out_dir, prefix, samples_per_shard, on_shard=on_shard)
    written = 0
    job = 0
    bar = tqdm(results, total=total, unit="img", desc=f"{prefix}-*.tar", disable=not progress,
               dynamic_ncols=True, mininterval=0.5)
    try:
        for res in bar:
            if isinstance(res, shard_resume.Reuse):
                writer.reuse(res.record)
                skipped.extend(res.record.get("skipped", []))
                written += res.record["num_samples"]
                job = res.record["jobs"][1]
                continue
            if res.reason is not None:
                if strict:
                    raise StrictError(res)
                skipped.append({"row": res.row, "id": res.id, "reason": res.reason, "job": job})
            else:
                writer.write(res.sample, job)
                written += 1
            job += 1
        shards = writer.close()
    except StrictError:
        writer.abort()
        shard_resume.remove_journal(out_dir, prefix)
        raise
    except BaseException:
        writer.abort(keep_finished=True)
        raise
    finally:
        bar.close()
        close = getattr(results, "close", None)
        if close is not None:  # a generator over a process pool: stop the pool now
            close()
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "created_with": created_with,
        "num_samples": written,
        "shards": shards,
        "skipped": skipped,
        "label_names": list(label_names),
        **(extra or {}),  # source facts, e.g. mimic-cxr's images left out by split / view
    }
    if fingerprint is not None:
        manifest["fingerprint"] = fingerprint
    write_atomic(os.path.join(out_dir, manifest_name(prefix)),
                 (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    shard_resume.finish(out_dir, prefix, len(shards))
    return manifest


def summarize(manifest: dict, out_dir: str, prefix: str = "shard") -> str:
    """Human summary: samples, shards, skipped rows counted by reason kind, first few examples."""
    from mlip_ds.sources.csv_source import reason_kind

    lines = [f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shards to "
             f"{out_dir} (manifest: {os.path.join(out_dir, manifest_name(prefix))})"]
    skipped = manifest["skipped"]
    if skipped:
        lines.append(f"skipped {len(skipped)} rows:")
        for kind, n in sorted(Counter(reason_kind(s["reason"]) for s in skipped).items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {kind}: {n}")
        for s in skipped[:5]:
            lines.append(f"  e.g. row {s['row']} (id {s['id']!r}): {s['reason']}")
        if len(skipped) > 5:
            lines.append(f"  ... all {len(skipped)} are listed under 'skipped' in the manifest")
    return "\n".join(lines)


def synthetic_results(indices: Iterable[int], opts: SyntheticOptions, workers: int = 1,
                      total: Optional[int] = None) -> Iterator[Result]:
    return ordered_map(partial(process_synthetic, opts), indices, workers, total)


def csv_results(rows: Iterable, opts: EncodeOptions, workers: int = 1, total: Optional[int] = None) -> Iterator[Result]:
    return ordered_map(partial(process_csv_row, opts), rows, workers, total)
