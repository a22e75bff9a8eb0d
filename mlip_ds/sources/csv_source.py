"""CSV source for ``tools/make_shards.py csv``: one row per radiograph.

Columns: an image path (relative to ``root``, by default the CSV's folder), the report as text or
as a path to a UTF-8 text file, optional label columns (1 / 0 / -1, also 1.0 / 0.0 / -1.0 as in the
CheXpert CSVs; blank -> the label is omitted), optional meta columns (copied as strings into the
sample's ``meta``) and an optional id column.

Reading is split in two so that the slow part can run in worker processes:
  * :func:`read_rows` (main process) checks the CSV and its columns (fatal :class:`CsvSourceError`)
    and yields one picklable :class:`CsvRow` per data row, with ``error`` already set for problems
    that need no file access (bad bytes, bad label value, blank image path, duplicate id);
  * :func:`load_row` (any process) reads the report and decodes the image, raising
    :class:`RowError` with a clear reason for a bad row.

Reasons are ``"<kind>: <detail>"``; ``kind`` is one of :data:`REASON_KINDS` and is what the end of
run summary counts.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

from PIL import Image

REASON_KINDS = (
    "missing image",
    "unreadable image",
    "empty report",
    "missing report file",
    "report not UTF-8",
    "bad label value",
    "bad bytes",
    "duplicate id",
    "no report text",
    "bad row",
    "malformed XML",
)

_HEADER_RE = re.compile(r"\b(findings|impression)\s*:", re.IGNORECASE)
_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


class CsvSourceError(Exception):
    """The CSV as a whole cannot be used (missing file, missing column); the message names it."""


class RowError(Exception):
    """One row cannot be used; ``str(err)`` is the reason ``"<kind>: <detail>"``."""

    def __init__(self, kind: str, detail: str = ""):
        assert kind in REASON_KINDS, kind
        self.kind = kind
        self.detail = detail
        super().__init__(f"{kind}: {detail}" if detail else kind)


@dataclass
class CsvRow:
    """One CSV data row, ready to ship to a worker (plain picklable fields only)."""
    row: int                      # 1-based data row number (the header row is not counted)
    id: str
    key: str
    image_path: str               # absolute path ('' when the cell was blank)
    image_ref: str                # the path as written in the CSV
    report_text: Optional[str] = None   # from --report-col
    report_path: Optional[str] = None   # from --report-file-col (absolute)
    report_ref: Optional[str] = None    # the report path as written in the CSV
    labels: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    error: Optional[str] = None   # reason found while reading the CSV (row is skipped)
    source: str = "csv"           # meta["source"]; the mimic-cxr and openi sources reuse this row type
    sections: Optional[dict] = None     # known {"findings", "impression"} (Open-i XML): text is built from them
    clinical_only: bool = False   # keep only the findings + impression of the report (MIMIC-CXR)


def split_sections(text: str) -> dict:
    """Split a report into {"findings", "impression"} at ``FINDINGS:`` / ``IMPRESSION:`` headers.

    Headers are matched case-insensitively anywhere in the text; a section runs to the next such
    header (text before the first header, e.g. INDICATION, is left out of both). Without any
    header the whole text is the findings and the impression is "".
    """
    matches = list(_HEADER_RE.finditer(text))
    if not matches:
        return {"findings": text.strip(), "impression": ""}
    sections = {"findings": [], "impression": []}
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        part = text[m.end():end].strip()
        if part:
            sections[m.group(1).lower()].append(part)
    return {name: "\n".join(parts) for name, parts in sections.items()}


def compose_report(sections: dict) -> str:
    """``FINDINGS: ...`` / ``IMPRESSION: ...`` text from section texts (empty ones left out), so
    that the stored report, its sections and the linker's entity spans agree."""
    parts = [f"{name.upper()}: {sections[name].strip()}" for name in ("findings", "impression")
             if (sections.get(name) or "").strip()]
    return "\n\n".join(parts)


