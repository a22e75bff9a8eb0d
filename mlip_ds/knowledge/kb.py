"""The knowledge base (KB): chest-radiograph concepts with aliases, definitions, relations, labels.

One concept per line of a UTF-8 JSON Lines file, sorted by id, with exactly these fields:

  {"id": "C0032326",                      UMLS CUI, or a stable local id "MLIP:<slug>"
   "name": "pneumothorax",                canonical name
   "aliases": ["PTX", ...],               other surface forms; unique across the KB after lower-casing
   "semantic_type": "finding",            finding | disease | anatomy | device | descriptor | procedure
   "definition": "Air in the ...",        one line (may be empty in a KB imported from UMLS)
   "relations": [{"type": "is_a", "target": "MLIP:pleural_abnormality"}, ...]
                                          is_a | finding_site | associated_with; targets are KB ids
   "label": "pneumothorax",               the FINDINGS / CheXpert label it maps to, or null
   "sources": ["chexpert_labeler", ...]}  where the concept and its aliases come from

The packaged KB (``kb_data/cxr_kb_v1.jsonl``) is built by ``maintainer/build_kb.py``; a KB from a licensed
UMLS release is made by ``maintainer/umls_to_kb.py``. Both write through :func:`write_kb`, so files are
byte-for-byte reproducible. The knowledge encoder embeds :meth:`KnowledgeBase.text_for` ("name:
definition") and indexes concepts by :meth:`KnowledgeBase.index_of` (row order = sorted ids).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from mlip_ds.data.schema import FINDINGS, NO_FINDING

KB_DATA_DIR = Path(__file__).resolve().parent / "kb_data"
DEFAULT_KB_PATH = KB_DATA_DIR / "cxr_kb_v1.jsonl"

FIELDS = ("id", "name", "aliases", "semantic_type", "definition", "relations", "label", "sources")
SEMANTIC_TYPES = ("finding", "disease", "anatomy", "device", "descriptor", "procedure")
RELATION_TYPES = ("is_a", "finding_site", "associated_with")
# The 14 CheXpert observations, in the snake_case spelling of mlip_ds.data.schema.FINDINGS.
CHEXPERT_LABELS = (
    "atelectasis", "cardiomegaly", "consolidation", "edema", "enlarged_cardiomediastinum", "fracture",
    "lung_lesion", "lung_opacity", "no_finding", "pleural_effusion", "pleural_other", "pneumonia",
    "pneumothorax", "support_devices",
)
KNOWN_LABELS = tuple(sorted(set(FINDINGS) | {NO_FINDING} | set(CHEXPERT_LABELS)))

CUI_RE = re.compile(r"^C\d{7}$")
ID_RE = re.compile(r"^(C\d{7}|[A-Za-z][A-Za-z0-9_.-]*:[A-Za-z0-9][A-Za-z0-9_.:-]*)$")
LABEL_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")


class KBFormatError(ValueError):
    """A KB file or concept is malformed; the message names the file, line and field."""


@dataclass(frozen=True, order=True)
class Relation:
    type: str
    target: str


@dataclass(frozen=True)
class Concept:
    id: str
    name: str
    aliases: tuple[str, ...] = ()
    semantic_type: str = "finding"
    definition: str = ""
    relations: tuple[Relation, ...] = ()
    label: str | None = None
    sources: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """What the knowledge encoder embeds: "name: definition" (just the name without one)."""
        return f"{self.name}: {self.definition}" if self.definition else self.name

    def surface_forms(self) -> tuple[str, ...]:
        return (self.name,) + self.aliases

    def to_json(self) -> dict:
        return {"id": self.id, "name": self.name, "aliases": list(self.aliases),
                "semantic_type": self.semantic_type, "definition": self.definition,
                "relations": [{"type": r.type, "target": r.target} for r in self.relations],
                "label": self.label, "sources": list(self.sources)}


def normalize_alias(text: str) -> str:
    """The key aliases are compared and looked up by: case-folded, whitespace collapsed."""
    return " ".join(str(text).casefold().split())


def _one_line(value: str) -> bool:
    return "\n" not in value and "\r" not in value


def concept_from_json(obj, where: str = "concept") -> Concept:
    """Validate one decoded JSON object; errors read ``<where>: field '<f>': <problem>``."""
    if not isinstance(obj, dict):
        raise KBFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [f for f in FIELDS if f not in obj]
    if missing:
        raise KBFormatError(f"{where}: missing field(s) {missing}")
    extra = sorted(set(obj) - set(FIELDS))
    if extra:
        raise KBFormatError(f"{where}: unknown field(s) {extra} (allowed: {list(FIELDS)})")

    def bad(field: str, problem: str) -> KBFormatError:
        return KBFormatError(f"{where}: field '{field}': {problem}")

    cid = obj["id"]
    if not isinstance(cid, str) or not ID_RE.match(cid):
        raise bad("id", f"{cid!r} is not a UMLS CUI (C + 7 digits) or a 'PREFIX:local' id")
    where = f"{where} (id {cid})"
    name = obj["name"]
    if not isinstance(name, str) or not name.strip() or not _one_line(name) or name != name.strip():
        raise bad("name", f"must be a non-empty one-line string without surrounding spaces, got {name!r}")
    aliases = obj["aliases"]
    if not isinstance(aliases, list):
        raise bad("aliases", f"must be a list, got {type(aliases).__name__}")
    seen = {normalize_alias(name): "the name"}
    for i, alias in enumerate(aliases):
        if not isinstance(alias, str) or not alias.strip() or not _one_line(alias) or alias != alias.strip():
            raise bad("aliases", f"[{i}] must be a non-empty one-line string without surrounding spaces, "
                                 f"got {alias!r}")
        key = normalize_alias(alias)
        if key in seen:
            raise bad("aliases", f"[{i}] {alias!r} repeats {seen[key]} after lower-casing")
        seen[key] = f"aliases[{i}]"
    stype = obj["semantic_type"]
    if stype not in SEMANTIC_TYPES:
        raise bad("semantic_type", f"{stype!r} is not one of {list(SEMANTIC_TYPES)}")
    definition = obj["definition"]
    if not isinstance(definition, str) or not _one_line(definition):
        raise bad("definition", "must be a one-line string")
    relations = obj["relations"]
    if not isinstance(relations, list):
        raise bad("relations", f"must be a list, got {type(relations).__name__}")
    rels = []
    for i, rel in enumerate(relations):
        if not isinstance(rel, dict) or set(rel) != {"type", "target"}:
            raise bad("relations", f"[{i}] must be an object with exactly 'type' and 'target', got {rel!r}")
        if rel["type"] not in RELATION_TYPES:
            raise bad("relations", f"[{i}] type {rel['type']!r} is not one of {list(RELATION_TYPES)}")
        if not isinstance(rel["target"], str) or not ID_RE.match(rel["target"]):
            raise bad("relations", f"[{i}] target {rel['target']!r} is not a concept id")
        if rel["target"] == cid:
            raise bad("relations", f"[{i}] points at the concept itself")
        r = Relation(rel["type"], rel["target"])
        if r in rels:
            raise bad("relations", f"[{i}] repeats {rel}")
        rels.append(r)
    label = obj["label"]
    if label is not None and (not isinstance(label, str) or not LABEL_RE.match(label)):
        raise bad("label", f"must be null or a snake_case label name, got {label!r}")
    sources = obj["sources"]
    if (not isinstance(sources, list) or not all(isinstance(s, str) and s.strip() for s in sources)
            or len(set(sources)) != len(sources)):
        raise bad("sources", f"must be a list of distinct non-empty strings, got {sources!r}")
    return Concept(cid, name, tuple(aliases), stype, definition, tuple(rels), label, tuple(sources))


def canonical(concept: Concept) -> Concept:
    """The concept with aliases, relations and sources in their canonical (sorted) order."""
    aliases = tuple(sorted(concept.aliases, key=lambda a: (normalize_alias(a), a)))
    return Concept(concept.id, concept.name, aliases, concept.semantic_type, concept.definition,
                   tuple(sorted(set(concept.relations))), concept.label, tuple(sorted(set(concept.sources))))


def concept_to_line(concept: Concept) -> str:
    return json.dumps(canonical(concept).to_json(), ensure_ascii=False)


def serialize_kb(concepts: Iterable[Concept]) -> bytes:
    """The exact bytes of a KB file: canonical concepts sorted by id, one per line, "\\n" endings."""
    ordered = sorted(concepts, key=lambda c: c.id)
    return "".join(concept_to_line(c) + "\n" for c in ordered).encode("utf-8")


def write_atomic(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` through a temporary file + rename; return its sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def write_kb(concepts: Iterable[Concept], path: str | os.PathLike) -> str:
    """Validate and write a KB file deterministically; returns the file's sha256."""
    concepts = list(concepts)
    KnowledgeBase(concepts)  # raises on dangling relations, duplicate ids or alias clashes
    return write_atomic(path, serialize_kb(concepts))


