"""The shard sample schema (stable from schema version 1; documented in README.md).

A sample in a WebDataset tar is a group of members sharing one ``__key__``:
  ``<key>.png`` or ``<key>.jpg``  8-bit grayscale radiograph
  ``<key>.txt``                    the report text (UTF-8)
  ``<key>.json``                   {"id", "sections": {"findings", "impression"}, "entities": [...],
                                    "labels": {finding: 1|0|-1}, "meta": {...}}
  ``<key>.seg.png`` (optional)     uint8 bit mask: bit i set where FINDINGS[i] is present
"""
from __future__ import annotations

SCHEMA_VERSION = 1

# Label names used by the built-in synthetic data and the probe; CSV sources may bring any names.
FINDINGS = (
    "atelectasis",
    "cardiomegaly",
    "consolidation",
    "edema",
    "nodule",
    "pleural_effusion",
    "pneumonia",
    "pneumothorax",
)
NO_FINDING = "no_finding"
LABEL_VALUES = (1, 0, -1)  # positive, negative, uncertain (CheXpert convention)
ENTITY_FIELDS = ("cui", "name", "start", "end", "negated", "uncertain")


class SchemaError(ValueError):
    """A sample's JSON does not follow the schema; the message names the key and field."""


def validate_sample_json(meta: dict, key: str = "?") -> None:
    """Raise SchemaError naming the sample key and field when ``meta`` breaks the schema."""
    if not isinstance(meta, dict):
        raise SchemaError(f"sample {key}: json must be an object, got {type(meta).__name__}")
    for field in ("id", "sections", "entities", "labels", "meta"):
        if field not in meta:
            raise SchemaError(f"sample {key}: json is missing field '{field}'")
    sections = meta["sections"]
    if not isinstance(sections, dict) or not {"findings", "impression"} <= set(sections):
        raise SchemaError(f"sample {key}: 'sections' must hold 'findings' and 'impression'")
    if not isinstance(meta["entities"], list):
        raise SchemaError(f"sample {key}: 'entities' must be a list")
    for i, ent in enumerate(meta["entities"]):
        missing = [f for f in ENTITY_FIELDS if f not in ent]
        if missing:
            raise SchemaError(f"sample {key}: entities[{i}] is missing {missing}")
    if not isinstance(meta["labels"], dict):
        raise SchemaError(f"sample {key}: 'labels' must be an object")
    for name, value in meta["labels"].items():
        if value not in LABEL_VALUES:
            raise SchemaError(f"sample {key}: labels['{name}'] = {value!r}, expected one of {LABEL_VALUES}")
    if not isinstance(meta["meta"], dict):
        raise SchemaError(f"sample {key}: 'meta' must be an object")