def clinical_text(text: str, where: str) -> tuple[str, dict]:
    """(report text, sections) keeping only the findings and impression of a free-text report
    (MIMIC-CXR: indication, history and technique are not about the image); RowError 'no report
    text' when neither is there."""
    from mlip_ds.knowledge.sections import sections_dict

    secs = {k: v.strip() for k, v in sections_dict(text).items()}
    out = compose_report(secs)
    if not out:
        raise RowError("no report text", f"{where} has no FINDINGS or IMPRESSION section")
    return out, secs


def parse_label(value: str) -> Optional[int]:
    """'1'/'1.0' -> 1, '0'/'0.0' -> 0, '-1'/'-1.0' -> -1, blank -> None; anything else ValueError."""
    v = value.strip()
    if v == "":
        return None
    try:
        f = float(v)
    except ValueError:
        raise ValueError(f"{value!r}") from None
    if f not in (1.0, 0.0, -1.0):
        raise ValueError(f"{value!r}")
    return int(f)


def normalize_label_name(name: str) -> str:
    """'Pleural Effusion' -> 'pleural_effusion' (matches mlip_ds.data.schema.FINDINGS naming)."""
    out = re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")
    if not out:
        raise CsvSourceError(f"label column {name!r} has no usable name")
    return out


def make_key(sample_id: str) -> str:
    """WebDataset key from an id: only [A-Za-z0-9_-] (a '.' would split the key, '/' makes dirs)."""
    key = _KEY_BAD_CHARS.sub("_", sample_id).strip("_")
    return key or "sample"


