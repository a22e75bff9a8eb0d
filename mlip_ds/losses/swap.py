"""Text swapping proxy task (MLIP sec. 4, our reading).

With probability ``p`` (0.5) a report is altered with material from another report of the batch and
the swap head predicts whether it was. Two ways, both leaving the report's negation words in place so
the task cannot be solved by grammar alone (the image must be consulted):
* ``mentions``: one affirmed finding concept of the report (all its mention spans, so FINDINGS and
  IMPRESSION stay consistent) is replaced by the surface form of a concept of the partner report
  that the report does not mention; the words around the span, negations included, are untouched.
* ``sentence``: one affirmative sentence is replaced by a different affirmative partner sentence, so
  the number of negated statements is unchanged.
``auto`` tries mentions first, then a sentence. Labels are 1 exactly when the text was changed.

Only affirmed statements are swapped. A negated or uncertain one swapped for another ("no effusion"
-> "no pneumothorax") is usually still true of the image, so labelling it "swapped" would teach the
head noise; a report with no affirmed statement (a normal report) is left as it is, label 0.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEGATION_CUES = ("no", "not", "without", "negative for", "free of", "absence of", "absent", "none",
                 "neither", "nor", "normal", "unremarkable", "clear")
_NEG_RE = re.compile(r"\b(" + "|".join(re.escape(c) for c in NEGATION_CUES) + r")\b", re.IGNORECASE)
_SENT_RE = re.compile(r"[^.!?\n]+[.!?]?")
_HEADER_RE = re.compile(r"^\s*(?:[A-Z][A-Z ]+:\s*|\d+\.\s+)?")


def negation_words(text: str) -> list[str]:
    """The negation cues of ``text`` in order (lower case): what swapping must keep."""
    return [m.group(0).lower() for m in _NEG_RE.finditer(text)]


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence, without section headers ("FINDINGS:") or list numbers."""
    spans = []
    for m in _SENT_RE.finditer(text):
        start = m.start() + len(_HEADER_RE.match(m.group(0)).group(0))
        end = m.end()
        while end > start and text[end - 1].isspace():
            end -= 1
        if end - start > 1 and any(ch.isalpha() for ch in text[start:end]):
            spans.append((start, end))
    return spans


@dataclass
class SwapResult:
    texts: list[str]
    entities: list[list[dict]]  # re-linked spans of the new texts (offsets shifted, concepts swapped)
    labels: torch.Tensor        # (B,) long, 1 = swapped
    partners: list[int]         # the partner report of each swapped sample, -1 otherwise
    kinds: list[str]            # "mentions", "sentence" or "" per sample


def _match_case(src: str, new: str) -> str:
    if src[:1].isupper() and new[:1].islower():
        return new[:1].upper() + new[1:]
    if src[:1].islower() and new[:1].isupper() and not new[:2].isupper():
        return new[:1].lower() + new[1:]
    return new


def _replace(text: str, ents: list[dict], edits: list[tuple[int, int, str, list[dict]]]):
    """Apply non-overlapping (start, end, new_text, new_entities_relative) edits; drop old entities
    inside edited ranges, shift the others, add the new ones."""
    edits = sorted(edits)
    pieces, new_ents, pos = [], [], 0
    kept = [dict(e) for e in ents if not any(s <= e["start"] and e["end"] <= t for s, t, _, _ in edits)]
    for s, t, new, rel in edits:
        pieces.append(text[pos:s])
        base = sum(len(p) for p in pieces)
        for e in rel:
            new_ents.append({**e, "start": base + e["start"], "end": base + e["end"]})
        pieces.append(new)
        pos = t
    pieces.append(text[pos:])
    for e in kept:
        shift = sum(len(new) - (t - s) for s, t, new, _ in edits if t <= e["start"])
        new_ents.append({**e, "start": e["start"] + shift, "end": e["end"] + shift})
    return "".join(pieces), sorted(new_ents, key=lambda e: e["start"])


def _swap_mentions(text, ents, ptext, pents, rng, key):
    own = {e[key] for e in ents}
    foreign = [e for e in pents if e[key] not in own]
    # Only an affirmed finding: replacing it makes a claim about the image that is likely false.
    affirmed = sorted({e[key] for e in ents if not e.get("negated") and not e.get("uncertain")})
    if not affirmed or not foreign:
        return None
    target = rng.choice(affirmed)
    donor = rng.choice(foreign)
    surface = ptext[donor["start"]:donor["end"]]
    edits = []
    for e in ents:
        if e[key] == target:
            new = _match_case(text[e["start"]:e["end"]], surface)
            rel = {k: v for k, v in donor.items() if k not in ("start", "end", "negated", "uncertain")}
            rel.update(start=0, end=len(new), negated=e.get("negated", False), uncertain=e.get("uncertain", False))
            edits.append((e["start"], e["end"], new, [rel]))
    return _replace(text, ents, edits)


def _swap_sentence(text, ents, ptext, pents, rng):
    own = sentence_spans(text)
    theirs = sentence_spans(ptext)
    # Affirmative sentences only (see the module doc): a negated one swapped for another stays true.
    own = [a for a in own if not negation_words(text[a[0]:a[1]])]
    theirs = [b for b in theirs if not negation_words(ptext[b[0]:b[1]])]
    pairs = [(a, b) for a in own for b in theirs if text[a[0]:a[1]].lower() != ptext[b[0]:b[1]].lower()]
    if not pairs:
        return None
    (s, t), (ps, pt) = rng.choice(pairs)
    rel = [{**e, "start": e["start"] - ps, "end": e["end"] - ps} for e in pents if ps <= e["start"] and e["end"] <= pt]
    return _replace(text, ents, [(s, t, ptext[ps:pt], rel)])


def swap_texts(texts: list[str], entities: list[list[dict]], p: float = 0.5, mode: str = "auto",
               rng: random.Random | None = None, key: str = "cui", tries: int | None = None) -> SwapResult:
    """Swap each report with probability ``p`` using another report of the batch (see module doc).

    ``entities[i]``: the report's mentions, {start, end, negated, <key>, ...} as in the shard schema.
    Partners are tried in random order (at most ``tries``, default all); a selected report that no
    partner can change (e.g. it already mentions every concept of the batch) stays as is, label 0.
    """
    if mode not in ("auto", "mentions", "sentence"):
        raise ValueError(f"swap mode must be 'auto', 'mentions' or 'sentence', got {mode!r}")
    rng = rng or random.Random()
    n = len(texts)
    out_t, out_e, labels, partners, kinds = list(texts), [list(e) for e in entities], [0] * n, [-1] * n, [""] * n
    for i in range(n):
        if n < 2 or rng.random() >= p:
            continue
        others = [j for j in range(n) if j != i]
        for j in rng.sample(others, len(others) if tries is None else min(tries, len(others))):
            res, kind = None, ""
            if mode in ("auto", "mentions"):
                res, kind = _swap_mentions(texts[i], entities[i], texts[j], entities[j], rng, key), "mentions"
            if res is None and mode in ("auto", "sentence"):
                res, kind = _swap_sentence(texts[i], entities[i], texts[j], entities[j], rng), "sentence"
            if res is not None and res[0] != texts[i]:
                out_t[i], out_e[i] = res
                labels[i], partners[i], kinds[i] = 1, j, kind
                break
    return SwapResult(out_t, out_e, torch.tensor(labels, dtype=torch.long), partners, kinds)


def swap_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the swap head's (B, 2) logits against the swapped labels."""
    return F.cross_entropy(logits.float(), labels)
