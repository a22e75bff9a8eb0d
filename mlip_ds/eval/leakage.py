"""Leakage check: is any test image in the pretraining shards?

``python -m mlip_ds.eval.leakage --shards SHARD_DIR [--shards ...] --test SPLIT.csv [--split test]``

The test side is a CSV (``mlip_ds.eval.splits`` writes one: ``path``, ``split``, ``image_id``,
``patient_id``, ``study_id``; other CSVs need only a path column) or a folder of images. The shard
side is what ``tools/make_shards.py`` wrote (``mlip_ds/data/shard_writer.py``): per sample the image
re-encoded at a short side of ``--image-size`` (png, or jpg at ``--jpeg-quality``) and a json whose
``id`` and ``meta`` hold the source's identifiers (``image`` = the source path; MIMIC-CXR:
``subject_id``, ``study_id``, ``dicom_id``; ``--meta-cols`` of the CSV source).

Checks, each reported with the shard, the key and what matched:

* ``study id`` / ``patient id``: the test row's ``study_id`` / ``patient_id`` equal to a shard's
  ``meta.study_id`` / ``meta.subject_id`` (or ``meta.patient_id``);
* ``image id``: the test ``image_id`` (or path) and a shard's ``id``, ``meta.image`` or
  ``meta.dicom_id`` name the same file: equal, or one is a path suffix of the other at a folder
  boundary (extensions ignored);
* ``file hash``: sha256 of the test file == sha256 of the shard's image bytes;
* ``pixels``: the test image pushed through the shard writer's own pipeline (decode, 8-bit gray,
  resize to the shard's short side, encode as the shard did) gives exactly the shard's pixels;
* ``near duplicate`` (suspected, not proof): a 256-bit difference hash of the two grayscale images
  differs in at most ``--max-hamming`` bits (default 10): catches the same radiograph re-encoded,
  resized or converted from DICOM with other settings.

Exit code 1 when a study/patient/image id, file hash or pixel match is found (``--strict``: near
duplicates too), 0 when clean, 2 on a usage error. ``--out report.json`` keeps every match.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
import tarfile
from collections import defaultdict
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

EXACT_KINDS = ("study id", "patient id", "image id", "file hash", "pixels")
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


class LeakageError(RuntimeError):
    """Bad input (message names the path): exit code 2."""


# ---------------------------------------------------------------------------------------------
# fingerprints


def pixel_hash(img: Image.Image) -> str:
    a = np.asarray(img.convert("L"), dtype=np.uint8)
    return hashlib.sha256(f"{a.shape}".encode() + a.tobytes()).hexdigest()


def dhash(img: Image.Image, size: int = 16) -> np.ndarray:
    """Difference hash: (size*size bits as size*size/8 uint8) of the gray image resized to (size+1, size)."""
    a = np.asarray(img.convert("L").resize((size + 1, size), Image.Resampling.LANCZOS), dtype=np.int16)
    return np.packbits((a[:, 1:] > a[:, :-1]).ravel())


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distances between every row of a (n, B) and b (m, B) uint8 -> (n, m)."""
    return _POPCOUNT[np.bitwise_xor(a[:, None, :], b[None, :, :])].sum(-1, dtype=np.int32)


def _strip_ext(s: str) -> str:
    s = s.replace("\\", "/").strip("/")
    base, ext = os.path.splitext(s)
    return base if ext and "/" not in ext and len(ext) <= 8 else s


def _suffixes(s: str) -> list[str]:
    parts = _strip_ext(s).split("/")
    return ["/".join(parts[i:]) for i in range(len(parts))]


# ---------------------------------------------------------------------------------------------
# the two sides


def read_test_set(path: str, split: str | None = "test") -> list[dict]:
    """Rows {path, image_id, patient_id, study_id} of a split CSV (rows of ``split`` when the CSV has
    a split column) or of every image under a folder."""
    from mlip_ds.eval.predict import list_inputs
    if not os.path.exists(path):
        raise LeakageError(f"--test {path} not found")
    if os.path.isdir(path):
        paths, _ = list_inputs(path)
        return [{"path": p, "image_id": os.path.relpath(p, path), "patient_id": "", "study_id": ""} for p in paths]
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = list(reader.fieldnames or [])
        rows = list(reader)
    col = next((c for c in ("path", "image_path", "image", "img_path", "filename", "file", "Path") if c in cols), None)
    if col is None:
        raise LeakageError(f"{path}: no path column (columns: {cols})")
    if split and "split" in cols:
        rows = [r for r in rows if r["split"] == split]
    root = os.path.dirname(os.path.abspath(path))
    out = []
    for r in rows:
        p = r[col] if os.path.isabs(r[col]) else os.path.join(root, r[col])
        out.append({"path": p, "image_id": r.get("image_id") or r[col], "patient_id": r.get("patient_id", ""),
                    "study_id": r.get("study_id", "")})
    return out


