"""Link radiology reports to the knowledge base: mentions, concepts, negation, uncertainty.

The spaCy pipeline (``spacy.blank("en")``, no trained model, nothing downloaded):

  cxr_sections          split the report into sections (sections.py), store them in
                        ``doc._.sections``, start a sentence at every section and blank line
  sentencizer           sentence boundaries at . ! ?
  cxr_abbreviation_detector  scispacy's AbbreviationDetector (Schwartz & Hearst): "ground-glass
                        opacities (GGOs)" (wrapped only to silence a per-doc spaCy warning)
  cxr_mentions          mentions = KB names and aliases (PhraseMatcher, attr LOWER, longest match
                        wins) plus token patterns from the curation file, plus abbreviation short
                        forms defined in the report; only inside the linked sections (default
                        findings, impression, and text without headers); set as ``doc.ents``
  scispacy_linker       scispacy's EntityLinker with a CandidateGenerator over our own char-3-gram
                        TF-IDF (scikit-learn) + nmslib HNSW index of the KB aliases; it resolves
                        abbreviations to their long form first; ``span._.kb_ents``
  cxr_negation_rules    negation / uncertainty (negation.py; or ``cxr_negex``)

Each entity comes out in the shard schema: {"cui": KB id, "name": canonical name, "start", "end"
(character offsets into the original text), "negated", "uncertain"}. :func:`labels_from_entities`
turns entities into CheXpert-style labels {label: 1 | 0 | -1} through the KB concepts' ``label``.

The TF-IDF + HNSW index is built from the KB (a second or so) and cached under the user cache
directory (``$MLIP_DS_CACHE``, else ``$XDG_CACHE_HOME/mlip_ds``, else ``~/.cache/mlip_ds``), keyed by
the sha256 of the KB's canonical bytes, the curation file and the index parameters.

Curation (``kb_data/linker_overrides.json``, applied by the linker, the KB file is not touched):
  {"add_aliases": {"<id>": ["surface form", ...]},   extra mention strings for a concept
   "remove_aliases": ["surface form", ...],          KB names/aliases never used as mentions
   "patterns": [{"id": "<id>", "pattern": [<spaCy Matcher token pattern>], "note": "..."}],
   "ignore": ["cystic fibrosis", ...]}              phrases that mention no KB concept: matched
                                                     like aliases (longest wins), then dropped, so
                                                     an alias inside them ("fibrosis") is not used

The command links a JSON Lines file of reports (:func:`link_file`, worker processes, input order kept):

  python -m mlip_ds.knowledge.linker --in reports.jsonl --out entities.jsonl [--workers N] [--kb PATH]
         [--overrides PATH] [--negation rules|negex] [--sections findings,impression,body|all]
         [--labels] [--chunk-size 64]

Each input line is {"id": ..., "text": ...} (other keys are ignored); each output line is
{"id": ..., "entities": [...]} (plus "labels" with --labels). Blank lines are skipped. A line that
is not a JSON object with a string "text" stops the run with its line number. The output is written
to a temporary file and renamed at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import spacy
from spacy.language import Language
from spacy.matcher import Matcher, PhraseMatcher
from spacy.tokens import Doc, Span
from spacy.util import filter_spans

from scispacy.abbreviation import AbbreviationDetector
from scispacy.candidate_generation import CandidateGenerator, MentionCandidate
from scispacy.linking import EntityLinker
from scispacy.linking_utils import Entity as ScispacyEntity
from scispacy.linking_utils import KnowledgeBase as ScispacyKB

from mlip_ds.data.schema import NO_FINDING
from mlip_ds.knowledge import negation as negation_mod
from mlip_ds.knowledge.kb import KB_DATA_DIR, KnowledgeBase, load_kb, normalize_alias, serialize_kb
from mlip_ds.knowledge.sections import CLINICAL_SECTIONS, split_sections

DEFAULT_OVERRIDES_PATH = KB_DATA_DIR / "linker_overrides.json"
INDEX_FORMAT = 1
# HNSW parameters: the KB has a few thousand aliases, so a small graph is exact in practice
HNSW_PARAMS = {"M": 32, "efConstruction": 200, "post": 0, "indexThreadQty": 1}
EF_SEARCH = 200
# labels that do not make a report "abnormal" (CheXpert: support devices do not clear No Finding)
NON_FINDING_LABELS = frozenset({NO_FINDING, "support_devices"})


# ---------------------------------------------------------------------------------------------
# curation file
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Overrides:
    add_aliases: dict[str, tuple[str, ...]]
    remove_aliases: frozenset[str]
    patterns: tuple[tuple[str, str], ...]            # (concept id, token pattern as JSON text)
    ignore: tuple[str, ...] = ()
    sha256: str = ""

    @classmethod
    def empty(cls) -> "Overrides":
        return cls({}, frozenset(), (), (), "")


def _parse_change(obj: dict, where: str, kb: KnowledgeBase | None):
    add: dict[str, list[str]] = {}
    for cid, aliases in obj.get("add_aliases", {}).items():
        if kb is not None and cid not in kb:
            raise ValueError(f"{where}: add_aliases: {cid!r} is not a concept of the KB")
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
            raise ValueError(f"{where}: add_aliases[{cid!r}] must be a list of non-empty strings")
        add[cid] = list(aliases)
    remove = obj.get("remove_aliases", [])
    if not isinstance(remove, list) or not all(isinstance(a, str) for a in remove):
        raise ValueError(f"{where}: remove_aliases must be a list of strings")
    pats = []
    for i, item in enumerate(obj.get("patterns", [])):
        if not isinstance(item, dict) or "id" not in item or "pattern" not in item:
            raise ValueError(f"{where}: patterns[{i}] must be an object with 'id' and 'pattern'")
        if kb is not None and item["id"] not in kb:
            raise ValueError(f"{where}: patterns[{i}]: {item['id']!r} is not a concept of the KB")
        pats.append((item["id"], json.dumps(item["pattern"], sort_keys=True)))
    ignore = obj.get("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(a, str) and a.strip() for a in ignore):
        raise ValueError(f"{where}: ignore must be a list of non-empty strings")
    return add, remove, pats, ignore


_CHANGE_KEYS = {"name", "why", "add_aliases", "remove_aliases", "patterns", "ignore"}


def load_overrides(path: str | os.PathLike | None = None, kb: KnowledgeBase | None = None,
                   skip: Iterable[str] = ()) -> Overrides:
    """Read the curation file (default: the packaged one; a missing default file, or ``path=""``,
    means no curation). Ids must exist in ``kb`` when it is given. ``skip`` leaves out the named
    changes (for ablations).

    The file holds {"changes": [{"name", "why", "add_aliases", "remove_aliases", "patterns",
    "ignore"}, ...]} (edits may also sit at the top level); all changes are merged."""
    if path == "":
        return Overrides.empty()
    p = Path(path) if path is not None else DEFAULT_OVERRIDES_PATH
    if not p.is_file():
        if path is None:
            return Overrides.empty()
        raise FileNotFoundError(f"linker overrides file not found: {p}")
    raw = p.read_bytes()
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: not valid JSON: {e}") from None
    allowed = {"add_aliases", "remove_aliases", "patterns", "ignore", "comment", "changes", "version"}
    extra = sorted(set(obj) - allowed)
    if extra:
        raise ValueError(f"{p}: unknown key(s) {extra} (allowed: {sorted(allowed)})")
    skip = set(skip)
    parts = [(f"{p}", obj)]
    for i, ch in enumerate(obj.get("changes", [])):
        if not isinstance(ch, dict) or not set(ch) <= _CHANGE_KEYS:
            raise ValueError(f"{p}: changes[{i}] must be an object with keys among {sorted(_CHANGE_KEYS)}")
        if ch.get("name") in skip:
            continue
        parts.append((f"{p}: changes[{i}] ({ch.get('name')})", ch))
    add: dict[str, list[str]] = {}
    remove: set[str] = set()
    pats: list[tuple[str, str]] = []
    ignore: set[str] = set()
    for where, part in parts:
        a, r, pt, ig = _parse_change(part, where, kb)
        for cid, aliases in a.items():
            add.setdefault(cid, []).extend(aliases)
        remove.update(normalize_alias(x) for x in r)
        pats.extend(pt)
        ignore.update(normalize_alias(x) for x in ig)
    digest = hashlib.sha256(raw + json.dumps(sorted(skip)).encode()).hexdigest()
    return Overrides({k: tuple(v) for k, v in add.items()}, frozenset(remove), tuple(pats),
                     tuple(sorted(ignore)), digest)


def override_change_names(path: str | os.PathLike | None = None) -> list[str]:
    p = Path(path) if path else DEFAULT_OVERRIDES_PATH
    if not p.is_file():
        return []
    return [ch.get("name") for ch in json.loads(p.read_text(encoding="utf-8")).get("changes", [])]


def surface_forms(kb: KnowledgeBase, overrides: Overrides) -> dict[str, str]:
    """Normalized surface form -> concept id, after the curation file (sorted by form)."""
    forms = {k: v for k, v in kb.alias_index().items() if k not in overrides.remove_aliases}
    for cid, aliases in overrides.add_aliases.items():
        for a in aliases:
            key = normalize_alias(a)
            other = forms.get(key)
            if other is not None and other != cid:
                raise ValueError(f"linker overrides: alias {a!r} for {cid} is already a surface form of "
                                 f"{other}; list it in remove_aliases first")
            forms[key] = cid
    return dict(sorted(forms.items()))


# ---------------------------------------------------------------------------------------------
# TF-IDF + nmslib index (cached)
# ---------------------------------------------------------------------------------------------
def cache_root() -> Path:
    if os.environ.get("MLIP_DS_CACHE"):
        return Path(os.environ["MLIP_DS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlip_ds"


def index_key(kb: KnowledgeBase, overrides: Overrides) -> str:
    import nmslib
    import sklearn
    h = hashlib.sha256()
    h.update(serialize_kb(kb))
    h.update(overrides.sha256.encode())
    h.update(json.dumps({"format": INDEX_FORMAT, "hnsw": HNSW_PARAMS, "sklearn": sklearn.__version__,
                         "nmslib": getattr(nmslib, "__version__", "?")}, sort_keys=True).encode())
    return h.hexdigest()[:24]


def _fit_vectorizer(aliases: Sequence[str]):
    from sklearn.feature_extraction.text import TfidfVectorizer
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 3), min_df=1, dtype=np.float32)
    vectors = vec.fit_transform(aliases).astype(np.float32).tocsr()
    return vec, vectors


def _new_index(vectors):
    import nmslib
    index = nmslib.init(method="hnsw", space="cosinesimil_sparse", data_type=nmslib.DataType.SPARSE_VECTOR)
    index.addDataPointBatch(vectors)
    return index


def build_or_load_index(kb: KnowledgeBase, overrides: Overrides, cache_dir: str | os.PathLike | None = None,
                        use_cache: bool = True):
    """(aliases, TfidfVectorizer, nmslib index, info) for the KB surface forms.

    The vectorizer is refit every time (deterministic, milliseconds); the HNSW graph is loaded from
    ``<cache_dir or user cache/linker>/<key>/`` when present (and its alias list matches), else
    built (under a second for the packaged KB) and saved by rename, so concurrent processes are
    safe."""
    forms = surface_forms(kb, overrides)
    vec, vectors = _fit_vectorizer(list(forms))
    nonempty = np.asarray(vectors.sum(axis=1)).reshape(-1) != 0  # nmslib crashes on zero vectors
    aliases = [a for a, keep in zip(forms, nonempty) if keep]
    vectors = vectors[nonempty]
    index = _new_index(vectors)
    info = {"n_aliases": len(aliases), "cached": False, "path": None}
    directory = None
    if use_cache:
        base = Path(cache_dir) if cache_dir is not None else cache_root() / "linker"
        directory = base / index_key(kb, overrides)
        info["path"] = str(directory)
        bin_path = directory / "nmslib_index.bin"
        alias_path = directory / "aliases.json"
        if bin_path.is_file() and alias_path.is_file():
            try:
                if json.loads(alias_path.read_text(encoding="utf-8")) == aliases:
                    index.loadIndex(str(bin_path))
                    info["cached"] = True
            except Exception:  # a damaged cache entry is rebuilt below
                index = _new_index(vectors)
    if not info["cached"]:
        index.createIndex(HNSW_PARAMS, print_progress=False)
        if directory is not None:
            try:
                directory.mkdir(parents=True, exist_ok=True)
                tmp = directory / f".tmp-{os.getpid()}"
                index.saveIndex(str(tmp) + ".bin", save_data=False)
                (Path(str(tmp) + ".json")).write_text(json.dumps(aliases), encoding="utf-8")
                os.replace(str(tmp) + ".bin", directory / "nmslib_index.bin")
                os.replace(str(tmp) + ".json", directory / "aliases.json")
            except OSError as e:  # a read-only cache is not fatal
                warnings.warn(f"could not cache the linker index in {directory}: {e}")
    index.setQueryTimeParams({"efSearch": EF_SEARCH})
    return aliases, vec, index, info


class CachedCandidateGenerator(CandidateGenerator):
    """scispacy's CandidateGenerator with a per-process memo of mention strings (reports repeat
    the same few hundred mention strings; the TF-IDF transform + HNSW query is the slow part)."""

    def __init__(self, *args, cache_size: int = 100_000, **kwargs):
        super().__init__(*args, **kwargs)
        self._memo: dict[tuple[str, int], list[MentionCandidate]] = {}
        self._cache_size = cache_size

    def __call__(self, mention_texts: list[str], k: int) -> list[list[MentionCandidate]]:
        keys = [(normalize_alias(t), k) for t in mention_texts]
        missing = sorted({key for key in keys if key not in self._memo})
        fresh = {}
        if missing:
            fresh = dict(zip(missing, super().__call__([t for t, _ in missing], k)))
            if len(self._memo) + len(fresh) <= self._cache_size:
                self._memo.update(fresh)
        return [self._memo[key] if key in self._memo else fresh[key] for key in keys]


def scispacy_kb(kb: KnowledgeBase, forms: dict[str, str]) -> ScispacyKB:
    by_id: dict[str, list[str]] = {}
    for form, cid in forms.items():
        by_id.setdefault(cid, []).append(form)
    ents = []
    for c in kb:
        ents.append(ScispacyEntity(concept_id=c.id, canonical_name=normalize_alias(c.name),
                                   aliases=sorted(by_id.get(c.id, [])), types=[c.semantic_type],
                                   definition=c.definition or None))
    out = ScispacyKB(ents)
    # concepts whose every surface form was removed keep no alias in the index
    out.alias_to_cuis = {a: set(cuis) & {forms[a]} if a in forms else cuis
                         for a, cuis in out.alias_to_cuis.items()}
    return out


# ---------------------------------------------------------------------------------------------
# pipeline components
# ---------------------------------------------------------------------------------------------
if not Doc.has_extension("sections"):
    Doc.set_extension("sections", default=None)


@Language.factory("cxr_sections", default_config={})
def make_sections(nlp: Language, name: str):
    def sections_component(doc: Doc) -> Doc:
        secs = split_sections(doc.text)
        doc._.sections = secs
        starts = set()
        for s in secs:
            starts.add(s.start)
            if s.header_start is not None:
                starts.add(s.header_start)
        # tokens that begin a section (or its title), or follow a blank line, start a sentence
        for tok in doc:
            if tok.i == 0:
                continue
            if tok.idx in starts:
                tok.is_sent_start = True
            elif "\n\n" in doc[tok.i - 1].whitespace_ + (doc[tok.i - 1].text if doc[tok.i - 1].is_space else ""):
                tok.is_sent_start = True
        return doc
    return sections_component


_IGNORE = "IGNORE"
_ABBR = "ABBR"
_PLACEHOLDER_RE = re.compile(r"^(.)\1{2,}$")


class MentionDetector:
    """Dictionary mentions (KB surface forms, PhraseMatcher on LOWER), curated token patterns and
    abbreviation short forms, restricted to the linked sections; sets ``doc.ents``."""

    def __init__(self, nlp: Language):
        self.nlp = nlp
        self.configure({}, ())

    def configure(self, forms: dict[str, str], patterns: Sequence[tuple[str, str]] = (),
                  sections: Sequence[str] | None = CLINICAL_SECTIONS, use_abbreviations: bool = True,
                  ignore: Sequence[str] = ()):
        nlp = self.nlp
        self.forms = forms
        self.sections = None if sections is None else frozenset(sections)
        self.use_abbreviations = use_abbreviations
        self.phrase = PhraseMatcher(nlp.vocab, attr="LOWER")
        by_id: dict[str, list[str]] = {}
        for form, cid in forms.items():
            by_id.setdefault(cid, []).append(form)
        for cid in sorted(by_id):
            self.phrase.add(cid, list(nlp.tokenizer.pipe(sorted(by_id[cid]))))
        if ignore:
            self.phrase.add(_IGNORE, list(nlp.tokenizer.pipe(sorted(ignore))))
        self.matcher = Matcher(nlp.vocab)
        for cid, pat in patterns:
            try:
                self.matcher.add(cid, [json.loads(pat)])
            except Exception as e:  # spaCy's MatchPatternError names the broken token
                raise ValueError(f"linker overrides: invalid token pattern for {cid}: {pat}\n{e}") from None
        return self

    def _allowed(self, doc: Doc):
        secs = doc._.sections
        if self.sections is None or secs is None:
            return [(0, len(doc.text))]
        return [(s.start, s.end) for s in secs if s.name in self.sections and s.end > s.start]

    def __call__(self, doc: Doc) -> Doc:
        allowed = self._allowed(doc)

        def inside(span: Span) -> bool:
            return any(a <= span.start_char and span.end_char <= b for a, b in allowed)

        spans = []
        matches = list(self.phrase(doc))
        if len(self.matcher):
            matches += list(self.matcher(doc))
        for m, s, e in matches:
            cid = doc.vocab.strings[m]
            span = Span(doc, s, e, label=cid, kb_id=cid)
            if inside(span):
                spans.append(span)
        if self.use_abbreviations and Doc.has_extension("abbreviations"):
            for short in doc._.abbreviations or []:
                # "XXXX" / "___" are de-identification placeholders, not abbreviations
                if isinstance(short, Span) and inside(short) and not _PLACEHOLDER_RE.match(short.text):
                    spans.append(Span(doc, short.start, short.end, label=_ABBR))
        # longest match wins; a dictionary match beats an abbreviation of the same tokens
        spans.sort(key=lambda sp: sp.label_ == _ABBR)
        doc.ents = [sp for sp in filter_spans(spans) if sp.label_ != _IGNORE]
        return doc


class QuietAbbreviationDetector(AbbreviationDetector):
    """scispacy's AbbreviationDetector without spaCy's W036 warning, which it raises on every doc
    without a defined abbreviation (its per-doc matcher is empty then)."""

    def __call__(self, doc: Doc) -> Doc:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*\[W036\]")
            return super().__call__(doc)


@Language.factory("cxr_abbreviation_detector", default_config={})
def make_abbreviation_detector(nlp: Language, name: str) -> QuietAbbreviationDetector:
    return QuietAbbreviationDetector(nlp, name)


@Language.factory("cxr_mentions", default_config={})
def make_mentions(nlp: Language, name: str) -> MentionDetector:
    # the surface forms and patterns are not JSON config: ReportLinker calls configure()
    return MentionDetector(nlp)


class EntityLinkerComponent:
    """Holds scispacy's EntityLinker (its CandidateGenerator is not JSON config); skips docs
    without mentions."""

    def __init__(self):
        self.linker: EntityLinker | None = None

    def __call__(self, doc: Doc) -> Doc:
        return self.linker(doc) if (doc.ents and self.linker is not None) else doc


@Language.factory("cxr_entity_linker", default_config={})
def make_entity_linker(nlp: Language, name: str) -> EntityLinkerComponent:
    return EntityLinkerComponent()


# ---------------------------------------------------------------------------------------------
# the linker
# ---------------------------------------------------------------------------------------------
class ReportLinker:
    """Build once, then :meth:`link` texts. Holds the spaCy pipeline and the KB.

    ``kb``: a KnowledgeBase or a KB file (default: the packaged KB); ``overrides``: the curation
    file ("" = none); ``negation``: "rules" (default) or "negex", ``negation_config`` a
    negation.RuleConfig; ``sections``: the sections whose text is linked (None = all text);
    ``threshold``/``k``: EntityLinker score threshold and neighbours for abbreviation long forms;
    ``cache_dir``: where the index is cached (default: the user cache directory)."""

    def __init__(self, kb: KnowledgeBase | str | os.PathLike | None = None,
                 overrides: str | os.PathLike | Overrides | None = None,
                 negation: str = negation_mod.DEFAULT_METHOD,
                 sections: Sequence[str] | None = CLINICAL_SECTIONS, threshold: float = 0.8,
                 k: int = 10, cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                 use_abbreviations: bool = True, negation_config: "negation_mod.RuleConfig | None" = None):
        self.kb = kb if isinstance(kb, KnowledgeBase) else load_kb(kb)
        self.overrides = overrides if isinstance(overrides, Overrides) else load_overrides(overrides, self.kb)
        self.forms = surface_forms(self.kb, self.overrides)
        self.negation = negation
        self.threshold = threshold
        aliases, vec, index, info = build_or_load_index(self.kb, self.overrides, cache_dir, use_cache)
        self.index_info = info
        self.skb = scispacy_kb(self.kb, {a: self.forms[a] for a in aliases})
        self.candidate_generator = CachedCandidateGenerator(
            ann_index=index, tfidf_vectorizer=vec, ann_concept_aliases_list=aliases, kb=self.skb)

        nlp = spacy.blank("en")
        nlp.add_pipe("cxr_sections")
        nlp.add_pipe("sentencizer")
        nlp.add_pipe("cxr_abbreviation_detector")
        nlp.add_pipe("cxr_mentions").configure(self.forms, self.overrides.patterns, sections, use_abbreviations,
                                               self.overrides.ignore)
        self.entity_linker = EntityLinker(nlp, "scispacy_linker", candidate_generator=self.candidate_generator,
                                          resolve_abbreviations=True, k=k, threshold=threshold,
                                          filter_for_definitions=False, max_entities_per_mention=3)
        nlp.add_pipe("cxr_entity_linker").linker = self.entity_linker
        negation_mod.add_negation(nlp, negation, negation_config)
        self.nlp = nlp

    # -- linking ---------------------------------------------------------------------------------
    def concept_of(self, ent: Span) -> str | None:
        """The concept of a mention.

        An abbreviation defined in the report ("... opacities (GGOs)") links to the EntityLinker's
        best candidate for its long form (score >= ``threshold``), falling back to its own
        dictionary match; a dictionary or pattern mention keeps the concept it matched (the
        EntityLinker scores its exact alias 1.0 and agrees; the dictionary match is kept so that
        an approximate-search miss cannot swap it). None for an abbreviation nothing links to."""
        long_form = ent._.long_form if Span.has_extension("long_form") else None
        if long_form is not None or ent.label_ == _ABBR:
            kb_ents = ent._.kb_ents
            if kb_ents:
                best = max(s for _, s in kb_ents)
                tops = sorted(c for c, s in kb_ents if s >= best - 1e-6)
                return ent.label_ if ent.label_ in tops else tops[0]
        return None if ent.label_ == _ABBR else ent.label_

    def entities_of(self, doc: Doc) -> list[dict]:
        out = []
        for ent in doc.ents:
            cid = self.concept_of(ent)
            if cid is None:
                continue
            out.append({"cui": cid, "name": self.kb[cid].name, "start": ent.start_char, "end": ent.end_char,
                        "negated": bool(ent._.negated), "uncertain": bool(ent._.uncertain)})
        return out

    def link(self, text: str) -> list[dict]:
        """Entities of one report text, in text order."""
        return self.entities_of(self.nlp(text))

    def link_many(self, texts: Iterable[str], batch_size: int = 64) -> list[list[dict]]:
        return [self.entities_of(doc) for doc in self.nlp.pipe(texts, batch_size=batch_size)]

    def labels(self, text: str) -> dict[str, int]:
        return labels_from_entities(self.link(text), self.kb)


def labels_from_entities(entities: Iterable[dict], kb: KnowledgeBase | None = None) -> dict[str, int]:
    """CheXpert-style labels {label: 1 | 0 | -1} from linked entities.

    An entity votes for the ``label`` of its KB concept (concepts without one are ignored): 1 when
    affirmed, -1 when uncertain, 0 when negated. Per label, positive beats uncertain beats negative;
    labels never mentioned are absent. ``no_finding`` is 1 when no finding label (every label but
    no_finding and support_devices) is 1 or -1, else 0; it is always present."""
    kb = kb if kb is not None else _default_kb()
    rank = {1: 2, -1: 1, 0: 0}
    labels: dict[str, int] = {}
    for ent in entities:
        concept = kb.get(ent["cui"])
        if concept is None or concept.label is None or concept.label == NO_FINDING:
            continue
        value = -1 if ent.get("uncertain") else (0 if ent.get("negated") else 1)
        old = labels.get(concept.label)
        if old is None or rank[value] > rank[old]:
            labels[concept.label] = value
    abnormal = any(v in (1, -1) for k, v in labels.items() if k not in NON_FINDING_LABELS)
    labels[NO_FINDING] = 0 if abnormal else 1
    return dict(sorted(labels.items()))


def _default_kb() -> KnowledgeBase:
    from mlip_ds.knowledge.kb import default_kb
    return default_kb()


_LINKERS: dict[tuple, ReportLinker] = {}


def get_linker(kb_path: str | None = None, overrides: str | None = None,
               negation: str = negation_mod.DEFAULT_METHOD) -> ReportLinker:
    """A per-process ReportLinker, built once per (kb path, overrides, negation method)."""
    key = (kb_path, overrides, negation)
    if key not in _LINKERS:
        _LINKERS[key] = ReportLinker(kb_path, overrides=overrides, negation=negation)
    return _LINKERS[key]


# ---------------------------------------------------------------------------------------------
# the command: link a JSON Lines file of reports
# ---------------------------------------------------------------------------------------------
_WORKER = None  # the per-process ReportLinker


class InputError(ValueError):
    """A line of the input file that is not a report record."""


def _read_records(path: Path) -> Iterator[tuple[int, object, str]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict) or "id" not in obj or not isinstance(obj.get("text"), str):
                raise InputError(f"{path}:{lineno}: expected an object with 'id' and a string 'text'")
            yield lineno, obj["id"], obj["text"]


def _chunks(records, size: int):
    chunk = []
    for rec in records:
        chunk.append(rec)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _make_linker(kb: str | None, overrides: str | None, negation: str, sections):
    return ReportLinker(kb, overrides=overrides, negation=negation, sections=sections)


def _init_worker(kb, overrides, negation, sections):
    global _WORKER
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER = _make_linker(kb, overrides, negation, sections)


def _link_chunk(args) -> list[str]:
    chunk, with_labels = args
    texts = [text for _, _, text in chunk]
    out = []
    for (_, rid, _), ents in zip(chunk, _WORKER.link_many(texts)):
        rec = {"id": rid, "entities": ents}
        if with_labels:
            rec["labels"] = labels_from_entities(ents, _WORKER.kb)
        out.append(json.dumps(rec, ensure_ascii=False))
    return out


def _count_records(path: Path) -> int:
    """Validate every line up front (a bad line fails before any linking) and count them."""
    return sum(1 for _ in _read_records(path))


def link_file(in_path: str | os.PathLike, out_path: str | os.PathLike, workers: int = 1,
              kb: str | None = None, overrides: str | None = None, negation: str | None = None,
              sections="default", with_labels: bool = False, chunk_size: int = 64,
              progress: bool = True) -> int:
    """Link every report of ``in_path`` into ``out_path``; returns the number of reports.

    ``sections``: "default" (findings, impression and unheaded text), None (the whole text) or a
    sequence of section names (see mlip_ds.knowledge.sections)."""
    global _WORKER
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise FileNotFoundError(f"input file not found: {in_path}")
    total = _count_records(in_path)

    from tqdm import tqdm

    negation = negation or negation_mod.DEFAULT_METHOD
    if sections == "default":
        sections = CLINICAL_SECTIONS
    elif sections is not None:
        sections = tuple(sections)
    # build (or load from the cache) the index once here, so that workers only read the cache,
    # and fail early on a bad KB / curation file
    linker = _make_linker(kb, overrides, negation, sections)
    tmp = out_path.with_name(out_path.name + f".tmp-{os.getpid()}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tasks = ((chunk, with_labels) for chunk in _chunks(_read_records(in_path), chunk_size))
    bar = tqdm(total=total, unit="report", desc="linking", disable=not progress, file=sys.stderr)
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            if workers <= 1:
                _WORKER = linker
                results = map(_link_chunk, tasks)
                pool = None
            else:
                method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
                pool = mp.get_context(method).Pool(workers, initializer=_init_worker,
                                                   initargs=(kb, overrides, negation, sections))
                results = pool.imap(_link_chunk, tasks)  # imap keeps the input order
            try:
                for lines in results:
                    for line in lines:
                        out.write(line + "\n")
                    n += len(lines)
                    bar.update(len(lines))
            except BaseException:
                if pool is not None:  # a worker failed or the run was interrupted: stop the rest
                    pool.terminate()
                raise
            finally:
                if pool is not None:
                    pool.close()
                    pool.join()
        os.replace(tmp, out_path)
    finally:
        bar.close()
        if tmp.exists():
            tmp.unlink()
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mlip_ds.knowledge.linker",
                                 description="Link report texts to the knowledge base (entities with "
                                             "negation/uncertainty).")
    ap.add_argument("--in", dest="inp", required=True, help="JSONL of {'id', 'text'}")
    ap.add_argument("--out", required=True, help="JSONL of {'id', 'entities'} (input order)")
    ap.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    ap.add_argument("--kb", default=None, help="KB file (default: the packaged cxr_kb_v1.jsonl)")
    ap.add_argument("--overrides", default=None,
                    help="linker curation file (default: the packaged linker_overrides.json; '' = none)")
    ap.add_argument("--negation", choices=("rules", "negex"), default=None,
                    help="negation/uncertainty method (default: rules)")
    ap.add_argument("--sections", default=None,
                    help="comma-separated sections to link (default findings,impression,body; 'all' = "
                         "the whole text)")
    ap.add_argument("--labels", action="store_true", help="also write CheXpert-style 'labels'")
    ap.add_argument("--chunk-size", type=int, default=64, help="reports per task (default 64)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    if args.sections is None:
        sections = "default"
    elif args.sections.strip() == "all":
        sections = None
    else:
        sections = tuple(x.strip() for x in args.sections.split(",") if x.strip())
    try:
        n = link_file(args.inp, args.out, workers=args.workers, kb=args.kb, overrides=args.overrides,
                      negation=args.negation, sections=sections, with_labels=args.labels,
                      chunk_size=max(1, args.chunk_size), progress=not args.no_progress)
    except (InputError, FileNotFoundError, ValueError) as e:
        print(f"link: error: {e}", file=sys.stderr)
        return 2
    print(f"linked {n} reports -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