def resolve_alias_clashes(concepts: Sequence[Concept],
                          rank: Callable[[Concept, str], tuple] | None = None
                          ) -> tuple[list[Concept], list[dict]]:
    """Make every alias belong to one concept; return (concepts, clash records).

    Rules, in order, for a surface form (compared after :func:`normalize_alias`) claimed by several
    concepts: (1) if it is the canonical name of a concept, that concept keeps it (names are never
    removed; if several concepts share the name, all keep their name and nobody keeps it as an
    alias); (2) otherwise the concept with the smallest ``rank(concept, alias)`` keeps it (default:
    all equal), ties going to the smallest id. Every other concept loses that alias. Deterministic.
    """
    rank = rank or (lambda concept, alias: ())
    claims: dict[str, list[tuple[Concept, str]]] = {}
    names: dict[str, list[str]] = {}
    for c in concepts:
        names.setdefault(normalize_alias(c.name), []).append(c.id)
        for a in c.aliases:
            claims.setdefault(normalize_alias(a), []).append((c, a))
    drop: dict[str, set[str]] = {}
    clashes = []
    for key in sorted(set(claims) | {k for k, ids in names.items() if len(ids) > 1}):
        owners = claims.get(key, [])
        name_ids = names.get(key, [])
        if len(owners) + len(name_ids) < 2:
            continue
        if name_ids:
            kept, reason = sorted(name_ids)[0], "name"
            losers = [c.id for c, _ in owners]
        else:
            best = min(owners, key=lambda ca: (rank(ca[0], ca[1]), ca[0].id))
            kept, reason = best[0].id, "rank"
            losers = [c.id for c, _ in owners if c.id != kept]
        for cid in losers:
            drop.setdefault(cid, set()).add(key)
        clashes.append({"alias": key, "kept": kept, "dropped": sorted(set(losers)), "reason": reason,
                        "claimed_by": sorted({c.id for c, _ in owners} | set(name_ids))})
    out = []
    for c in concepts:
        gone = drop.get(c.id)
        if gone:
            c = Concept(c.id, c.name, tuple(a for a in c.aliases if normalize_alias(a) not in gone),
                        c.semantic_type, c.definition, c.relations, c.label, c.sources)
        out.append(c)
    return out, clashes


