"""Open-i / IU X-ray source for ``tools/make_shards.py openi``, in its two common layouts.

* The original report XML (``ecgen-radiology/*.xml``): one report per file, its sections in
  ``<AbstractText Label="FINDINGS|IMPRESSION|INDICATION|COMPARISON">`` and one
  ``<parentImage id="CXR1_1_IM-0001-3001">`` per image, the image being
  ``IMAGES/<id>.png`` (``NLMCXR_png``). One job per image, files in numeric order (1.xml, 2.xml, ...).
* R2Gen's ``annotation.json``: ``{"train"|"val"|"test": [{"id", "report", "image_path": [...],
  "split"}]}`` with images under ``images/``; one job per image of the chosen split.

The report is the findings + impression (Open-i's indication/comparison are not about the image);
a report with neither is skipped (``no report text``), as is a file that is not well-formed XML
(``malformed XML``). Open-i has no label table: labels come from the linked entities.
"""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET

from mlip_ds.sources.csv_source import CsvRow, CsvSourceError, compose_report, make_key

ANNOTATION_SPLITS = ("train", "val", "test")


def _numeric_order(name: str):
    stem = os.path.splitext(name)[0]
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


def parse_report_xml(path: str) -> tuple[str, dict, list, dict]:
    """(report uid, {"findings", "impression"}, parentImage ids, extra meta) of one Open-i XML;
    raises ET.ParseError / OSError for a bad file."""
    root = ET.parse(path).getroot()
    sections = {"findings": "", "impression": ""}
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").lower()
        if label in sections:
            sections[label] = " ".join("".join(node.itertext()).split())
    uid = root.find("uId")
    uid = uid.get("id") if uid is not None else os.path.splitext(os.path.basename(path))[0]
    images = [p.get("id") for p in root.findall("parentImage") if p.get("id")]
    mesh = [m.text.strip() for m in root.iter("major") if m.text and m.text.strip()]
    return uid, sections, images, {"mesh": mesh}


def read_xml_jobs(xml_dir: str, images_dir: str, image_ext: str = "png") -> list:
    """One job per parentImage of every ``*.xml`` in ``xml_dir`` (a bad file is one skipped job)."""
    if not os.path.isdir(xml_dir):
        raise CsvSourceError(f"Open-i report folder not found: {xml_dir}")
    names = sorted((n for n in os.listdir(xml_dir) if n.lower().endswith(".xml")), key=_numeric_order)
    if not names:
        raise CsvSourceError(f"{xml_dir}: no *.xml report files")
    jobs: list = []
    for n, name in enumerate(names, start=1):
        path = os.path.join(xml_dir, name)
        job = CsvRow(row=n, id=os.path.splitext(name)[0], key=make_key(name), image_path="", image_ref="",
                     source="openi")
        try:
            uid, sections, image_ids, extra = parse_report_xml(path)
        except (ET.ParseError, OSError, UnicodeError) as e:
            job.error = f"malformed XML: {path} ({type(e).__name__}: {e})"
            jobs.append(job)
            continue
        text = compose_report(sections)
        if not image_ids or not text:
            job.id = uid
            job.error = (f"no report text: {path} has no FINDINGS or IMPRESSION" if not text
                         else f"missing image: {path} lists no parentImage")
            jobs.append(job)
            continue
        for image_id in image_ids:
            ref = f"{image_id}.{image_ext}"
            jobs.append(CsvRow(row=n, id=image_id, key=make_key(image_id), image_path=os.path.join(images_dir, ref),
                               image_ref=ref, report_text=text, sections=sections, source="openi",
                               meta={"report_id": uid, "xml": name, **extra}))
    return jobs


def read_annotation_jobs(annotation: str, images_dir: str, split: str) -> list:
    """One job per image of ``split`` in an R2Gen-style annotation.json (entry order kept)."""
    if split not in ANNOTATION_SPLITS:
        raise CsvSourceError(f"split {split!r} is not one of {ANNOTATION_SPLITS}")
    try:
        with open(annotation, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CsvSourceError(f"annotation file not found: {annotation}") from None
    except (json.JSONDecodeError, UnicodeError) as e:
        raise CsvSourceError(f"{annotation}: not a JSON file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get(split), list):
        raise CsvSourceError(f"{annotation}: no list under key {split!r} (keys: {sorted(data) if isinstance(data, dict) else '-'})")
    jobs: list = []
    for n, entry in enumerate(data[split], start=1):
        where = f"{annotation} {split}[{n - 1}]"
        if not (isinstance(entry, dict) and isinstance(entry.get("id"), str) and isinstance(entry.get("report"), str)
                and isinstance(entry.get("image_path"), list)):
            jobs.append(CsvRow(row=n, id=f"{split}{n}", key=f"{split}{n}", image_path="", image_ref="", source="openi",
                               error=f"bad row: {where} needs a string 'id', a string 'report' and a list 'image_path'"))
            continue
        text = " ".join(entry["report"].split())
        for i, ref in enumerate(entry["image_path"]):
            ref = str(ref)
            job = CsvRow(row=n, id=f"{entry['id']}/{i}", key=make_key(f"{entry['id']}_{i}"),
                         image_path=os.path.join(images_dir, ref), image_ref=ref, report_text=text, source="openi",
                         sections={"findings": text, "impression": ""},
                         meta={"report_id": entry["id"], "split": entry.get("split", split), "view_index": i})
            if not text:
                job.error = f"no report text: {where} has an empty report"
            jobs.append(job)
    return jobs