def iter_shard(tar_path: str) -> Iterator[tuple[str, dict]]:
    """(key, {extension: bytes}) of each sample of a WebDataset tar, in order."""
    cur, members = None, {}
    with tarfile.open(tar_path) as tf:
        for m in tf:
            if not m.isfile():
                continue
            base = os.path.basename(m.name)
            key, _, ext = base.partition(".")
            key = os.path.join(os.path.dirname(m.name), key)
            if key != cur and cur is not None:
                yield cur, members
                members = {}
            cur = key
            members[ext] = tf.extractfile(m).read()
    if cur is not None:
        yield cur, members


def scan_shards(specs: Sequence[str], progress: bool = True) -> tuple[list[dict], dict]:
    """Fingerprint every shard sample: (records, {(short_side, fmt, quality): count})."""
    from tqdm.auto import tqdm

    from mlip_ds.eval.datasets import resolve_shards

    records, groups = [], defaultdict(int)
    for spec in specs:
        try:
            urls, manifest = resolve_shards(spec)
        except FileNotFoundError as exn:
            raise LeakageError(str(exn)) from exn
        quality = int(((manifest or {}).get("created_with") or {}).get("jpeg_quality") or 95)
        total = (manifest or {}).get("num_samples")
        with tqdm(total=total, desc=f"shards {os.path.basename(os.path.normpath(spec))}", unit="img",
                  disable=not progress) as bar:
            for url in urls:
                for key, mem in iter_shard(url):
                    fmt = next((e for e in ("png", "jpg", "jpeg") if e in mem), None)
                    rec = {"shard": url, "key": key, "ids": {}, "fmt": fmt, "quality": quality}
                    if "json" in mem:
                        try:
                            doc = json.loads(mem["json"])
                        except ValueError:
                            doc = {}
                        meta = doc.get("meta") or {}
                        rec["ids"] = {"id": str(doc.get("id") or ""), "image": str(meta.get("image") or ""),
                                      "dicom_id": str(meta.get("dicom_id") or ""),
                                      "study_id": str(meta.get("study_id") or ""),
                                      "patient_id": str(meta.get("subject_id") or meta.get("patient_id") or "")}
                        size = meta.get("size")
                    else:
                        size = None
                    if fmt is not None:
                        data = mem[fmt]
                        rec["sha256"] = hashlib.sha256(data).hexdigest()
                        try:
                            with Image.open(io.BytesIO(data)) as im:
                                im.load()
                                g = im.convert("L")
                            rec["pixels"] = pixel_hash(g)
                            rec["dhash"] = dhash(g)
                            rec["short_side"] = int(min(size)) if size else int(min(g.size))
                            groups[(rec["short_side"], "jpg" if fmt == "jpeg" else fmt, quality)] += 1
                        except Exception as exn:  # noqa: BLE001
                            rec["error"] = f"{type(exn).__name__}: {exn}"
                    records.append(rec)
                    bar.update(1)
    return records, dict(groups)


def reproduce_shard_pixels(path: str, short_side: int, fmt: str, quality: int) -> str:
    """Pixel hash of ``path`` after the shard writer's pipeline at (short side, format)."""
    from mlip_ds.data.shard_writer import encode_image, resize_short_side, to_gray8
    from mlip_ds.sources.csv_source import open_image

    img, _ = open_image(path, short_side=short_side)
    img = resize_short_side(to_gray8(img), short_side)
    with Image.open(io.BytesIO(encode_image(img, fmt, quality))) as im:
        im.load()
        return pixel_hash(im)


# ---------------------------------------------------------------------------------------------
# matching