def _has_bad_bytes(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _resolve(path: str, base: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def read_rows(
    csv_path: str,
    image_col: str = "image",
    report_col: Optional[str] = "report",
    report_file_col: Optional[str] = None,
    label_cols: Optional[list] = None,
    meta_cols: Optional[list] = None,
    id_col: Optional[str] = None,
    root: Optional[str] = None,
) -> tuple[list, Iterator[CsvRow]]:
    """Check the CSV header and return (label_names, iterator of CsvRow).

    ``label_cols=None`` means every column that is not the image, report, id or a meta column.
    Label names are normalized with :func:`normalize_label_name`. Raises CsvSourceError for a
    missing CSV, a missing column, or two label columns that normalize to the same name.
    """
    if not os.path.isfile(csv_path):
        raise CsvSourceError(f"CSV file not found: {csv_path}")
    if (report_col is None) == (report_file_col is None):
        raise CsvSourceError("give exactly one of report_col / report_file_col")
    base = root if root is not None else os.path.dirname(os.path.abspath(csv_path))
    base = os.path.abspath(base)
    meta_cols = list(meta_cols or [])

    # utf-8-sig drops a BOM; surrogateescape keeps bad bytes so that only their row is skipped.
    fh = open(csv_path, newline="", encoding="utf-8-sig", errors="surrogateescape")
    try:
        reader = csv.DictReader(fh)
        header = reader.fieldnames
    except Exception:
        fh.close()
        raise
    if not header:
        fh.close()
        raise CsvSourceError(f"{csv_path}: empty CSV (no header row)")
    header = [h for h in header]
    report_name = report_col if report_col is not None else report_file_col
    required = [image_col, report_name] + ([id_col] if id_col else []) + meta_cols
    if label_cols is not None:
        required += list(label_cols)
    for col in required:
        if col not in header:
            fh.close()
            raise CsvSourceError(
                f"{csv_path}: required column {col!r} not found (columns: {', '.join(header)})")
    if label_cols is None:
        used = {image_col, report_name, id_col, *meta_cols}
        label_cols = [h for h in header if h not in used and h]
    label_names = [normalize_label_name(c) for c in label_cols]
    dupes = {n for n in label_names if label_names.count(n) > 1}
    if dupes:
        fh.close()
        raise CsvSourceError(f"{csv_path}: label columns collide after normalizing: {sorted(dupes)}")

    def rows() -> Iterator[CsvRow]:
        seen: dict = {}
        with fh:
            for n, rec in enumerate(reader, start=1):
                rec = {k: ("" if v is None else v) for k, v in rec.items() if k is not None}
                image_ref = rec.get(image_col, "").strip()
                sample_id = rec.get(id_col, "").strip() if id_col else os.path.splitext(image_ref)[0]
                if not sample_id:
                    sample_id = f"row{n}"
                r = CsvRow(row=n, id=sample_id, key=make_key(sample_id),
                           image_path=_resolve(image_ref, base) if image_ref else "",
                           image_ref=image_ref)
                if report_col is not None:
                    r.report_text = rec.get(report_col, "")
                else:
                    ref = rec.get(report_file_col, "").strip()
                    r.report_ref = ref
                    r.report_path = _resolve(ref, base) if ref else ""
                r.meta = {c: rec.get(c, "") for c in meta_cols}
                r.error = _precheck(r, rec, report_col, label_cols, label_names, id_col, image_col)
                if r.error is None:
                    if r.key in seen:
                        r.error = f"duplicate id: key {r.key!r} already used by row {seen[r.key]}"
                    else:
                        seen[r.key] = n
                if _has_bad_bytes(r.id):  # never let lone surrogates reach the JSON
                    r.id = r.id.encode("utf-8", "replace").decode("utf-8")
                yield r

    return label_names, rows()


def _precheck(r: CsvRow, rec: dict, report_col, label_cols, label_names, id_col, image_col) -> Optional[str]:
    if report_col is not None and _has_bad_bytes(r.report_text or ""):
        return f"report not UTF-8: column {report_col!r} holds bytes that are not UTF-8"
    for col in [image_col, id_col, *r.meta.keys()]:
        if col and _has_bad_bytes(rec.get(col, "")):
            return f"bad bytes: column {col!r} holds bytes that are not UTF-8"
    if r.report_ref is not None and _has_bad_bytes(r.report_ref):
        return "bad bytes: the report file path holds bytes that are not UTF-8"
    if not r.image_ref:
        return "missing image: the image path cell is blank"
    labels = {}
    for col, name in zip(label_cols, label_names):
        raw = rec.get(col, "")
        try:
            value = parse_label(raw)
        except ValueError:
            shown = raw.encode("utf-8", "replace").decode("utf-8")
            return f"bad label value: column {col!r} = {shown!r} (expected 1, 0, -1 or blank)"
        if value is not None:
            labels[name] = value
    r.labels = labels
    return None


def read_report(r: CsvRow) -> str:
    """The row's report text; RowError for a missing/unreadable/non-UTF-8 file or an empty report."""
    if r.report_path is not None:
        if not r.report_path:
            raise RowError("missing report file", "the report file cell is blank")
        try:
            with open(r.report_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise RowError("missing report file", r.report_path) from None
        except OSError as e:
            raise RowError("missing report file", f"{r.report_path} ({e.strerror or e})") from None
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise RowError("report not UTF-8", f"{r.report_path} (bad byte at offset {e.start})") from None
    else:
        text = r.report_text or ""
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    if not text:
        raise RowError("empty report", r.report_path or f"row {r.row}")
    return text


def open_image(path: str, short_side: Optional[int] = None) -> tuple:
    """Open and fully decode an image -> (image, original (w, h)); RowError 'missing image' /
    'unreadable image'.

    With ``short_side``, a JPEG is decoded at the smallest DCT scale whose short side is still
    >= short_side (PIL draft mode: much faster for full-size radiographs, still deterministic).
    """
    if not os.path.isfile(path):
        raise RowError("missing image", path)
    from mlip_ds.sources.dicom import is_dicom, read_dicom
    if is_dicom(path):
        try:
            return read_dicom(path)
        except Exception as e:  # pydicom raises many types for bad / unsupported files
            raise RowError("unreadable image", f"{path} (DICOM: {type(e).__name__}: {e})") from None
    try:
        img = Image.open(path)
        orig_size = img.size
        if short_side and img.format == "JPEG" and min(img.size) > 2 * short_side:
            w, h = img.size
            s = short_side / min(w, h)
            img.draft("L", (max(1, int(w * s + 0.5)), max(1, int(h * s + 0.5))))
        img.load()
    except Exception as e:  # PIL raises many types for corrupt/truncated files
        raise RowError("unreadable image", f"{path} ({type(e).__name__}: {e})") from None
    return img, orig_size


def reason_kind(reason: str) -> str:
    """The kind part of a reason string (what the summary counts)."""
    return reason.split(": ", 1)[0]
