#!/usr/bin/env python
"""Build the packaged chest-radiograph knowledge base from its curation tables + shared data.

    python maintainer/build_kb.py [--shared-data DIR] [--curation-dir DIR] [--out-dir DIR] [--check] [--quiet]

Reads (never copies) the staged third-party data under ``--shared-data`` (default ``../shared/data``
next to the repository):
  radlabels/radlabels_aliases_v1.0.json          aliases + parent map of 49 CXR labels (MIT)
  chexpert_labeler/phrases/mention/*.txt         CheXpert labeler mention phrases (MIT)
  radiology_semantic_dict/imaging_signs.json     radiographic signs (definitions) (MIT)
  radiology_semantic_dict/radiology_synonyms.json  abbreviations (MIT)
  negbio/examples/cuis-cvpr2017.txt              CUIs NegBio used for ChestX-ray8 (public domain)
  PROVENANCE.md + each LICENSE                   versions and licenses for ATTRIBUTION.md
and writes, deterministically (same inputs -> byte-identical files), into ``--out-dir`` (default
``mlip_ds/knowledge/kb_data``):
  cxr_kb_v1.jsonl        the KB (format: mlip_ds/knowledge/kb.py)
  cxr_kb_v1.meta.json    kb_version, sha256, counts, source versions, alias clashes and how they
                         were resolved, unmapped source entries
  ATTRIBUTION.md         sources, versions, licenses

``--check`` builds in memory and exits 1 if the files in --out-dir differ (CI / review aid).

Curation (the data files in ``maintainer/kb_curation/``, described in its README.md): every concept,
its id, canonical name, definition, semantic type, label and relations come from the concept tables
(``<table>.csv``; definitions written for this project; ``signs.csv`` for the signs defined by
radiology_semantic_dict), how each source maps onto them from ``<source>.json``, and what each source
is and is used for (ATTRIBUTION.md) from ``sources.json``. UMLS CUIs are used only where
we are confident of them (several checked against the ChestX-ray8 paper's CUI table, NegBio's
list and public code); otherwise ids are stable local ones, "MLIP:<slug>". Aliases come from the
table and from the sources. An alias claimed by two concepts is resolved deterministically
(kb.resolve_alias_clashes: a concept's own name wins, then alias_owner.json, then source priority
curated > radlabels > chexpert_labeler > radiology_semantic_dict, then the smaller id); every
clash is listed in the meta file. Clashes between two curated entries are build errors.

Exit codes: 0 ok; 1 --check found differences; 2 missing/invalid input or an inconsistent table.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from mlip_ds.data.schema import FINDINGS, NO_FINDING
from mlip_ds.knowledge.kb import (CHEXPERT_LABELS, KNOWN_LABELS, Concept, KnowledgeBase,
                                  Relation, normalize_alias, resolve_alias_clashes, serialize_kb)

KB_NAME = "cxr_kb_v1"
KB_VERSION = "1.0.0"
FORMAT_VERSION = 1

CURATED = "mlip_curated"
RADLABELS = "radlabels"
CHEXPERT = "chexpert_labeler"
RSD = "radiology_semantic_dict"
NEGBIO = "negbio"
SOURCE_PRIORITY = {CURATED: 0, RADLABELS: 1, CHEXPERT: 2, RSD: 3}


class BuildError(RuntimeError):
    pass


# ================================================================================================
# Curation tables: the files in maintainer/kb_curation/ (their columns and keys: README.md there)
# ================================================================================================
CURATION_DIR = Path(__file__).resolve().parent / "kb_curation"
# the concept tables, in the order they are read (a table only groups its rows for editing)
CONCEPT_TABLES = ("anatomy", "categories", "pulmonary", "pleural", "cardiomediastinal", "other_findings", "devices",
                  "procedures", "descriptors")
CONCEPT_COLUMNS = ["slug", "cui", "semantic_type", "name", "definition", "aliases", "label", "is_a", "finding_site",
                   "associated_with"]
SIGN_COLUMNS = ["slug", "name", "aliases", "associated_with", "clause"]

Row = namedtuple("Row", "slug cui stype name definition aliases label is_a site assoc")


def _row(slug, cui, stype, name, definition, aliases="", label=None, is_a="", site="", assoc=""):
    """A concept row; ``aliases`` "a|b", ``is_a``/``site``/``assoc`` space-separated slugs, "" = none."""
    return Row(slug, cui or None, stype, name, definition, tuple(a for a in aliases.split("|") if a),
               label or None, tuple(is_a.split()), tuple(site.split()), tuple(assoc.split()))


@dataclass(frozen=True)
class Curation:
    rows: tuple[Row, ...]                      # the concept tables, in CONCEPT_TABLES order
    signs: tuple[dict, ...]                    # signs.csv: definitions from radiology_semantic_dict
    radlabels: dict                            # radlabels.json: labels, parents
    chexpert: dict                             # chexpert_labeler.json: default, class_concept, phrases
    rsd_abbreviations: tuple[str, ...]         # abbreviations.json: keys of radiology_synonyms.json
    alias_owner: dict[str, str]                # alias_owner.json: owners
    sources: dict[str, dict]                   # sources.json: files, license, provenance_dir, use


def _read_csv(path: Path, columns: list[str]) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != columns:
                raise BuildError(f"{path}: columns {reader.fieldnames}, expected {columns}")
            rows = []
            for row in reader:
                if None in row or None in row.values():
                    raise BuildError(f"{path}:{reader.line_num}: expected {len(columns)} fields")
                rows.append(row)
            return rows
    except FileNotFoundError:
        raise BuildError(f"missing curation file: {path}") from None


def load_curation(directory: Path = CURATION_DIR) -> Curation:
    rows = tuple(_row(*(r[c] for c in CONCEPT_COLUMNS))
                 for table in CONCEPT_TABLES for r in _read_csv(directory / f"{table}.csv", CONCEPT_COLUMNS))
    chexpert = _read_json(directory / "chexpert_labeler.json")
    sources = _read_json(directory / "sources.json")
    sources.pop("about", None)
    return Curation(rows=rows, signs=tuple(_read_csv(directory / "signs.csv", SIGN_COLUMNS)),
                    radlabels=_read_json(directory / "radlabels.json"),
                    chexpert={**chexpert, "class_concept": dict(chexpert["default"], **chexpert["class_concept"])},
                    rsd_abbreviations=tuple(_read_json(directory / "abbreviations.json")["abbreviations"]),
                    alias_owner=_read_json(directory / "alias_owner.json")["owners"], sources=sources)


# ================================================================================================
# Build
# ================================================================================================
class Draft:
    """A concept being assembled: curated fields + (alias, source) claims + relations + sources."""

    def __init__(self, row: Row):
        self.row = row
        self.id = row.cui if row.cui else f"MLIP:{row.slug}"
        self.aliases: dict[str, tuple[int, str]] = {}  # normalized -> (priority, surface form)
        self.relations: set[tuple[str, str]] = set()  # (type, target slug)
        self.sources: set[str] = {CURATED}
        for a in row.aliases:
            self.add_alias(a, CURATED)
        for kind, slugs in (("is_a", row.is_a), ("finding_site", row.site), ("associated_with", row.assoc)):
            self.relations |= {(kind, s) for s in slugs}

    def add_alias(self, alias: str, source: str) -> None:
        alias = " ".join(alias.split())
        key = normalize_alias(alias)
        if not key or key == normalize_alias(self.row.name):
            return
        claim = (SOURCE_PRIORITY[source], alias)
        if key not in self.aliases or claim < self.aliases[key]:
            self.aliases[key] = claim


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BuildError(f"missing input file: {path}") from None
    except json.JSONDecodeError as e:
        raise BuildError(f"{path}: invalid JSON: {e}") from None


def _read_lines(path: Path) -> list[str]:
    try:
        return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except FileNotFoundError:
        raise BuildError(f"missing input file: {path}") from None


def _parse_provenance(shared: Path, sources: dict[str, dict]) -> dict[str, dict]:
    """PROVENANCE.md table rows for the directories this build reads."""
    path = shared / "PROVENANCE.md"
    rows = {}
    for line in _read_lines(path):
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("dir", "---"):
            continue
        for src, source in sources.items():
            if cells[0].startswith(source["provenance_dir"]):
                rows[src] = {"dir": cells[0], "origin": cells[1], "version": cells[2], "license": cells[3]}
    missing = sorted(set(sources) - set(rows))
    if missing:
        raise BuildError(f"{path}: no provenance row for {missing}")
    return rows


def build(shared: Path, curation: Curation | None = None) -> dict[str, bytes]:
    """Build the KB; returns {file name: bytes} for the output directory. ``curation``: default the
    tables in maintainer/kb_curation/."""
    if not shared.is_dir():
        raise BuildError(f"shared data directory not found: {shared} (pass --shared-data DIR)")
    cur = curation or load_curation()
    source_files = {src: source["files"] for src, source in cur.sources.items()}
    rows = list(cur.rows)
    sign_file = shared / cur.sources[RSD]["signs_file"]
    signs = _read_json(sign_file)
    for sign in cur.signs:
        slug = sign["slug"]
        if slug not in signs:
            raise BuildError(f"{sign_file}: no sign {slug!r}")
        s = signs[slug]
        indicates = s["indicates"].strip().rstrip(".")
        if len(indicates) > 1 and indicates[1].islower():  # "Pulmonary embolism" -> "pulmonary embolism"
            indicates = indicates[0].lower() + indicates[1:]
        definition = s["description"].strip().rstrip(".") + "; " + (sign["clause"] or "suggests " + indicates) + "."
        rows.append(_row(slug, None, "finding", sign["name"], definition, sign["aliases"], None, "radiographic_sign",
                         "", sign["associated_with"]))

    drafts: dict[str, Draft] = {}
    for row in rows:
        if row.slug in drafts:
            raise BuildError(f"concept slug {row.slug!r} is defined twice")
        if row.stype not in ("finding", "disease", "anatomy", "device", "descriptor", "procedure"):
            raise BuildError(f"{row.slug}: bad semantic type {row.stype!r}")
        if row.label is not None and row.label not in KNOWN_LABELS:
            raise BuildError(f"{row.slug}: label {row.label!r} is not one of {KNOWN_LABELS}")
        drafts[row.slug] = Draft(row)
    for sign in cur.signs:
        drafts[sign["slug"]].sources.add(RSD)
    ids = [d.id for d in drafts.values()]
    dup_ids = sorted({i for i in ids if ids.count(i) > 1})
    if dup_ids:
        raise BuildError(f"ids used by more than one concept: {dup_ids}")
    for d in drafts.values():
        for kind, target in d.relations:
            if target not in drafts:
                raise BuildError(f"{d.row.slug}: {kind} target {target!r} is not a concept of the table")
    _check_curated_clashes(drafts, cur.alias_owner)
    report: dict = {"unmapped": {}}

    # radlabels: aliases + parent map
    radlabels = _read_json(shared / source_files[RADLABELS])
    for label, entry in sorted(radlabels["ALIASES"].items()):
        slug = cur.radlabels["labels"].get(label)
        if slug is None:
            report["unmapped"].setdefault(RADLABELS, []).append(label)
            continue
        drafts[slug].sources.add(RADLABELS)
        for alias in entry["aliases"]:
            drafts[slug].add_alias(alias, RADLABELS)
    for label, parent in sorted(radlabels["PARENT_MAP"].items()):
        child, parent_slug = cur.radlabels["labels"].get(label), cur.radlabels["parents"].get(parent)
        if child is None or parent_slug is None:
            report["unmapped"].setdefault(RADLABELS, []).append(f"{label} -> {parent}")
            continue
        drafts[parent_slug].sources.add(RADLABELS)
        if child != parent_slug and parent_slug not in _is_a_closure(drafts, child):
            drafts[child].relations.add(("is_a", parent_slug))

    # CheXpert labeler mention phrases
    mention_dir = shared / source_files[CHEXPERT]
    default = cur.chexpert["default"]
    for label in CHEXPERT_LABELS:
        path = mention_dir / f"{label}.txt"
        phrases = _read_lines(path)
        drafts[cur.chexpert["class_concept"][label]].sources.add(CHEXPERT)
        table = cur.chexpert["phrases"].get(label, {})
        for phrase in phrases:
            if phrase in table:
                slug = table[phrase]
            elif "_" in phrase or default[label] is None:
                slug = None
                report["unmapped"].setdefault(CHEXPERT, []).append(f"{label}: {phrase}")
            else:
                slug = default[label]
            if slug is not None:
                drafts[slug].add_alias(phrase, CHEXPERT)
                drafts[slug].sources.add(CHEXPERT)

    # radiology_semantic_dict abbreviations
    synonyms = _read_json(shared / source_files[RSD])
    for key in cur.rsd_abbreviations:
        if key not in synonyms:
            raise BuildError(f"{shared / source_files[RSD]}: no entry {key!r}")
        target = None
        for expansion in synonyms[key]:
            exp = normalize_alias(expansion)
            hits = [s for s, d in drafts.items() if exp == normalize_alias(d.row.name)]  # names first
            if not hits:  # else the concepts holding it as an alias from the best-priority source
                claims = {s: d.aliases[exp][0] for s, d in drafts.items() if exp in d.aliases}
                hits = [s for s, prio in claims.items() if prio == min(claims.values())]
            if len(hits) == 1:
                target = hits[0]
                break
        if target is None:
            raise BuildError(f"abbreviation {key!r} ({synonyms[key]}) matches no single KB concept")
        drafts[target].add_alias(key.upper(), RSD)
        drafts[target].sources.add(RSD)

    # NegBio CUI list: attest our CUIs
    negbio = _read_lines(shared / source_files[NEGBIO])
    by_id = {d.id: d for d in drafts.values()}
    for cui in negbio:
        if cui in by_id:
            by_id[cui].sources.add(NEGBIO)
    report["negbio_cuis_not_in_kb"] = sorted(set(negbio) - set(by_id))

    concepts, clashes = _finalize(drafts, cur.alias_owner)
    kb = KnowledgeBase(concepts)
    _check_kb(kb)
    data = serialize_kb(concepts)
    provenance = _parse_provenance(shared, cur.sources)
    meta = {
        "kb_name": KB_NAME, "kb_version": KB_VERSION, "format_version": FORMAT_VERSION,
        "file": f"{KB_NAME}.jsonl", "sha256": hashlib.sha256(data).hexdigest(),
        "n_concepts": len(kb), "by_semantic_type": kb.counts(),
        "n_with_umls_cui": sum(1 for c in kb if c.id.startswith("C")),
        "n_aliases": sum(len(c.aliases) for c in kb),
        "labels": {label: [c.id for c in kb.concepts_for_label(label)] for label in kb.labels},
        "built_by": "maintainer/build_kb.py",
        "sources": {src: {"files": source_files[src], **provenance[src]} for src in sorted(provenance)},
        "alias_clashes": clashes,
        "unmapped_source_entries": {k: sorted(v) for k, v in sorted(report["unmapped"].items())},
        "negbio_cuis_not_in_kb": report["negbio_cuis_not_in_kb"],
    }
    meta_bytes = (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    attribution = _attribution(shared, provenance, kb, cur.sources).encode("utf-8")
    return {f"{KB_NAME}.jsonl": data, f"{KB_NAME}.meta.json": meta_bytes, "ATTRIBUTION.md": attribution}


def _is_a_closure(drafts: dict[str, Draft], slug: str) -> set[str]:
    seen, stack = set(), [slug]
    while stack:
        for kind, target in drafts[stack.pop()].relations:
            if kind == "is_a" and target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


def _check_curated_clashes(drafts: dict[str, Draft], alias_owner: dict[str, str]) -> None:
    """Two curated entries may not claim the same surface form (unless alias_owner.json settles it)."""
    owners: dict[str, list[str]] = {}
    for slug, d in drafts.items():
        owners.setdefault(normalize_alias(d.row.name), []).append(slug)
        for key in d.aliases:
            owners.setdefault(key, []).append(slug)
    bad = {k: v for k, v in owners.items() if len(v) > 1 and k not in alias_owner}
    if bad:
        raise BuildError("curated surface forms claimed by several concepts (fix the table or add to "
                         f"kb_curation/alias_owner.json): {dict(sorted(bad.items()))}")
    for slug in drafts:
        if slug in _is_a_closure(drafts, slug):
            raise BuildError(f"is_a cycle through {slug!r}")


def _finalize(drafts: dict[str, Draft], alias_owner: dict[str, str]) -> tuple[list[Concept], list[dict]]:
    slug_of = {d.id: s for s, d in drafts.items()}
    concepts = []
    priority: dict[tuple[str, str], int] = {}
    for slug, d in drafts.items():
        aliases = []
        for key, (prio, form) in sorted(d.aliases.items()):
            aliases.append(form)
            priority[(d.id, key)] = prio
        rels = tuple(Relation(kind, drafts[t].id) for kind, t in sorted(d.relations))
        concepts.append(Concept(d.id, d.row.name, tuple(aliases), d.row.stype, d.row.definition, rels,
                                d.row.label, tuple(sorted(d.sources))))

    def rank(concept: Concept, alias: str) -> tuple:
        key = normalize_alias(alias)
        owner = alias_owner.get(key)
        return (0 if owner == slug_of[concept.id] else 1, priority[(concept.id, key)])

    concepts, clashes = resolve_alias_clashes(concepts, rank)
    for clash in clashes:
        clash["kept"] = f"{clash['kept']} ({drafts[slug_of[clash['kept']]].row.name})"
    return sorted(concepts, key=lambda c: c.id), clashes


def _check_kb(kb: KnowledgeBase) -> None:
    missing = [label for label in list(FINDINGS) + [NO_FINDING] + list(CHEXPERT_LABELS)
               if not kb.concepts_for_label(label)]
    if missing:
        raise BuildError(f"labels without a concept: {missing}")
    if len(kb) < 200:
        raise BuildError(f"only {len(kb)} concepts (expected >= 200)")
    empty = [c.id for c in kb if not c.definition]
    if empty:
        raise BuildError(f"concepts without a definition: {empty}")


def _attribution(shared: Path, provenance: dict, kb: KnowledgeBase, sources: dict[str, dict]) -> str:
    counts = kb.counts()
    lines = [
        f"# Attribution: {KB_NAME} (version {KB_VERSION})",
        "",
        f"`{KB_NAME}.jsonl` ({len(kb)} concepts: " + ", ".join(f"{n} {t}" for t, n in counts.items()) + ")",
        "is generated by `maintainer/build_kb.py` from its curation tables in `maintainer/kb_curation/`",
        "(concept selection, canonical names, definitions, semantic types, relations and label mapping,",
        "written for mlip-ds) and from the third-party data below, read from `../shared/data` at build time.",
        "Only derived content (aliases, relations, short definitions of radiographic signs, source tags) is",
        "in this repository; the source files are not.",
        "",
        "Concept ids: UMLS CUIs where one was identified with confidence, else local ids `MLIP:<slug>`.",
        "Only the identifiers are used; the KB contains no UMLS names, definitions or relations. A KB",
        "built from a licensed UMLS release (`maintainer/umls_to_kb.py`) is subject to the UMLS license and",
        "must not be committed here.",
        "",
        "| source | used for | origin | version / commit | license |",
        "|---|---|---|---|---|",
    ]
    for src in sorted(provenance):
        p = provenance[src]
        lines.append(f"| {src} (`{p['dir']}`) | {sources[src]['use']} | {p['origin']} | {p['version']} | {p['license']} |")
    lines += ["", "## License notices", ""]
    for src in sorted(provenance):
        path = shared / sources[src]["license"]
        text = path.read_text(encoding="utf-8").strip() if path.is_file() else None
        if text is None:
            raise BuildError(f"missing license file: {path}")
        lines += [f"### {src}", "", "```", *[ln.rstrip() for ln in text.splitlines()], "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared-data", type=Path, default=ROOT.parent / "shared" / "data",
                   help="directory with the staged source data (default: ../shared/data)")
    p.add_argument("--curation-dir", type=Path, default=CURATION_DIR,
                   help="the curation tables (default: maintainer/kb_curation)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "mlip_ds" / "knowledge" / "kb_data",
                   help="where to write the KB, its meta file and ATTRIBUTION.md")
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if the files in --out-dir differ")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    args = p.parse_args(argv)
    try:
        files = build(args.shared_data, load_curation(args.curation_dir))
    except BuildError as e:
        print(f"build_kb: error: {e}", file=sys.stderr)
        return 2
    meta = json.loads(files[f"{KB_NAME}.meta.json"])
    if args.check:
        stale = [n for n, data in files.items()
                 if not (args.out_dir / n).is_file() or (args.out_dir / n).read_bytes() != data]
        if stale:
            print(f"build_kb: out of date in {args.out_dir}: {stale}", file=sys.stderr)
            return 1
        if not args.quiet:
            print(f"build_kb: {args.out_dir} is up to date ({meta['n_concepts']} concepts)")
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        tmp = args.out_dir / (name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, args.out_dir / name)
    if not args.quiet:
        print(f"build_kb: wrote {meta['n_concepts']} concepts to {args.out_dir / meta['file']} "
              f"({meta['by_semantic_type']}); {len(meta['alias_clashes'])} alias clashes resolved "
              f"(listed in {KB_NAME}.meta.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