def check_leakage(test_rows: list[dict], shard_records: list[dict], groups: dict, max_hamming: int = 10,
                  progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from mlip_ds.eval.predict import read_image

    by_study, by_patient, by_sha, by_pix = defaultdict(list), defaultdict(list), defaultdict(list), defaultdict(list)
    by_image_suffix, full_image_ids = defaultdict(list), defaultdict(list)
    for i, r in enumerate(shard_records):
        ids = r["ids"]
        if ids.get("study_id"):
            by_study[ids["study_id"]].append(i)
        if ids.get("patient_id"):
            by_patient[ids["patient_id"]].append(i)
        for k in ("id", "image", "dicom_id"):
            if ids.get(k):
                full_image_ids[_strip_ext(ids[k])].append(i)
                for s in _suffixes(ids[k]):
                    by_image_suffix[s].append(i)
        if "sha256" in r:
            by_sha[r["sha256"]].append(i)
        if "pixels" in r:
            by_pix[r["pixels"]].append(i)
    with_hash = [i for i, r in enumerate(shard_records) if "dhash" in r]
    shard_dh = np.stack([shard_records[i]["dhash"] for i in with_hash]) if with_hash else np.zeros((0, 32), np.uint8)

    matches, unreadable = [], []

    def hit(t, i, how, detail=""):
        r = shard_records[i]
        matches.append({"test_path": t["path"], "test_image_id": t["image_id"], "shard": r["shard"], "key": r["key"],
                        "shard_id": r["ids"].get("id", ""), "how": how, "detail": detail})

    test_dh, test_idx = [], []
    for ti, t in enumerate(tqdm(test_rows, desc="test images", unit="img", disable=not progress)):
        for how, field, index in (("study id", "study_id", by_study), ("patient id", "patient_id", by_patient)):
            for i in index.get(t.get(field) or "\0", []):
                hit(t, i, how, t[field])
        seen = set()
        if t["image_id"] != t["path"]:  # the test id (not a local path) is a suffix of a shard id
            seen.update(by_image_suffix.get(_strip_ext(t["image_id"]), []))
        for ident in {t["image_id"], t["path"]}:  # a shard id is a suffix of the test id / path
            for s in _suffixes(ident):
                seen.update(full_image_ids.get(s, []))
        for i in sorted(seen):
            hit(t, i, "image id", t["image_id"])
        if not os.path.isfile(t["path"]):
            unreadable.append({"path": t["path"], "reason": "file not found"})
            continue
        with open(t["path"], "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        for i in by_sha.get(sha, []):
            hit(t, i, "file hash", sha[:16])
        try:
            for (side, fmt, quality) in groups:
                ph = reproduce_shard_pixels(t["path"], side, fmt, quality)
                for i in by_pix.get(ph, []):
                    hit(t, i, "pixels", f"short side {side}, {fmt}")
            test_dh.append(dhash(read_image(t["path"])))
            test_idx.append(ti)
        except Exception as exn:  # noqa: BLE001
            unreadable.append({"path": t["path"], "reason": f"{type(exn).__name__}: {exn}"})
    exact_pairs = {(m["test_path"], m["key"], m["shard"]) for m in matches if m["how"] in ("file hash", "pixels")}
    if test_dh and len(shard_dh):
        T = np.stack(test_dh)
        for start in range(0, len(T), 64):
            d = np.concatenate([hamming(T[start:start + 64], shard_dh[s:s + 4096])
                                for s in range(0, len(shard_dh), 4096)], 1)
            for a, b in zip(*np.nonzero(d <= max_hamming)):
                t = test_rows[test_idx[start + a]]
                i = with_hash[b]
                r = shard_records[i]
                if (t["path"], r["key"], r["shard"]) not in exact_pairs:
                    hit(t, i, "near duplicate", f"hamming {int(d[a, b])}/256")
    counts = defaultdict(int)
    for m in matches:
        counts[m["how"]] += 1
    leaked = sorted({m["test_path"] for m in matches if m["how"] in EXACT_KINDS})
    suspected = sorted({m["test_path"] for m in matches if m["how"] == "near duplicate"} - set(leaked))
    return {"n_test": len(test_rows), "n_shard_samples": len(shard_records),
            "shard_encodings": [{"short_side": s, "format": f, "jpeg_quality": q, "samples": n}
                                for (s, f, q), n in groups.items()],
            "max_hamming": max_hamming, "counts": dict(counts), "leaked_test_images": leaked,
            "suspected_test_images": suspected, "matches": matches, "unreadable_test_images": unreadable}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlip_ds.eval.leakage",
                                description="Check that no test image (by id, file hash, pixels or near-duplicate "
                                            "hash) is in the pretraining shards.")
    p.add_argument("--shards", action="append", required=True,
                   help="shard folder / .tar / brace pattern (repeatable)")
    p.add_argument("--test", required=True, help="split CSV (mlip_ds.eval.splits) or a folder of test images")
    p.add_argument("--split", default="test", help="rows of this split when the CSV has a split column (default test; "
                                                   "'' = all rows)")
    p.add_argument("--max-hamming", type=int, default=10, help="near-duplicate threshold in bits of 256 (default 10)")
    p.add_argument("--strict", action="store_true", help="exit 1 on near duplicates too")
    p.add_argument("--out", default=None, help="write the full report (every match) as JSON")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        tests = read_test_set(args.test, args.split or None)
        if not tests:
            raise LeakageError(f"{args.test}: no test rows (split {args.split!r})")
        records, groups = scan_shards(args.shards, progress=not args.no_progress)
    except LeakageError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    rep = check_leakage(tests, records, groups, args.max_hamming, progress=not args.no_progress)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(rep, f, indent=2)
    print(f"leakage: {rep['n_test']} test image(s) against {rep['n_shard_samples']} shard sample(s): "
          f"{len(rep['leaked_test_images'])} leaked, {len(rep['suspected_test_images'])} suspected near duplicate(s); "
          f"matches by kind {rep['counts'] or '{}'}")
    for m in rep["matches"][:20]:
        print(f"  {m['how']}: {m['test_path']} ~ {os.path.basename(m['shard'])} key {m['key']} ({m['detail']})")
    if len(rep["matches"]) > 20:
        print(f"  ... {len(rep['matches']) - 20} more" + (f" (all in {args.out})" if args.out else ""))
    for u in rep["unreadable_test_images"][:5]:
        print(f"  unreadable test image: {u['path']} ({u['reason']})")
    bad = rep["leaked_test_images"] or (args.strict and rep["suspected_test_images"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
