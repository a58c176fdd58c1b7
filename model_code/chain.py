"""The three-part chain of thought of CIR-CoT (docs/architecture.md §1) and its text form.

    <caption>a long blue dress with short sleeves</caption>
    <reasoning>the text asks for red instead of blue and no sleeves; length stays</reasoning>
    <conclusion>a long red sleeveless dress</conclusion>

``parse`` is strict and says precisely what is wrong (:class:`CoTFormatError` with a ``reason``
code used as the rejection reason of an annotation); ``repair`` is lenient and recovers the common
deviations of teacher models, reporting each repair it made.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import unicodedata

SECTIONS = ("caption", "reasoning", "conclusion")
MAX_SECTION_CHARS = 1500
# the longest answer repair() reads: three full sections, their tags, and as much again of chatter
MAX_TEXT_CHARS = 6 * MAX_SECTION_CHARS
# kana and CJK ideographs: scripts written without spaces, where each character counts as a word
_UNSPACED = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


# characters of rendering categories that draw nothing: Hangul fillers, the combining grapheme joiner,
# variation selectors (and the Mongolian ones), Khmer's inherent vowels, the blank braille pattern
NOT_RENDERED = frozenset([0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D, 0x180F, 0x2800, 0x3164,
                          0xFFA0, *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)])


def renders(ch: str) -> bool:
    """Whether a character draws something on its own: a letter, digit, symbol or punctuation mark
    (by Unicode category) that is not one of the fillers and selectors of ``NOT_RENDERED``. Spaces,
    control and format characters (zero-width spaces and joiners, the BOM, soft hyphens, bidi marks)
    and combining marks alone draw nothing."""
    return unicodedata.category(ch)[0] in "LNPS" and ord(ch) not in NOT_RENDERED


def visible(text: str) -> str:
    """``text`` without what shows nothing: spaces and separators of any script, control and format
    characters, and the fillers and selectors of ``NOT_RENDERED`` (combining marks are kept with the
    characters they mark)."""
    return "".join(ch for ch in text if unicodedata.category(ch)[0] not in "ZC" and not ch.isspace()
                   and ord(ch) not in NOT_RENDERED)


@functools.cache
def visible_pattern() -> str:
    """A regular expression that finds a character that :func:`renders` (for checks that take a regex,
    e.g. Great Expectations'): a text it does not match is blank, as :func:`is_blank` says."""
    ranges, start = [], None
    for code in range(0x110000):
        shown = renders(chr(code))
        if shown and start is None:
            start = code
        elif not shown and start is not None:
            ranges.append((start, code - 1))
            start = None
    if start is not None:
        ranges.append((start, 0x10FFFF))
    return "[" + "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges) + "]"


def is_blank(text) -> bool:
    """Whether ``text`` is not a string or shows nothing: no character that :func:`renders`. One
    notion of empty for modification texts, captions, chain sections and search requests alike."""
    return not isinstance(text, str) or not any(map(renders, text))


def normalised_text(text: str) -> str:
    """``text`` reduced to what it says, in any script: NFKC, case-folded, letters, digits and symbols
    (emoji too) kept, punctuation, spaces and invisible characters between them reduced to one space.
    Two texts that normalise alike say the same thing ("conclusion repeats caption")."""
    text = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(ch if unicodedata.category(ch)[0] in "LNSM" else " " for ch in text)
    return " ".join(kept.split())


def word_count(text: str) -> int:
    """Words in ``text``: runs of letters or digits, each kana or CJK ideograph one word (those scripts
    put no spaces between words)."""
    words = 0
    for run in normalised_text(text).split():
        unspaced = len(_UNSPACED.findall(run))
        words += unspaced + (1 if len(_UNSPACED.sub("", run)) else 0)
    return words
_TAG = re.compile(r"<(/?)(caption|reasoning|conclusion)>", re.IGNORECASE)


