"""Report augmentation for the divergence encoders' second view (MLIP sec. 1, our choice).

Two meaning-preserving perturbations of a radiology report, drawn from a caller-seeded
``random.Random`` (the pipeline seeds it per sample, so a resumed run replays it):
* sentence shuffle: the sentences of each section (FINDINGS, IMPRESSION, ...) are permuted; section
  headers stay in place, so a sentence never changes section;
* word dropout: each word is dropped with probability ``word_dropout``, except the words that carry
  polarity or certainty (negation cues such as "no", "without", hedges such as "possible"), the
  last word of a sentence (it carries the full stop) and list markers ("1."), and at least one word
  of every sentence is kept. Dropping "no" would turn "No pneumothorax." into a positive finding.
"""
from __future__ import annotations

import random
import re

from mlip_ds.losses.swap import NEGATION_CUES

# Words never dropped: negation cues (every word of the multi-word ones) and hedges.
HEDGES = ("possible", "possibly", "probable", "probably", "questionable", "may", "might", "likely",
          "unlikely", "suspected", "suspicious", "concerning", "cannot", "exclude", "excluded", "versus",
          "vs", "or", "borderline", "equivocal", "mild", "minimal", "subtle")
PROTECTED = frozenset(w for cue in NEGATION_CUES for w in cue.split()) | frozenset(HEDGES)
_HEADER_RE = re.compile(r"^[ \t]*[A-Z][A-Z /]*[A-Z]:", re.MULTILINE)
_SENTENCE_RE = re.compile(r"\S.*?(?:[.!?](?=\s|$)|$)", re.DOTALL)
_LIST_MARKER_RE = re.compile(r"\d+[.)]")
_WORD_CORE_RE = re.compile(r"[^A-Za-z]+")


def _sections(text: str) -> list[tuple[str, str]]:
    """(header, body) pairs in order; the text before the first header has an empty header."""
    matches = list(_HEADER_RE.finditer(text))
    if not matches:
        return [("", text)]
    parts = [("", text[:matches[0].start()])] if matches[0].start() > 0 else []
    for m, nxt in zip(matches, matches[1:] + [None]):
        parts.append((m.group(0), text[m.end():nxt.start() if nxt else len(text)]))
    return parts


def _sentences(body: str) -> list[str]:
    """Sentences of a section body; a list marker ("1.") stays with the sentence it numbers."""
    out: list[str] = []
    for m in _SENTENCE_RE.finditer(body):
        s = m.group(0).strip()
        if out and _LIST_MARKER_RE.fullmatch(out[-1]):
            out[-1] = out[-1] + " " + s
        else:
            out.append(s)
    return out


def _drop_words(sentence: str, p: float, rng: random.Random) -> str:
    words = sentence.split()
    if p <= 0 or len(words) < 2:
        return sentence
    keep = []
    for i, w in enumerate(words):
        core = _WORD_CORE_RE.sub("", w).lower()
        protected = (i == len(words) - 1 or not core or core in PROTECTED
                     or _LIST_MARKER_RE.fullmatch(w) is not None)
        keep.append(protected or rng.random() >= p)
    if not any(keep[:-1]):
        keep[0] = True  # a sentence keeps at least one word besides its last
    return " ".join(w for w, k in zip(words, keep) if k)


def augment_report(text: str, rng: random.Random, sentence_shuffle: bool = True,
                   word_dropout: float = 0.1) -> str:
    """A perturbed copy of ``text`` (see the module doc); the same ``rng`` state gives the same copy."""
    out = []
    for prefix, body in _sections(text):
        lead = body[:len(body) - len(body.lstrip())]
        trail = body[len(body.rstrip()):]
        sentences = _sentences(body.strip())
        if sentence_shuffle and len(sentences) > 1:
            rng.shuffle(sentences)
        sentences = [_drop_words(s, word_dropout, rng) for s in sentences]
        out.append(prefix + lead + " ".join(sentences) + trail)
    return "".join(out)
