"""Split a radiology report into sections (findings, impression, indication, comparison, ...).

Handles MIMIC-CXR style free text ("FINAL REPORT" preamble, "EXAMINATION:", "INDICATION:",
"TECHNIQUE:", "COMPARISON:", "FINDINGS:", "IMPRESSION:", typos such as "IMPRESSON:", view lines such
as "PA AND LATERAL VIEWS OF THE CHEST:") and Open-i style reports written as "FINDINGS: ...
IMPRESSION: ..." (the Open-i XML labels: comparison, indication, findings, impression). Titles are
matched case-insensitively at the start of a line (a colon, or a known title alone on its line);
in the middle of a line only a known title written in upper case and followed by a colon counts
("... normal.  IMPRESSION: No acute ..."), so prose such as "the findings: ..." is not split.

:func:`split_sections` returns :class:`Section` spans (character offsets into the original text)
that tile the report in order, without gaps other than the header titles and surrounding blanks:

  preamble   "FINAL REPORT" lines and other header-only text before the first section
  body       prose without any section header (a report with no headers is one body section)
  findings / impression / indication / history / comparison / technique / examination /
  recommendation / notification / addendum / wet_read / other

Text of the ``findings``, ``impression`` and ``body`` sections (:data:`CLINICAL_SECTIONS`) is what
the linker links by default. Titles of chest views ("PA AND LATERAL CHEST RADIOGRAPHS:") open a
``findings`` section: in MIMIC-CXR the findings follow them; so do organ sub-headers ("LUNGS:",
"HEART:", "PLEURA:", "LINES/TUBES:"). An unknown upper-case title at a line start opens an
``other`` section, which is not linked by default.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

CLINICAL_SECTIONS = ("findings", "impression", "body")

# canonical section name -> title patterns (full title, case-insensitive, without the colon).
# Misspellings seen in MIMIC-CXR ("IMPRESSON", "FINDNGS", "COMPARSION") are caught by the fuzzy
# match in canonical_section_name, not listed here.
_TITLE_PATTERNS: tuple[tuple[str, str], ...] = (
    ("findings", r"findings?(?:\s+and\s+(?:impressions?|conclusions?))?|report|reference\s+findings|"
                 r"technique\s+and\s+findings|description|observations?|results?|chest\s+findings|"
                 # organ-system sub-headers of a findings section ("LUNGS: clear. HEART: normal.")
                 r"lungs?|heart|cardiac|heart\s+and\s+mediastinum|mediastinum|hila|hilum|pleura|"
                 r"pleural\s+spaces?|bones?|osseous\s+structures|soft\s+tissues|airways?|vasculature|"
                 r"upper\s+abdomen|abdomen|(?:lines|tubes)(?:\s*(?:and|/|&)\s*(?:lines|tubes))?|"
                 r"(?:support\s+)?devices|hardware|chest\s+wall|diaphragm"),
    ("impression", r"impressions?|conclusions?|opinion|summary|diagnosis|assessment(?:\s+and\s+plan)?|"
                   r"(?:corrected|final|addendum)\s+impression|interpretation"),
    ("indication", r"(?:clinical\s+|clinic\s+)?indications?|reasons?\s+(?:for|of)\s+(?:the\s+|this\s+)?"
                   r"(?:exam|examination|study|indication|request|referral)|reason|medical\s+condition|"
                   r"clinical\s+(?:information|info|details|question|data)|questions?\s+to\s+be\s+answered|"
                   r"symptoms?|(?:chief\s+)?complaint|ordering\s+diagnosis"),
    ("history", r"(?:(?:clinical|patient|medical|past\s+medical|chest|interval|brief|additional\s+clinical|"
                r"addendum)\s+)?history(?:\s+of\s+present\s+illness|\s+provided)?|illness|hx"),
    ("comparison", r"comparisons?(?:\s+(?:exams?|examinations?|study|studies|films?|chest|to\s+prior\s+study))?|"
                   r"compare|prior\s+(?:exams?|studies|study|films?)|reference\s+(?:exam|examination|study)"),
    ("technique", r"techniques?|procedures?|procedure\s+details|views?|(?:iv\s+)?contrast|"
                  r"fluoroscopy\s+time\s+and\s+dose|dose|protocol"),
    ("examination", r"examinations?|exams?|type\s+of\s+(?:the\s+)?(?:exam|examination|study)|study|"
                    r"date\s+of\s+exam|ed\s+exam"),
    ("recommendation", r"recommendations?|follow[- ]?up|plan"),
    ("notification", r"notifications?|communication|please\s+call\s+with\s+wet\s+read"),
    ("addendum", r"addendum(?:\s+correction)?|amendment"),
    ("wet_read", r"wet\s*read"),
    ("comment", r"comments?|note|please\s+note"),
)
# one-word titles a misspelt title is compared with (edit distance <= 2, length >= 7)
_FUZZY_TITLES = {"findings": "findings", "impression": "impression", "indication": "indication",
                 "comparison": "comparison", "history": "history", "technique": "technique",
                 "conclusion": "impression", "recommendations": "recommendation",
                 "notification": "notification", "examination": "examination"}
_TITLE_RES = tuple((name, re.compile(rf"(?:{pat})", re.IGNORECASE)) for name, pat in _TITLE_PATTERNS)
# "PA AND LATERAL VIEWS OF THE CHEST", "PORTABLE AP CHEST RADIOGRAPH", "CHEST TWO VIEWS", ...
_VIEW_WORDS = (r"pa|ap|lat|lateral|frontal|portable|upright|erect|supine|semi[- ]?upright|semi[- ]?erect|"
               r"semisupine|semierect|single|one|two|three|four|bedside|chest|radiographs?|views?|films?|"
               r"of|the|and|x-?rays?|cxr|images?|study|decubitus|oblique|inspiration|expiration|"
               r"upper|abdomen|with|in|at|sitting|semiupright")
_VIEW_RE = re.compile(rf"(?:(?:{_VIEW_WORDS})\b[\s,]*)+", re.IGNORECASE)
_VIEW_ANCHOR_RE = re.compile(r"\b(?:chest|views?|radiographs?|films?|cxr|x-?rays?)\b", re.IGNORECASE)

# A candidate header: a title at a line start (any case) ending in a colon.
_LINE_HEADER_RE = re.compile(r"(?m)^[ \t]*(?P<title>[A-Za-z][A-Za-z /&()'-]{0,70}?)[ \t]*:")
# A known title alone on its line, without a colon ("IMPRESSION\n", "FINAL REPORT\n").
_BARE_HEADER_RE = re.compile(r"(?m)^[ \t]*(?P<title>[A-Za-z][A-Za-z /&'-]{0,40}?)[ \t]*$")
# An upper-case title inside a line, after a sentence end or two spaces: "...normal.  IMPRESSION: ..."
_INLINE_HEADER_RE = re.compile(r"(?:(?<=[.;!?])|(?<=\s\s)|(?<=\t))[ \t]*(?P<title>[A-Z][A-Z /&'-]{1,40}?)[ \t]*:")
_FINAL_REPORT_RE = re.compile(r"(?im)^[ \t]*(?:final|preliminary|addended)\s+report[ \t]*:?[ \t]*$")
_WORD_RE = re.compile(r"[a-z]{2,}")


@dataclass(frozen=True)
class Section:
    """A section of a report: ``text[start:end]`` is its content (the title is not included).

    ``header_start`` is where the title begins (== ``start`` for untitled sections); ``title`` is
    the title as written (None for untitled sections)."""
    name: str
    start: int
    end: int
    title: str | None = None
    header_start: int | None = None

    def text_of(self, report: str) -> str:
        return report[self.start:self.end]

    def to_json(self) -> dict:
        return {"name": self.name, "start": self.start, "end": self.end, "title": self.title,
                "header_start": self.start if self.header_start is None else self.header_start}


def canonical_section_name(title: str) -> str | None:
    """The canonical section of a header title ("Impression", "FINDINGS AND IMPRESSION", "REASON FOR
    EXAM", "PA AND LATERAL VIEWS OF THE CHEST"), or None when the title is not a known one."""
    t = " ".join(title.strip().rstrip(":").split())
    if not t:
        return None
    for name, rx in _TITLE_RES:
        if rx.fullmatch(t):
            return name
    low = t.lower()
    if " " not in low and len(low) >= 7:
        for ref, name in _FUZZY_TITLES.items():
            if _edit_distance(low, ref) <= 2:
                return name
    if _VIEW_RE.fullmatch(t) and _VIEW_ANCHOR_RE.search(t):
        return "findings"
    return None


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (small strings only)."""
    if abs(len(a) - len(b)) > 2:
        return 3
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _headers(text: str) -> list[tuple[int, int, str, str]]:
    """(header_start, content_start, canonical name, title) for every header, in text order."""
    found: dict[int, tuple[int, int, str, str]] = {}
    for m in _FINAL_REPORT_RE.finditer(text):
        s = m.start() + (len(m.group(0)) - len(m.group(0).lstrip()))
        found[s] = (s, m.end(), "preamble", m.group(0).strip())
    for m in _LINE_HEADER_RE.finditer(text):
        title = m.group("title")
        name = canonical_section_name(title)
        if name is None:
            # an unknown all-caps title at a line start ("RIGHT RIBS:") opens an "other" section
            words = title.split()
            if not (title.isupper() and 1 <= len(words) <= 6):
                continue
            name = "other"
        s = m.start("title")
        if s not in found:
            found[s] = (s, m.end(), name, title.strip())
    for m in _BARE_HEADER_RE.finditer(text):
        title = m.group("title")
        name = canonical_section_name(title)
        s = m.start("title")
        # only the most common titles count without a colon, to keep short prose lines intact
        if name in ("findings", "impression", "indication", "history", "comparison", "technique",
                    "addendum") and s not in found and len(title.split()) <= 4 \
                and not _VIEW_RE.fullmatch(title.strip()):
            found[s] = (s, m.end(), name, title.strip())
    for m in _INLINE_HEADER_RE.finditer(text):
        title = m.group("title")
        name = canonical_section_name(title)
        s = m.start("title")
        if name is not None and s not in found:
            found[s] = (s, m.end(), name, title.strip())
    out = sorted(found.values())
    # drop headers that start inside an earlier header's title
    kept: list[tuple[int, int, str, str]] = []
    for h in out:
        if kept and h[0] < kept[-1][1]:
            continue
        kept.append(h)
    return kept


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _is_prose(chunk: str) -> bool:
    """Whether a chunk before the first header reads like report prose (not just header lines)."""
    words = _WORD_RE.findall(chunk)
    return len(words) >= 3 and any(c.islower() for c in chunk)


def split_sections(text: str) -> list[Section]:
    """Sections of ``text`` in order; empty sections are kept (start == end) so titles are visible.

    A report without any header is a single ``body`` section. Text before the first header is
    ``body`` when it reads like prose, else ``preamble``."""
    headers = _headers(text)
    sections: list[Section] = []
    first = headers[0][0] if headers else len(text)
    s, e = _strip_span(text, 0, first)
    if e > s:
        name = "body" if (_is_prose(text[s:e]) or not headers) else "preamble"
        sections.append(Section(name, s, e, None, s))
    for i, (hs, cs, name, title) in enumerate(headers):
        nxt = headers[i + 1][0] if i + 1 < len(headers) else len(text)
        s, e = _strip_span(text, cs, nxt)
        if name == "preamble":
            # "FINAL REPORT" is a title line; prose below it and before the next header is the body
            if e > s and _is_prose(text[s:e]):
                sections.append(Section("preamble", hs, hs + len(title), title, hs))
                sections.append(Section("body", s, e, None, s))
                continue
            end = e if e > s else hs + len(title)
            sections.append(Section("preamble", hs, end, title, hs))
            continue
        sections.append(Section(name, s, max(s, e), title, hs))
    return sections


def section_at(sections: list[Section], offset: int) -> Section | None:
    """The section whose content span holds character ``offset`` (None in a title or gap)."""
    for sec in sections:
        if sec.start <= offset < sec.end:
            return sec
    return None


def sections_dict(text: str, names: tuple[str, ...] = ("findings", "impression")) -> dict[str, str]:
    """{name: text} for the named sections (several sections of one name are joined by a blank
    line; a missing one is ""). With the defaults this is the shard schema's "sections" field; a
    report without headers puts its body under "findings"."""
    secs = split_sections(text)
    out = {n: [] for n in names}
    has_named = any(s.name in names for s in secs)
    for sec in secs:
        name = sec.name
        if name == "body" and not has_named and "findings" in out:
            name = "findings"
        if name in out and sec.end > sec.start:
            out[name].append(text[sec.start:sec.end])
    return {n: "\n\n".join(v) for n, v in out.items()}