class CoTFormatError(ValueError):
    """Text that is not a well-formed chain of thought. ``reason`` is one of: missing_section,
    repeated_section, unclosed_section, wrong_order, text_outside_sections, empty_section,
    too_long, tag_in_section."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


@dataclasses.dataclass(frozen=True)
class CoT:
    caption: str
    reasoning: str
    conclusion: str

    def __post_init__(self):
        for name in SECTIONS:
            text = getattr(self, name)
            if is_blank(text):
                raise CoTFormatError("empty_section", f"<{name}> is empty")
            if _TAG.search(text):
                raise CoTFormatError("tag_in_section", f"<{name}> contains a section tag")
            if len(text) > MAX_SECTION_CHARS:
                raise CoTFormatError(
                    "too_long", f"<{name}> has {len(text)} characters, over the limit of {MAX_SECTION_CHARS}"
                )

    def render(self) -> str:
        return "\n".join(f"<{name}>{getattr(self, name)}</{name}>" for name in SECTIONS)


def changed_sections(chain, model_chain) -> list[str]:
    """The sections of ``chain`` that say something else than ``model_chain``'s (:func:`normalised_text`);
    every section when there is no model's chain. Each a dict of sections or an object with them as
    attributes (a :class:`CoT`, an annotation)."""
    def section(c, name):
        return (c.get(name) if isinstance(c, dict) else getattr(c, name)) or ""

    return [s for s in SECTIONS if not model_chain
            or normalised_text(section(chain, s)) != normalised_text(section(model_chain, s))]


def parse(text: str) -> CoT:
    """The chain of thought in ``text``, which must hold exactly the three sections, in order,
    each once, non-empty and within the length limit, with nothing but whitespace around them.
    Section contents are kept exactly (``parse(c.render()) == c``)."""
    tags = [(m.group(1) == "/", m.group(2).lower(), m.start(), m.end()) for m in _TAG.finditer(text)]
    for name in SECTIONS:
        opens = sum(1 for closing, n, *_ in tags if n == name and not closing)
        closes = sum(1 for closing, n, *_ in tags if n == name and closing)
        if opens == 0 and closes == 0:
            raise CoTFormatError("missing_section", f"no <{name}> section")
        if opens > 1 or closes > 1:
            raise CoTFormatError("repeated_section", f"<{name}> appears {max(opens, closes)} times")
        if opens != closes:
            raise CoTFormatError("unclosed_section", f"<{name}> has no {'closing' if opens else 'opening'} tag")
    expected = [(closing, name) for name in SECTIONS for closing in (False, True)]
    if [(c, n) for c, n, *_ in tags] != expected:
        order = " ".join(f"<{'/' if c else ''}{n}>" for c, n, *_ in tags)
        raise CoTFormatError("wrong_order", f"sections must come as caption, reasoning, conclusion; found {order}")
    outside = [text[: tags[0][2]], text[tags[1][3]: tags[2][2]], text[tags[3][3]: tags[4][2]], text[tags[5][3]:]]
    for chunk in outside:
        if chunk.strip():
            raise CoTFormatError("text_outside_sections", f"text outside the sections: {chunk.strip()[:60]!r}")
    return CoT(*(text[tags[2 * i][3]: tags[2 * i + 1][2]] for i in range(3)))


@dataclasses.dataclass(frozen=True)
class Repaired:
    cot: CoT
    repairs: tuple[str, ...]  # what was changed to get there; empty when the text parsed as it was


# possessive runs of blanks (``*+``): a line of blanks is read once, not once per way of splitting it
_HEADING = re.compile(
    r"^[ \t]*+(?:#{1,6}[ \t]*+|\d+[.)][ \t]*+|[-*][ \t]++)?(?:\*\*|__)?[ \t]*+(caption|reasoning|conclusion)[ \t]*+"
    r"(?:\*\*|__)?[ \t]*+[:\-–—]?[ \t]*+(?:\*\*|__)?[ \t]*+", re.IGNORECASE | re.MULTILINE)
_FENCE = re.compile(r"^```[a-z]*\s*$", re.MULTILINE)


def repair(text: str) -> Repaired:
    """Recover a chain of thought from a teacher's near miss: markdown headings ("Caption:",
    "**Reasoning**", "## Conclusion") instead of tags, a missing closing tag, code fences and
    chatter around the sections. Raises :class:`CoTFormatError` when a section is missing,
    repeated or empty even so, and ``too_long`` for a text over ``MAX_TEXT_CHARS`` before reading it.
    Time is linear in the length of the text."""
    if len(text) > MAX_TEXT_CHARS:
        raise CoTFormatError("too_long", f"the answer has {len(text)} characters, over the limit of {MAX_TEXT_CHARS}")
    try:
        return Repaired(parse(text), ())
    except CoTFormatError as first:
        if first.reason in ("too_long", "tag_in_section"):
            raise
    repairs: list[str] = []
    if _FENCE.search(text):
        text = _FENCE.sub("", text)
        repairs.append("removed code fences")

    # Markers: opening/closing tags, or a markdown heading naming a section.
    markers = []  # (start, end, name, kind) kind in open/close/heading
    for m in _TAG.finditer(text):
        markers.append((m.start(), m.end(), m.group(2).lower(), "close" if m.group(1) else "open"))
    if not any(k == "open" for *_, k in markers):
        for m in _HEADING.finditer(text):
            markers.append((m.start(), m.end(), m.group(1).lower(), "heading"))
    markers.sort()
    starts = [(s, e, n, k) for s, e, n, k in markers if k != "close"]
    found: dict[str, str] = {}
    for i, (_s, e, name, kind) in enumerate(starts):
        if name in found:
            raise CoTFormatError("repeated_section", f"<{name}> appears more than once")
        nxt = starts[i + 1][0] if i + 1 < len(starts) else len(text)
        close = next((m for m in markers if m[3] == "close" and m[2] == name and e <= m[0] <= nxt), None)
        if kind == "heading":
            repairs.append(f"markdown heading for {name}")
        elif close is None:
            repairs.append(f"added missing </{name}>")
        end = close[0] if close else nxt
        found[name] = text[e:end].strip().strip("*_").strip()
        tail = text[(close[1] if close else nxt):nxt]
        if tail.strip():
            repairs.append(f"dropped text after {name}")
    for name in SECTIONS:
        if name not in found:
            raise CoTFormatError("missing_section", f"no <{name}> section, even read leniently")
    if [n for *_, n, k in starts] != list(SECTIONS):
        raise CoTFormatError("wrong_order", "sections are not in the order caption, reasoning, conclusion")
    if starts and text[: starts[0][0]].strip():
        repairs.append("dropped text before the sections")
    return Repaired(CoT(found["caption"], found["reasoning"], found["conclusion"]), tuple(repairs))