class KnowledgeBase:
    """In-memory KB: lookups by id and alias, labels, relation neighbours, encoder texts.

    ``KnowledgeBase(concepts)`` validates the whole graph: unique ids, every relation target present,
    no alias shared by two concepts (after lower-casing) and no alias equal to another concept's
    name. Two concepts may share a canonical name (it happens in UMLS); :meth:`lookup` then returns
    the one with the smallest id and :attr:`duplicate_names` lists them.
    """

    def __init__(self, concepts: Iterable[Concept], *, version: str | None = None,
                 path: str | os.PathLike | None = None, where: dict[str, str] | None = None):
        self.path = Path(path) if path is not None else None
        self.version = version
        where = where or {}
        by_id: dict[str, Concept] = {}
        for c in concepts:
            if c.id in by_id:
                raise KBFormatError(f"{where.get(c.id, 'concept')}: field 'id': {c.id!r} is used twice")
            by_id[c.id] = c
        self._by_id = dict(sorted(by_id.items()))
        self._order = {cid: i for i, cid in enumerate(self._by_id)}
        self._incoming: dict[str, list[tuple[str, str]]] = {cid: [] for cid in self._by_id}
        for c in self._by_id.values():
            for i, r in enumerate(c.relations):
                if r.target not in self._by_id:
                    raise KBFormatError(f"{where.get(c.id, 'concept ' + c.id)}: field 'relations': [{i}] "
                                        f"target {r.target!r} is not a concept of this KB")
                self._incoming[r.target].append((r.type, c.id))
        self._alias: dict[str, str] = {}
        names: dict[str, list[str]] = {}
        for cid, c in self._by_id.items():
            names.setdefault(normalize_alias(c.name), []).append(cid)
        self.duplicate_names = {k: v for k, v in names.items() if len(v) > 1}
        for key, ids in names.items():
            self._alias[key] = ids[0]
        for cid, c in self._by_id.items():
            for a in c.aliases:
                key = normalize_alias(a)
                other = self._alias.get(key)
                if other is not None and other != cid:
                    what = "the name" if key in names else "an alias"
                    at = f" ({where[other]})" if other in where else ""
                    raise KBFormatError(f"{where.get(cid, 'concept ' + cid)}: field 'aliases': {a!r} is "
                                        f"already {what} of {other}{at}")
                self._alias[key] = cid

    # -- basic access ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Concept]:
        return iter(self._by_id.values())

    def __contains__(self, cid: object) -> bool:
        return cid in self._by_id

    def __getitem__(self, cid: str) -> Concept:
        try:
            return self._by_id[cid]
        except KeyError:
            raise KeyError(f"no concept with id {cid!r} in the knowledge base") from None

    def __repr__(self) -> str:
        src = f" from {self.path}" if self.path else ""
        return f"KnowledgeBase({len(self)} concepts, version {self.version}{src})"

    @property
    def ids(self) -> list[str]:
        return list(self._by_id)

    def get(self, cid: str, default=None) -> Concept | None:
        return self._by_id.get(cid, default)

    def index_of(self, cid: str) -> int:
        """Row of the concept in id order (the knowledge encoder's embedding table order)."""
        return self._order[self[cid].id]

    def _concept(self, concept: Concept | str) -> Concept:
        return concept if isinstance(concept, Concept) else self[concept]

    # -- lookups ---------------------------------------------------------------------------------
    def by_alias(self, text: str) -> Concept | None:
        """The concept whose name or alias equals ``text`` (case-insensitive), else None."""
        cid = self._alias.get(normalize_alias(text))
        return self._by_id[cid] if cid is not None else None

    def lookup(self, text: str) -> Concept | None:
        """By id first (exact), then by name/alias (case-insensitive)."""
        return self._by_id.get(text) or self.by_alias(text)

    def alias_index(self) -> dict[str, str]:
        """Normalized surface form (names and aliases) -> concept id, e.g. for a dictionary linker."""
        return dict(self._alias)

    def by_semantic_type(self, semantic_type: str) -> list[Concept]:
        if semantic_type not in SEMANTIC_TYPES:
            raise ValueError(f"unknown semantic type {semantic_type!r}; expected one of {SEMANTIC_TYPES}")
        return [c for c in self if c.semantic_type == semantic_type]

    def counts(self) -> dict[str, int]:
        out = {t: 0 for t in SEMANTIC_TYPES}
        for c in self:
            out[c.semantic_type] += 1
        return out

    # -- labels ----------------------------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        return sorted({c.label for c in self if c.label is not None})

    def concepts_for_label(self, label: str, include_descendants: bool = False) -> list[Concept]:
        """Concepts mapped to ``label``; with ``include_descendants`` also their unlabelled is_a
        descendants (a descendant with a different label of its own is left out)."""
        found = {c.id for c in self if c.label == label}
        if include_descendants:
            for cid in list(found):
                for d in self.descendants(cid):
                    if d.label in (None, label):
                        found.add(d.id)
        return [self._by_id[cid] for cid in sorted(found)]

    # -- graph -----------------------------------------------------------------------------------
    def edges(self, concept: Concept | str, relation: str | None = None,
              direction: str = "out") -> list[tuple[str, Concept]]:
        """(relation type, neighbour) pairs; ``direction`` is "out" (concept -> target), "in"
        (source -> concept) or "both"."""
        c = self._concept(concept)
        if direction not in ("out", "in", "both"):
            raise ValueError(f"direction must be 'out', 'in' or 'both', got {direction!r}")
        if relation is not None and relation not in RELATION_TYPES:
            raise ValueError(f"unknown relation {relation!r}; expected one of {RELATION_TYPES}")
        pairs = set()
        if direction in ("out", "both"):
            pairs |= {(r.type, r.target) for r in c.relations}
        if direction in ("in", "both"):
            pairs |= set(self._incoming[c.id])
        return [(t, self._by_id[cid]) for t, cid in sorted(pairs) if relation in (None, t)]

    def neighbours(self, concept: Concept | str, relation: str | None = None,
                   direction: str = "both") -> list[Concept]:
        """Distinct concepts linked to ``concept`` (by ``relation`` if given), sorted by id."""
        ids = sorted({n.id for _, n in self.edges(concept, relation, direction)})
        return [self._by_id[cid] for cid in ids]

    def _closure(self, concept: Concept | str, relation: str, direction: str) -> list[Concept]:
        start = self._concept(concept).id
        seen, stack = set(), [start]
        while stack:
            for _, n in self.edges(stack.pop(), relation, direction):
                if n.id not in seen and n.id != start:
                    seen.add(n.id)
                    stack.append(n.id)
        return [self._by_id[cid] for cid in sorted(seen)]

    def ancestors(self, concept: Concept | str, relation: str = "is_a") -> list[Concept]:
        return self._closure(concept, relation, "out")

    def descendants(self, concept: Concept | str, relation: str = "is_a") -> list[Concept]:
        return self._closure(concept, relation, "in")

    # -- text for the knowledge encoder -----------------------------------------------------------
    def text_for(self, concept: Concept | str) -> str:
        """"name: definition" (the knowledge encoder's input for this concept)."""
        return self._concept(concept).text

    def texts(self, ids: Iterable[str] | None = None) -> list[str]:
        return [self.text_for(cid) for cid in (self.ids if ids is None else ids)]


