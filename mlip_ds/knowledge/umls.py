"""Import concepts from a licensed UMLS release (Rich Release Format, RRF) into the KB format.

The UMLS Metathesaurus is licensed (UTS account) and several GB large, so it is never shipped: the
user points :func:`read_umls` (CLI: ``maintainer/umls_to_kb.py``) at the release's ``META`` directory.
Files are streamed one line at a time, in this order, keeping in memory only what the kept
concepts need:

  MRSTY.RRF    CUI|TUI|STN|STY|ATUI|CVF|                       semantic types -> which CUIs to keep
  MRCONSO.RRF  CUI|LAT|TS|LUI|STT|SUI|ISPREF|AUI|SAUI|SCUI|SDUI|SAB|TTY|CODE|STR|SRL|SUPPRESS|CVF|
                                                                 names and aliases
  MRDEF.RRF    CUI|AUI|ATUI|SATUI|SAB|DEF|SUPPRESS|CVF|          definitions
  MRREL.RRF    CUI1|AUI1|STYPE1|REL|CUI2|AUI2|STYPE2|RELA|RUI|SRUI|SAB|SL|RG|DIR|SUPPRESS|CVF|
                                                                 relations between kept concepts

Every line is '|'-separated and '|'-terminated; a line with the wrong number of fields stops the
import with an error naming the file and line. Rows are kept when: the CUI has a selected semantic
type (TUI), the atom's language is selected (default English), SUPPRESS is "N" (obsolete and
suppressible rows are skipped), and, with ``sabs``, the source vocabulary (SAB) is selected (atoms,
definitions and relations; a concept with no kept atom is dropped).

Names: the first kept atom with TS=P, STT=PF, ISPREF=Y is the canonical name, else the first kept
atom; the other distinct strings are aliases. Definitions: the first from the most preferred source
(DEFINITION_SAB_ORDER), collapsed to one line. Relations (MRREL reads "CUI2 is REL/RELA of CUI1",
the UMLS Reference Manual's "relationship of the second concept to the first"):
  RELA isa              -> CUI2 is_a CUI1            RELA inverse_isa -> CUI1 is_a CUI2
  RELA has_finding_site -> CUI2 finding_site CUI1    RELA finding_site_of -> CUI1 finding_site CUI2
  RELA associated_with  -> CUI2 associated_with CUI1
  REL PAR (no RELA)     -> CUI1 is_a CUI2            REL CHD (no RELA) -> CUI2 is_a CUI1
Semantic types map onto the KB's six types by TUI (TUI_SEMANTIC_TYPE; TYPE_PRECEDENCE decides for
concepts with several). Labels are null, except where a concept is merged with the packaged KB.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from mlip_ds.knowledge.kb import Concept, Relation, normalize_alias, resolve_alias_clashes

MRCONSO_COLUMNS = ("CUI", "LAT", "TS", "LUI", "STT", "SUI", "ISPREF", "AUI", "SAUI", "SCUI", "SDUI", "SAB",
                   "TTY", "CODE", "STR", "SRL", "SUPPRESS", "CVF")
MRSTY_COLUMNS = ("CUI", "TUI", "STN", "STY", "ATUI", "CVF")
MRREL_COLUMNS = ("CUI1", "AUI1", "STYPE1", "REL", "CUI2", "AUI2", "STYPE2", "RELA", "RUI", "SRUI", "SAB", "SL",
                 "RG", "DIR", "SUPPRESS", "CVF")
MRDEF_COLUMNS = ("CUI", "AUI", "ATUI", "SATUI", "SAB", "DEF", "SUPPRESS", "CVF")
RRF_FILES = {"MRSTY.RRF": MRSTY_COLUMNS, "MRCONSO.RRF": MRCONSO_COLUMNS, "MRDEF.RRF": MRDEF_COLUMNS,
             "MRREL.RRF": MRREL_COLUMNS}

# UMLS semantic types (TUI) -> KB semantic type.
TUI_SEMANTIC_TYPE = {
    "T047": "disease",     # Disease or Syndrome
    "T191": "disease",     # Neoplastic Process
    "T019": "disease",     # Congenital Abnormality
    "T046": "finding",     # Pathologic Function
    "T033": "finding",     # Finding
    "T184": "finding",     # Sign or Symptom
    "T037": "finding",     # Injury or Poisoning
    "T020": "finding",     # Acquired Abnormality
    "T190": "finding",     # Anatomical Abnormality
    "T034": "finding",     # Laboratory or Test Result
    "T017": "anatomy",     # Anatomical Structure
    "T023": "anatomy",     # Body Part, Organ, or Organ Component
    "T029": "anatomy",     # Body Location or Region
    "T030": "anatomy",     # Body Space or Junction
    "T022": "anatomy",     # Body System
    "T024": "anatomy",     # Tissue
    "T074": "device",      # Medical Device
    "T203": "device",      # Drug Delivery Device
    "T073": "device",      # Manufactured Object
    "T060": "procedure",   # Diagnostic Procedure
    "T061": "procedure",   # Therapeutic or Preventive Procedure
    "T058": "procedure",   # Health Care Activity
    "T080": "descriptor",  # Qualitative Concept
    "T081": "descriptor",  # Quantitative Concept
    "T082": "descriptor",  # Spatial Concept
    "T079": "descriptor",  # Temporal Concept
}
# The default selection: what chest radiograph reports talk about.
DEFAULT_TUIS = ("T017", "T019", "T020", "T023", "T029", "T030", "T033", "T037", "T046", "T047", "T060", "T061",
                "T074", "T080", "T082", "T184", "T190", "T191", "T203")
TYPE_PRECEDENCE = ("disease", "finding", "device", "procedure", "anatomy", "descriptor")
DEFAULT_LANGUAGES = ("ENG",)
DEFINITION_SAB_ORDER = ("MSH", "NCI", "CSP", "MEDLINEPLUS", "HPO", "NCI_NCI-GLOSS", "SNOMEDCT_US")
RELA_MAP = {  # RELA -> (KB relation, "21": CUI2 -> CUI1 | "12": CUI1 -> CUI2)
    "isa": ("is_a", "21"), "inverse_isa": ("is_a", "12"),
    "has_finding_site": ("finding_site", "21"), "finding_site_of": ("finding_site", "12"),
    "associated_with": ("associated_with", "21"),
}
REL_MAP = {"PAR": ("is_a", "12"), "CHD": ("is_a", "21")}  # used when RELA is empty

_TAG_RE = re.compile(r"<[^>]+>")


class UMLSError(ValueError):
    """A UMLS release is missing files or has a malformed line (the message names which)."""


@dataclass
class UMLSImport:
    concepts: list[Concept]
    stats: dict = field(default_factory=dict)
    clashes: list[dict] = field(default_factory=list)


def find_meta_dir(umls_dir: str | Path, need_relations: bool = True) -> Path:
    """The directory holding the RRF files: ``umls_dir`` itself or its ``META`` subdirectory."""
    umls_dir = Path(umls_dir)
    if not umls_dir.is_dir():
        raise UMLSError(f"UMLS directory not found: {umls_dir}")
    needed = [n for n in RRF_FILES if need_relations or n != "MRREL.RRF"]
    for cand in (umls_dir, umls_dir / "META"):
        if cand.is_dir() and (cand / "MRCONSO.RRF").is_file():
            missing = [n for n in needed if not (cand / n).is_file()]
            if missing:
                raise UMLSError(f"UMLS file(s) missing in {cand}: {', '.join(missing)} (a UMLS release's META "
                                f"directory has {', '.join(needed)})")
            return cand
    raise UMLSError(f"UMLS file(s) missing in {umls_dir}: {', '.join(needed)} not found there nor in "
                    f"{umls_dir / 'META'} (point --umls-dir at the release's META directory)")


def iter_rrf(path: str | Path, columns: Sequence[str],
             keep: Callable[[str], bool] | None = None) -> Iterator[tuple[int, list[str]]]:
    """Stream (line number, fields) of an RRF file, checking every line's field count.

    ``keep(first_field)`` skips lines cheaply before they are split (e.g. CUIs not selected).
    """
    path = Path(path)
    n = len(columns)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise UMLSError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line:
                continue
            if line.count("|") != n or not line.endswith("|"):
                found = line.count("|") + (0 if line.endswith("|") else 1)
                raise UMLSError(f"{path}:{lineno}: malformed line: expected {n} '|'-terminated fields "
                                f"({'|'.join(columns)}|), found {found}: {line[:120]!r}")
            if keep is not None and not keep(line[:line.index("|")]):
                continue
            yield lineno, line.split("|")[:n]


def _one_line(text: str) -> str:
    return " ".join(_TAG_RE.sub(" ", text).split())


def read_umls(umls_dir: str | Path, tuis: Iterable[str] | None = DEFAULT_TUIS, sabs: Iterable[str] | None = None,
              languages: Iterable[str] = DEFAULT_LANGUAGES, relations: bool = True,
              max_aliases: int | None = None, progress: Callable[[str], None] | None = None) -> UMLSImport:
    """Read a UMLS release into KB concepts (aliases made unique across concepts).

    ``tuis=None`` keeps every semantic type that maps to a KB type (TUI_SEMANTIC_TYPE); ``sabs=None``
    keeps every source vocabulary.
    """
    meta = find_meta_dir(umls_dir, need_relations=relations)
    say = progress or (lambda msg: None)
    tui_set = set(TUI_SEMANTIC_TYPE) if tuis is None else set(tuis)
    unknown = sorted(tui_set - set(TUI_SEMANTIC_TYPE))
    if unknown:
        raise UMLSError(f"semantic types {unknown} have no KB semantic type; choose from {sorted(TUI_SEMANTIC_TYPE)}")
    sab_set = None if sabs is None else set(sabs)
    lang_set = set(languages)
    stats: dict = {"tuis": sorted(tui_set), "sabs": sorted(sab_set) if sab_set else None,
                   "languages": sorted(lang_set)}

    # 1. semantic types
    types: dict[str, set[str]] = {}
    n_rows = 0
    for _, row in iter_rrf(meta / "MRSTY.RRF", MRSTY_COLUMNS):
        n_rows += 1
        if row[1] in tui_set:
            types.setdefault(row[0], set()).add(row[1])
    stats["mrsty_rows"] = n_rows
    stats["cuis_with_selected_tui"] = len(types)
    say(f"MRSTY: {len(types)} concepts with a selected semantic type")

    # 2. names and aliases
    names: dict[str, str] = {}
    forms: dict[str, dict[str, str]] = {}  # cui -> normalized -> first surface form
    atom_sabs: dict[str, set[str]] = {}
    skipped = {"language": 0, "suppressed": 0, "sab": 0}
    for _, row in iter_rrf(meta / "MRCONSO.RRF", MRCONSO_COLUMNS, keep=types.__contains__):
        cui, lat, ts, stt, ispref = row[0], row[1], row[2], row[4], row[6]
        sab, text, suppress = row[11], row[14], row[16]
        if lat not in lang_set:
            skipped["language"] += 1
            continue
        if suppress != "N":
            skipped["suppressed"] += 1
            continue
        if sab_set is not None and sab not in sab_set:
            skipped["sab"] += 1
            continue
        text = " ".join(text.split())
        if not text:
            continue
        atom_sabs.setdefault(cui, set()).add(sab)
        bucket = forms.setdefault(cui, {})
        bucket.setdefault(normalize_alias(text), text)
        if cui not in names and ts == "P" and stt == "PF" and ispref == "Y":
            names[cui] = text
    stats["mrconso_skipped"] = skipped
    kept = sorted(forms)
    stats["concepts"] = len(kept)
    say(f"MRCONSO: {len(kept)} concepts kept")

    # 3. definitions
    definitions: dict[str, tuple[int, str]] = {}
    order = {sab: i for i, sab in enumerate(DEFINITION_SAB_ORDER)}
    for _, row in iter_rrf(meta / "MRDEF.RRF", MRDEF_COLUMNS, keep=forms.__contains__):
        cui, sab, text, suppress = row[0], row[4], row[5], row[6]
        if suppress != "N" or (sab_set is not None and sab not in sab_set):
            continue
        text = _one_line(text)
        if not text:
            continue
        rank = order.get(sab, len(order))
        if cui not in definitions or rank < definitions[cui][0]:
            definitions[cui] = (rank, text)
    stats["definitions"] = len(definitions)

    # 4. relations between kept concepts
    rels: dict[str, set[Relation]] = {}
    if relations:
        for _, row in iter_rrf(meta / "MRREL.RRF", MRREL_COLUMNS, keep=forms.__contains__):
            cui1, rel, cui2, rela, sab, suppress = row[0], row[3], row[4], row[7], row[10], row[14]
            if cui2 not in forms or cui1 == cui2 or suppress != "N":
                continue
            if sab_set is not None and sab not in sab_set:
                continue
            mapped = RELA_MAP.get(rela) if rela else REL_MAP.get(rel)
            if mapped is None:
                continue
            kind, direction = mapped
            src, dst = (cui2, cui1) if direction == "21" else (cui1, cui2)
            rels.setdefault(src, set()).add(Relation(kind, dst))
    stats["relations"] = sum(len(v) for v in rels.values())

    concepts = []
    for cui in kept:
        bucket = forms[cui]
        name = names.get(cui) or next(iter(bucket.values()))
        aliases = [a for k, a in bucket.items() if k != normalize_alias(name)]
        if max_aliases is not None:
            aliases = aliases[:max_aliases]
        stype = min((TUI_SEMANTIC_TYPE[t] for t in types[cui]), key=TYPE_PRECEDENCE.index)
        sources = ("umls",) + tuple(f"umls:{s}" for s in sorted(atom_sabs[cui]))
        concepts.append(Concept(cui, name, tuple(aliases), stype, definitions.get(cui, (0, ""))[1],
                                tuple(sorted(rels.get(cui, ()))), None, sources))
    concepts, clashes = resolve_alias_clashes(concepts)
    stats["alias_clashes"] = len(clashes)
    return UMLSImport(concepts, stats, clashes)


def merge_concepts(base: Sequence[Concept], extra: Sequence[Concept]) -> tuple[list[Concept], dict]:
    """Merge ``extra`` (e.g. UMLS) into ``base`` (e.g. the packaged KB); ``base`` wins.

    Same id: base keeps its name, semantic type, label and (non-empty) definition; aliases,
    relations and sources are united. A surface form of a base concept stays with it: an extra-only
    concept whose name is one is renamed to its first alias that is free (or "<name> (<id>)"), and
    it loses such aliases. Remaining clashes are resolved by kb.resolve_alias_clashes.
    """
    base_by_id = {c.id: c for c in base}
    extra_by_id = {c.id: c for c in extra}
    base_forms = {normalize_alias(f): c.id for c in base for f in c.surface_forms()}
    renamed = {}
    out = []
    for cid in sorted(set(base_by_id) | set(extra_by_id)):
        b, e = base_by_id.get(cid), extra_by_id.get(cid)
        if b is not None and e is not None:
            aliases = list(b.aliases) + [a for a in e.surface_forms()
                                         if normalize_alias(a) not in {normalize_alias(x) for x in b.surface_forms()}]
            out.append(Concept(cid, b.name, tuple(aliases), b.semantic_type, b.definition or e.definition,
                               tuple(sorted(set(b.relations) | set(e.relations))), b.label,
                               tuple(sorted(set(b.sources) | set(e.sources)))))
        elif b is not None:
            out.append(b)
        else:
            free = [a for a in e.surface_forms() if base_forms.get(normalize_alias(a), cid) == cid]
            name = e.name
            if normalize_alias(name) in base_forms:
                name = free[0] if free else f"{e.name} ({cid})"
                renamed[cid] = {"from": e.name, "to": name}
            aliases = tuple(a for a in free if normalize_alias(a) != normalize_alias(name))
            out.append(Concept(cid, name, aliases, e.semantic_type, e.definition, e.relations, e.label, e.sources))

    def rank(concept: Concept, alias: str) -> tuple:
        owner = base_forms.get(normalize_alias(alias))
        return (0 if owner == concept.id else 1,)

    out, clashes = resolve_alias_clashes(out, rank)
    return out, {"renamed": renamed, "alias_clashes": len(clashes),
                 "merged_ids": sorted(set(base_by_id) & set(extra_by_id))}
