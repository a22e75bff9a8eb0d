"""The concept vocabulary: which knowledge concepts the model has an embedding for, their
"name: definition" texts, and their knowledge categories.

Where it comes from (``--kb``):
* a KB JSON Lines file (``{"id", "name", "aliases", "definition", "label", ...}`` per line, the
  format of ``mlip_ds/knowledge/kb.py``), loaded with ``load_kb``;
* ``""`` (default): the packaged chest-radiograph KB (``mlip_ds/knowledge/kb_data``);
* ``"shards"``: the concepts mentioned in the training shards' entities (their ``cui`` and
  ``name``), with the synthetic generator's findings as categories. This is the fallback when the
  knowledge package is not installed.
Row order is fixed by the source (sorted ids), so every rank and every resumed run gets the same
vocabulary; changing it changes the size of the knowledge encoder's tables, and a checkpoint taken
with another vocabulary will not load.

A sample's knowledge category (docs/method.md sec. 3) is the set of labels of its non-negated
concept mentions (``Concept.label``: the CheXpert/finding label a concept maps to); no such mention
gives the ``no_finding`` category.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mlip_ds.data.schema import FINDINGS, NO_FINDING

log = logging.getLogger(__name__)


@dataclass
class ConceptVocab:
    ids: list[str]                 # row r of the knowledge tables is concept ids[r]
    texts: list[str]               # "name: definition" (the name alone without a definition)
    labels: list[str | None]       # the category label of each concept, or None
    source: str = ""
    neighbours: list[tuple[int, ...]] = field(default_factory=list)  # KB graph (both directions); [] = none
    index: dict[str, int] = field(init=False)
    categories: list[str] = field(init=False)
    category_index: dict[str, int] = field(init=False)
    _name_category: dict[str, int] = field(init=False)

    def __post_init__(self):
        if not self.ids:
            raise ValueError(f"the concept vocabulary from {self.source or 'its source'} is empty")
        self.index = {c: i for i, c in enumerate(self.ids)}
        cats = sorted({lab for lab in self.labels if lab and lab != NO_FINDING})
        self.categories = cats + [NO_FINDING]
        self.category_index = {c: i for i, c in enumerate(self.categories)}
        self._name_category = {c: i for c, i in self.category_index.items() if c != NO_FINDING}

    def __len__(self) -> int:
        return len(self.ids)

    def fingerprint(self) -> str:
        """sha256 of the ids and texts: recorded with a run, checked on resume."""
        data = json.dumps([self.ids, self.texts, self.labels]).encode()
        return hashlib.sha256(data).hexdigest()[:16]

    def to_json(self) -> dict:
        return {"source": self.source, "fingerprint": self.fingerprint(), "ids": self.ids, "texts": self.texts,
                "labels": self.labels, "categories": self.categories}

    def mentions(self, entities_batch: list[list[dict]], max_mentions: int = 0):
        """Padded (ids, negated, mask), each (B, M), from shard entities (``cui`` keys): the same as
        ``knowledge_encoder.pad_mentions`` (unknown concepts skipped, a concept repeated with the
        same polarity kept once, at most ``max_mentions`` (0: all)), built without per-element
        tensor writes (it runs for every batch)."""
        rows = []
        for ents in entities_batch:
            seen, row = set(), []
            for e in ents:
                c = self.index.get(e.get("cui"))
                key = (c, bool(e.get("negated")))
                if c is None or key in seen:
                    continue
                seen.add(key)
                row.append(key)
            rows.append(row[:max_mentions] if max_mentions else row)
        m = max([len(r) for r in rows] + [1])
        ids = torch.tensor([[c for c, _ in r] + [0] * (m - len(r)) for r in rows], dtype=torch.long)
        neg = torch.tensor([[g for _, g in r] + [False] * (m - len(r)) for r in rows], dtype=torch.bool)
        mask = torch.tensor([[True] * len(r) + [False] * (m - len(r)) for r in rows], dtype=torch.bool)
        return ids, neg, mask

    def categories_of(self, entities_batch: list[list[dict]]) -> torch.Tensor:
        """(B, C) bool multi-hot knowledge categories (see the module doc). A mention's category is
        its concept's label; a mention outside the vocabulary counts by its ``name`` when that is a
        category name (the synthetic data's entity names are the finding labels)."""
        out = torch.zeros(len(entities_batch), len(self.categories), dtype=torch.bool)
        for b, ents in enumerate(entities_batch):
            for e in ents:
                if e.get("negated"):
                    continue
                row = self.index.get(e.get("cui"))
                label = self.labels[row] if row is not None else e.get("name")
                c = self._name_category.get(label) if label else None
                if c is not None:
                    out[b, c] = True
            if not out[b].any():
                out[b, self.category_index[NO_FINDING]] = True
        return out

    def neighbour_table(self, concepts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The relation-aware variant's inputs for the batch's distinct ``concepts`` (R,): the
        concepts to encode (R + the neighbours not already there, appended so that rows 0..R-1 keep
        their meaning) and (R', R') row-normalised adjacency, a row of zeros for a concept without
        neighbours in the KB."""
        first = [int(c) for c in concepts]
        order = {c: i for i, c in enumerate(first)}
        extra: list[int] = []
        for c in first:
            for n in self.neighbours[c] if self.neighbours else ():
                if n not in order:
                    order[n] = len(first) + len(extra)
                    extra.append(n)
        size = len(first) + len(extra)
        adj = torch.zeros(size, size)
        for c in first:
            nbs = self.neighbours[c] if self.neighbours else ()
            for n in nbs:
                adj[order[c], order[n]] = 1.0 / len(nbs)
        return torch.tensor(first + extra, dtype=torch.long), adj

    def tokens(self, tokenizer, context_length: int) -> torch.Tensor:
        """(N, context_length) token ids of the concept texts, for the text tower."""
        return tokenizer(self.texts, context_length=context_length)


def unique_rows(*tables: tuple[torch.Tensor, torch.Tensor]):
    """The distinct concepts of one or more padded (ids, mask) mention tables.

    Returns (concepts (R,), rows...) with ``rows[b, m]`` the position in ``concepts`` of mention
    (b, m) (0 where masked), one rows table per input table. R >= 1: a batch without any mention
    still encodes one concept, so every rank runs the same modules every step.
    """
    present = torch.cat([i[m.bool()] for i, m in tables])
    concepts = torch.unique(present) if present.numel() else torch.zeros(1, dtype=torch.long)
    rows = []
    for i, m in tables:
        r = torch.searchsorted(concepts, i.clamp(min=0))
        rows.append(r.clamp(max=len(concepts) - 1).masked_fill(~m.bool(), 0))
    return (concepts, *rows)


def from_kb(path: str | None = None) -> ConceptVocab:
    """Every concept of a KB file (default: the packaged KB), in the KB's row order."""
    from mlip_ds.knowledge.kb import load_kb
    kb = load_kb(path) if path else load_kb()
    concepts = list(kb)
    version = getattr(kb, "version", None)
    src = f"kb:{path or 'packaged'}" + (f"@{version}" if version else "")
    index = {c.id: i for i, c in enumerate(concepts)}
    neighbours: list[set[int]] = [set() for _ in concepts]
    for i, c in enumerate(concepts):  # the KB's relations, as an undirected graph over the vocabulary
        for r in c.relations:
            j = index.get(r.target)
            if j is not None and j != i:
                neighbours[i].add(j)
                neighbours[j].add(i)
    return ConceptVocab([c.id for c in concepts], [kb.text_for(c) for c in concepts],
                        [c.label for c in concepts], source=src,
                        neighbours=[tuple(sorted(n)) for n in neighbours])


def from_shards(urls: list[str]) -> ConceptVocab:
    """The concepts mentioned in the shards' entities (reads only the JSON members). Texts are the
    mention names (no definitions are available without a KB); categories are the synthetic
    generator's findings."""
    names: dict[str, str] = {}
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                if not member.name.endswith(".json"):
                    continue
                try:
                    meta = json.load(io.TextIOWrapper(tar.extractfile(member), encoding="utf-8"))
                except (ValueError, OSError, AttributeError):
                    continue  # the training pipeline skips and reports bad samples
                for e in meta.get("entities", []) if isinstance(meta, dict) else []:
                    if isinstance(e, dict) and e.get("cui"):
                        names.setdefault(e["cui"], str(e.get("name") or e["cui"]))
    ids = sorted(names)
    texts = [names[c].replace("_", " ") for c in ids]
    labels = [names[c] if names[c] in FINDINGS else None for c in ids]
    return ConceptVocab(ids, texts, labels, source="shards")


def load_concepts(kb: str, shard_urls: list[str]) -> ConceptVocab:
    """The vocabulary for ``--kb`` (see the module doc). Raises FileNotFoundError / ValueError with
    what to fix."""
    if kb == "shards":
        return from_shards(shard_urls)
    if kb and not Path(kb).is_file():
        raise FileNotFoundError(f"--kb {kb}: no such file (a KB JSON Lines file, e.g. from "
                                "`python maintainer/build_kb.py`, or 'shards' for the shards' own entities)")
    try:
        import mlip_ds.knowledge.kb  # noqa: F401
    except ImportError:
        if kb:
            raise
        log.warning("mlip_ds.knowledge is not available: the concept vocabulary comes from the shards' entities")
        return from_shards(shard_urls)
    return from_kb(kb or None)