def read_kb_concepts(path: str | os.PathLike) -> tuple[list[Concept], dict[str, str]]:
    """Parse a KB file; returns the concepts and, per id, "file:line" for error messages."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"knowledge base file not found: {path}")
    concepts, where = [], {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            loc = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise KBFormatError(f"{loc}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                raise KBFormatError(f"{loc}: empty line (expected one JSON object per line)")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise KBFormatError(f"{loc}: invalid JSON: {e.msg} (column {e.colno})") from None
            c = concept_from_json(obj, loc)
            if c.id in where:
                raise KBFormatError(f"{loc}: field 'id': {c.id!r} was already used at {where[c.id]}")
            where[c.id] = loc
            concepts.append(c)
    return concepts, where


def meta_path_for(path: str | os.PathLike) -> Path:
    """The version/metadata file that sits next to a KB file: ``<stem>.meta.json``."""
    path = Path(path)
    return path.with_name(path.stem + ".meta.json")


def load_kb(path: str | os.PathLike | None = None) -> KnowledgeBase:
    """Load and validate a KB file (default: the packaged chest-radiograph KB).

    Raises FileNotFoundError for a missing file and KBFormatError naming the line and field for a
    malformed one. The version comes from the ``<stem>.meta.json`` file next to it, when present.
    """
    path = Path(path) if path is not None else DEFAULT_KB_PATH
    concepts, where = read_kb_concepts(path)
    version = None
    meta = meta_path_for(path)
    if meta.is_file():
        try:
            version = json.loads(meta.read_text(encoding="utf-8")).get("kb_version")
        except (json.JSONDecodeError, AttributeError) as e:
            raise KBFormatError(f"{meta}: not a JSON object with 'kb_version' ({e})") from None
    return KnowledgeBase(concepts, version=version, path=path, where=where)


@functools.lru_cache(maxsize=1)
def default_kb() -> KnowledgeBase:
    """The packaged KB, loaded once per process."""
    return load_kb()
