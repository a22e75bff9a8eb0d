"""Negation and uncertainty of mention spans (``doc.ents``) in radiology reports.

Two interchangeable spaCy components set ``span._.negated`` and ``span._.uncertain`` on every
entity of a Doc (at most one of the two is True):

``"rules"`` (component ``cxr_negation_rules``; the default: macro-F1 0.927 vs 0.851 for
    ``negex`` on the 3,851 Open-i reports with gold labels, see docs/linker_benchmark.md)
    A rule-based *approximation* of the NegBio / CheXpert-labeler patterns. Those patterns are
    Semgrex-style rules over a dependency graph (ngrex); there is no parser here, so this is not a
    faithful port: the cue words and the order of the decisions are taken from the pattern files
    (CheXpert labeler, MIT licence; NegBio, public domain), and each pattern's dependency scope is
    approximated by token order inside the *clause* of the sentence that holds the mention. A
    clause ends at a sentence end, ";" or a termination cue ("but", "however", "which", "there
    is", ...). Cues before the mention reach to it through the whole clause; cues after it reach
    back 6 tokens (other mentions and punctuation not counted), "normal"/"within normal limits"
    only 2-3 ("X is normal", not "X, vascularity within normal limits"). Decision order as in
    the CheXpert labeler:
      1. pre-negation uncertainty ("cannot exclude X", "X is not excluded", "no new X") -> uncertain
      2. negation ("no X", "without X", "clear of X", "free of X", "resolution of X", "history of
         X", "evaluation for X", "X is not seen", "X has resolved", "X removed") -> negated
      3. uncertainty ("possible X", "may represent X", "suspicious for X", "suggestive of X",
         "question of X", "X is suspected", "X is another consideration") -> uncertain
    Pseudo-negations ("no change", "no interval change", "not only", "not calcified") cancel the
    cues they contain. Vascular-congestion mentions ("pulmonary vascular congestion",
    "indistinctness", "vascular prominence", "engorgement") are uncertain by themselves, as in
    the CheXpert labeler's edema rule.
    Measured deviations from the CheXpert labeler (Open-i gold, MeSH-based): alternatives ("X
    versus Y", "X and/or Y") and high-confidence hedges ("probable X", "likely X") are *not*
    uncertain (88-92% / 81% of them have X in the gold); ``RuleConfig(alternatives_uncertain=
    True, or_is_uncertain=True)`` restores the CheXpert behaviour for alternatives.

``"negex"`` (component ``cxr_negex``)
    negspacy's NegEx (``Negex`` with its ``en_clinical`` termset) for negation, and a second NegEx
    pass with an uncertainty termset (the cue lists of the rules above, NegEx scoping) for
    uncertainty; a mention found uncertain is not reported negated.

Use :func:`add_negation` to put either into a pipeline (after the component that sets
``doc.ents``).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from spacy.language import Language
from spacy.matcher import PhraseMatcher
from spacy.tokens import Doc, Span

METHODS = ("rules", "negex")
DEFAULT_METHOD = "rules"
COMPONENT_NAMES = {"rules": "cxr_negation_rules", "negex": "cxr_negex"}


def _ensure_extensions() -> None:
    for name in ("negated", "uncertain"):
        if not Span.has_extension(name):
            Span.set_extension(name, default=False)
    if not Span.has_extension("negation_cue"):  # the cue that decided, for inspection
        Span.set_extension("negation_cue", default=None)


_ensure_extensions()

# ---------------------------------------------------------------------------------------------
# Cue lists. Cues are matched on lower-cased tokens (spaCy's tokenizer splits "n't", "-", "/").
# ---------------------------------------------------------------------------------------------

# Phrases that look like negation/uncertainty cues but are not (they cancel the cue they hold).
PSEUDO = [
    "no change", "no changes", "no significant change", "no significant changes", "no interval change",
    "no significant interval change", "no appreciable change", "no definite change", "no substantial change",
    "no further", "not only", "no increase", "no suspicious change", "without change",
    "without significant change", "without interval change", "not changed", "unchanged",
    "not significantly changed", "no longer needed", "gram negative", "not been changed",
    "not well seen", "not well visualized", "not well evaluated", "not clearly seen",
    "not clearly visualized", "not entirely excluded", "not calcified", "not definitively calcified",
    "not definitely calcified", "not significantly different", "not significantly enlarged",
]

# 1. pre-negation uncertainty (CheXpert pre_negation_uncertainty.txt): checked before negation.
PRE_NEG_UNCERTAIN = [
    "cannot exclude", "can not exclude", "cannot be excluded", "can not be excluded",
    "cannot rule out", "can not rule out", "cannot be ruled out", "can not be ruled out",
    "not excluded", "not ruled out", "not be excluded", "not be ruled out", "not entirely excluded",
    "no new", "no evidence to rule out", "no definite new", "difficult to exclude", "difficult to rule out",
    "could not be excluded", "could not exclude", "is not excluded", "are not excluded",
    "not completely excluded", "not definitely excluded", "not fully excluded", "not be entirely excluded",
]
# the same cues when they follow the mention ("X cannot be excluded", "X is not excluded")
POST_NEG_UNCERTAIN = [
    "cannot be excluded", "can not be excluded", "cannot be ruled out", "can not be ruled out",
    "not excluded", "not ruled out", "not be excluded", "not be ruled out", "not entirely excluded",
    "could not be excluded", "not completely excluded", "not definitely excluded", "not fully excluded",
    "not be entirely excluded",
]

# 2. negation (CheXpert negation.txt, NegBio neg_patterns.txt)
PRE_NEGATION = [
    "no", "not", "without", "absence of", "absent", "negative for", "free of", "clear of",
    "clearing of", "resolution of", "resolved", "resolving", "interval resolution of", "removal of",
    "disappearance of", "drainage of", "history of", "rule out", "evaluation for", "evaluate for",
    "assess for", "assessment for", "to exclude", "ruled out", "r/o", "exclude",
    "excluded", "excludes", "no evidence of", "no sign of", "no signs of", "no finding of",
    "no findings of", "no findings to suggest", "no focus of", "no area of", "no development of",
    "without development of", "without evidence of", "neither", "nor", "never", "rather than",
    "instead of", "none", "n't", "no longer", "normal", "unremarkable", "denies",
]
POST_NEGATION = [
    "not", "n't", "absent", "resolved", "has resolved", "have resolved", "has cleared", "have cleared",
    "cleared", "removed", "has been removed", "have been removed", "no longer", "is negative",
    "are negative", "normal", "unremarkable", "within normal limits", "within normal limit",
    "within limits of normal", "within the limits of normal",
    "resolving", "not seen", "not identified", "not demonstrated", "not visualized", "not present",
    "not appreciated", "not evident", "not apparent", "not noted", "not detected", "not enlarged",
    "is gone", "are gone", "has disappeared", "have disappeared",
]

# 3. uncertainty (CheXpert post_negation_uncertainty.txt, NegBio uncertainty_patterns.txt)
PRE_UNCERTAIN = [
    "possible", "possibly", "questionable", "question of",
    "question", "questioned", "suspect", "suspected", "suspicious", "suspicious for", "suspicion of",
    "suspicion for", "concern for", "concerning for", "worrisome for", "may", "might", "could",
    "would", "maybe", "may represent", "could represent", "might represent", "may reflect",
    "could reflect", "may be", "could be", "possibly reflecting", "possibly representing",
    "consider", "considered", "favor", "favored", "favoring", "differential",
    "differential diagnosis", "equivocal", "uncertain", "indeterminate", "correlate clinically for",
    "clinical correlation for", "may be secondary to", "could be secondary to", "may be due to",
    "could be due to", "possibility of", "may be compatible with",
    "could be compatible with", "may be consistent with", "less likely", "unlikely", "perhaps",
    "poorly evaluated", "incompletely evaluated", "obscured", "obscuring", "obscures", "?",
    "raise the possibility", "raises the possibility", "suggestive of", "suggest", "suggests",
    "suggesting", "suggestion of",
]
POST_UNCERTAIN = [
    "is suspected", "are suspected", "suspected", "is possible", "are possible", "is questioned",
    "could be present", "may be present", "might be present",
    "is not well seen", "are not well seen", "not well seen", "not well visualized",
    "not well evaluated", "poorly evaluated", "not clearly seen", "not clearly visualized", "obscured",
    "is less likely", "less likely", "unlikely", "?", "can not be evaluated", "cannot be evaluated",
    "could appear", "may appear", "a consideration", "another consideration", "in the differential",
    "also possible", "are also possible", "is also possible",
]
# Alternatives ("atelectasis versus scarring", "effusion and/or thickening"): uncertain in the
# CheXpert labeler; Open-i's gold (MeSH) records both alternatives as present, and so does the
# default here (RuleConfig.alternatives_uncertain). High-confidence hedges ("probable", "likely",
# "presumably") are not uncertainty cues either (CheXpert has "probable"; on Open-i 81% of
# "probable X" have X in the gold).
ALTERNATIVES = ["versus", "vs", "vs.", "and/or"]
HIGH_CONFIDENCE = ["probable", "probably", "likely", "most likely", "presumably", "presumed"]
# Cues with a short reach (tokens between mention and cue): "X is normal", not "X, Y normal".
SHORT_REACH = {"normal": 2, "unremarkable": 2, "within normal limits": 3, "within normal limit": 3,
               "within limits of normal": 3, "within the limits of normal": 3}

# Mentions that are uncertain by themselves (CheXpert labeler: vascular congestion, pulmonary
# congestion, indistinctness and vascular prominence are uncertain evidence of edema).
UNCERTAIN_MENTION_WORDS = ("congestion", "indistinctness", "vascular prominence", "engorgement",
                           "venous hypertension")

# Clause terminators: a cue never reaches over one of these.
TERMINATION = [
    "but", "however", "although", "though", "except", "aside from", "apart from", "which", "whereas",
    "while", "yet", "nevertheless", "there is", "there are", "there has been", "there have been",
    "there was", "there were", ";",
]


@dataclass(frozen=True)
class RuleConfig:
    """Knobs of the rule-based scope approximation (token distances; None = the whole clause)."""
    pre_negation_window: int | None = None
    post_negation_window: int | None = 6
    pre_uncertain_window: int | None = None
    post_uncertain_window: int | None = 6
    or_is_uncertain: bool = False       # CheXpert: "X or Y" -> uncertain
    uncertain_mentions: tuple[str, ...] = UNCERTAIN_MENTION_WORDS
    alternatives_uncertain: bool = False  # CheXpert: True
    termination: tuple[str, ...] = tuple(TERMINATION)
    pre_uncertain: tuple[str, ...] = tuple(PRE_UNCERTAIN)
    post_uncertain: tuple[str, ...] = tuple(POST_UNCERTAIN)
    pre_negation: tuple[str, ...] = tuple(PRE_NEGATION)
    post_negation: tuple[str, ...] = tuple(POST_NEGATION)
    pseudo: tuple[str, ...] = tuple(PSEUDO)


# label names in the cue matcher, in the order a tie (same tokens) is resolved
_CUE_KINDS = ("PSEUDO", "PRE_NEG_UNC", "POST_NEG_UNC", "PRE_NEG", "POST_NEG", "PRE_UNC", "POST_UNC", "TERM")
_PRE_FAMILY = frozenset({"PSEUDO", "PRE_NEG_UNC", "PRE_NEG", "PRE_UNC", "TERM"})
_POST_FAMILY = frozenset({"PSEUDO", "POST_NEG_UNC", "POST_NEG", "POST_UNC", "TERM"})


class NegationRules:
    """The ``rules`` method (see the module docstring). Call it on a Doc with sentences and ents."""

    def __init__(self, nlp: Language, config: RuleConfig | None = None):
        _ensure_extensions()
        self.nlp = nlp
        self.configure(config)

    def configure(self, config: RuleConfig | None = None) -> "NegationRules":
        """(Re)build the cue matcher for ``config`` (default: RuleConfig())."""
        nlp = self.nlp
        self.config = config or RuleConfig()
        c = self.config
        self.vocab = nlp.vocab
        self.matcher = PhraseMatcher(nlp.vocab, attr="LOWER")
        lists = {"PSEUDO": c.pseudo, "PRE_NEG_UNC": PRE_NEG_UNCERTAIN, "POST_NEG_UNC": POST_NEG_UNCERTAIN,
                 "PRE_NEG": c.pre_negation, "POST_NEG": c.post_negation, "PRE_UNC": c.pre_uncertain,
                 "POST_UNC": c.post_uncertain, "TERM": c.termination}
        if c.alternatives_uncertain:
            lists["PRE_UNC"] = tuple(lists["PRE_UNC"]) + tuple(ALTERNATIVES)
            lists["POST_UNC"] = tuple(lists["POST_UNC"]) + tuple(ALTERNATIVES)
        for kind in _CUE_KINDS:
            phrases = sorted(set(lists[kind]))
            self.matcher.add(kind, [nlp.make_doc(p) for p in phrases])
        self._kind_of = {nlp.vocab.strings[k]: k for k in _CUE_KINDS}
        self._rank = {k: i for i, k in enumerate(_CUE_KINDS)}
        return self

    def cues(self, doc: Doc) -> list[tuple[str, int, int]]:
        """(kind, start, end) cue matches after overlap resolution.

        Overlaps are resolved separately for the cues that look forward (pre-cues) and backward
        (post-cues), longest match first, then by kind order, so "no evidence" can be a pre-cue
        while "not excluded" is a post-cue on overlapping tokens; pseudo-negations and clause
        terminators take part in both. A cue that lies inside a longer mention ("no" in "no acute
        disease") is not a cue."""
        ents = [(e.start, e.end) for e in doc.ents]
        raw = []
        for m, s, e in self.matcher(doc):
            if any(a <= s and e <= b and (b - a) > (e - s) for a, b in ents):
                continue
            raw.append((self._kind_of[m], s, e))
        out = set()
        for family in (_PRE_FAMILY, _POST_FAMILY):
            cand = sorted((r for r in raw if r[0] in family),
                          key=lambda r: (-(r[2] - r[1]), self._rank[r[0]], r[1]))
            taken: dict[int, tuple[int, int]] = {}
            for kind, s, e in cand:
                if any(i in taken and taken[i] != (s, e) for i in range(s, e)):
                    continue  # overlaps a longer (or higher-ranked) cue: "no" inside "no change"
                for i in range(s, e):
                    taken[i] = (s, e)
                out.add((kind, s, e))
        return sorted(out, key=lambda r: (r[1], self._rank[r[0]]))

    @staticmethod
    def _clauses(doc: Doc, cues: list[tuple[str, int, int]]) -> list[int]:
        """Token indices where a clause starts (sentence starts and termination cues)."""
        starts = {s.start for s in doc.sents}
        starts.update(s for k, s, e in cues if k == "TERM")
        starts.add(len(doc))
        return sorted(starts)

    def state(self, ent: Span, cues: list[tuple[str, int, int]], clause: tuple[int, int],
              ent_tokens: set[int]) -> tuple[bool, bool, str | None]:
        """(negated, uncertain, deciding cue) of one entity given its doc's cues and its clause."""
        c = self.config
        lo, hi = clause

        def gap(a: int, b: int) -> int:
            # tokens between a and b that are not part of another mention or punctuation
            return sum(1 for i in range(a, b) if i not in ent_tokens and not ent.doc[i].is_punct)

        def pre(kind: str, window: int | None):
            for k, s, e in cues:
                if k == kind and lo <= s and e <= ent.start:
                    text = ent.doc[s:e].text.lower()
                    w = SHORT_REACH.get(text, window)
                    if w is None or gap(e, ent.start) <= w:
                        return text
            return None

        def post(kind: str, window: int | None):
            for k, s, e in cues:
                if k == kind and ent.end <= s and e <= hi:
                    text = ent.doc[s:e].text.lower()
                    w = SHORT_REACH.get(text, window)
                    if w is None or gap(ent.end, s) <= w:
                        return text
            return None

        cue = pre("PRE_NEG_UNC", c.pre_negation_window) or post("POST_NEG_UNC", c.post_negation_window)
        if cue:
            return False, True, cue
        cue = pre("PRE_NEG", c.pre_negation_window) or post("POST_NEG", c.post_negation_window)
        if cue:
            return True, False, cue
        cue = pre("PRE_UNC", c.pre_uncertain_window) or post("POST_UNC", c.post_uncertain_window)
        if cue:
            return False, True, cue
        return False, False, None

    def __call__(self, doc: Doc) -> Doc:
        ents = list(doc.ents)
        if not ents:
            return doc
        cues = self.cues(doc)
        bounds = self._clauses(doc, cues)
        ent_tokens = set()
        for e in ents:
            ent_tokens.update(range(e.start, e.end))
        for ent in ents:
            i = bisect.bisect_right(bounds, ent.start) - 1
            lo = bounds[i] if i >= 0 else 0
            hi = bounds[i + 1] if i + 1 < len(bounds) else len(doc)
            # a termination cue inside the mention's own tokens does not split it
            while hi < ent.end and i + 2 < len(bounds):
                i += 1
                hi = bounds[i + 1]
            # the cues are pruned to the clause; a clause never crosses a sentence
            negated, uncertain, cue = self.state(ent, cues, (lo, hi), ent_tokens)
            if not negated and not uncertain and self.config.or_is_uncertain:
                uncertain = self._or_conjoined(ent, ents, (lo, hi))
                cue = "or" if uncertain else None
            if not negated and not uncertain:
                uncertain = uncertain_by_itself(ent, self.config.uncertain_mentions)
                cue = "(mention)" if uncertain else None
            ent._.negation_cue = cue
            ent._.negated = negated
            ent._.uncertain = uncertain
        return doc

    @staticmethod
    def _or_conjoined(ent: Span, ents: list[Span], clause: tuple[int, int]) -> bool:
        """"X or Y" with both mentions in the clause and at most 3 tokens between them and "or"."""
        doc = ent.doc
        for other in ents:
            if other is ent or not (clause[0] <= other.start < clause[1]):
                continue
            a, b = (ent, other) if ent.start < other.start else (other, ent)
            between = doc[a.end:b.start]
            if 0 < len(between) <= 4 and any(t.lower_ == "or" for t in between):
                return True
        return False


def uncertain_by_itself(ent: Span, words: tuple[str, ...] = UNCERTAIN_MENTION_WORDS) -> bool:
    text = ent.text.lower()
    return any(w in text for w in words)


class NegexDetector:
    """The ``negex`` method: negspacy's Negex (en_clinical termset) + a NegEx uncertainty pass."""

    def __init__(self, nlp: Language):
        _ensure_extensions()
        from negspacy.negation import Negex
        from negspacy.termsets import termset

        neg_ts = termset("en_clinical").get_patterns()
        unc_ts = {"pseudo_negations": list(PSEUDO),
                  "preceding_negations": sorted(set(PRE_UNCERTAIN) | set(PRE_NEG_UNCERTAIN)),
                  "following_negations": sorted(set(POST_UNCERTAIN) | set(POST_NEG_UNCERTAIN)),
                  "termination": list(neg_ts["termination"])}
        self.neg = Negex(nlp, "negex", neg_ts, extension_name="negex")
        self.unc = Negex(nlp, "negex_uncertain", unc_ts, extension_name="negex_uncertain")

    def __call__(self, doc: Doc) -> Doc:
        ents = list(doc.ents)
        if not ents:
            return doc
        for e in ents:  # negspacy only ever sets True; start clean
            e._.negex = False
            e._.negex_uncertain = False
        self.neg(doc)
        self.unc(doc)
        for e in doc.ents:
            unc = bool(e._.negex_uncertain) or (not e._.negex and uncertain_by_itself(e))
            e._.uncertain = unc
            e._.negated = bool(e._.negex) and not unc
        return doc


@Language.factory("cxr_negation_rules", default_config={})
def make_negation_rules(nlp: Language, name: str) -> NegationRules:
    return NegationRules(nlp)


@Language.factory("cxr_negex", default_config={})
def make_negex(nlp: Language, name: str) -> NegexDetector:
    return NegexDetector(nlp)


def add_negation(nlp: Language, method: str = DEFAULT_METHOD, config: RuleConfig | None = None,
                 **add_pipe_kwargs):
    """Add the negation/uncertainty component of ``method`` ("rules" or "negex") to ``nlp``;
    ``config`` tunes the rules (see RuleConfig)."""
    if method not in METHODS:
        raise ValueError(f"unknown negation method {method!r}; expected one of {METHODS}")
    if config is not None and method != "rules":
        raise ValueError("a RuleConfig only applies to the 'rules' method")
    comp = nlp.add_pipe(COMPONENT_NAMES[method], **add_pipe_kwargs)
    if config is not None:
        comp.configure(config)
    return comp


def mention_state(ent: Span) -> str:
    """"negated", "uncertain" or "positive" for an entity processed by either component."""
    if ent._.uncertain:
        return "uncertain"
    if ent._.negated:
        return "negated"
    return "positive"
