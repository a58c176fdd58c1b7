"""What every annotator produces and how its answers are judged.

An annotator turns :class:`AnnotationRequest` s (reference image, target image, modification text)
into :class:`Annotation` rows of the annotations table (docs/architecture.md §4). Every raw answer goes through
:func:`judge`: parsed strictly, else repaired leniently, and rejected with a reason when it is not a
usable chain of thought (bad format, leakage of the target image, a conclusion that only repeats
the caption). Rejections are recorded, never dropped.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from model_code.chain import SECTIONS, CoT, CoTFormatError, is_blank, normalised_text, repair, word_count

# Phrases that betray that the annotator saw the target image.
LEAKAGE_PATTERNS = (
    r"\btarget (?:image|picture|photo)\b", r"\bsecond (?:image|picture|photo)\b", r"\bother (?:image|picture|photo)\b",
    r"\bboth (?:images|pictures|photos)\b", r"\btwo (?:images|pictures|photos)\b",
    r"\b(?:image|picture|photo) (?:on the right|2|two)\b",
)
_LEAKAGE = re.compile("|".join(LEAKAGE_PATTERNS), re.IGNORECASE)
UNKNOWN_QUERY = "unknown_query"   # the reason of an annotator that knows queries by id and not this one


@dataclasses.dataclass(frozen=True)
class LengthBounds:
    """Word-count bounds for one chain-of-thought section: the 5th percentile at least ``p05_min``,
    the 95th at most ``p95_max`` (the annotation suite, ``model_code.annotation.quality``)."""

    p05_min: int
    p95_max: int


# here, not in the suite's module, so that the service checks a person's chain without pandas
DEFAULT_LENGTH_BOUNDS = {"caption": LengthBounds(3, 200), "reasoning": LengthBounds(5, 400),
                         "conclusion": LengthBounds(3, 200)}


@dataclasses.dataclass(frozen=True)
class AnnotationRequest:
    query_id: str
    reference_path: Path
    target_path: Path
    modification: str
    content_key: str = ""    # what the annotation describes: the two images' bytes and the text (see the store)


@dataclasses.dataclass
class Annotation:
    query_id: str
    teacher: str
    prompt_version: str
    caption: str | None
    reasoning: str | None
    conclusion: str | None
    raw: str
    status: str              # ok | rejected
    reject_reason: str | None
    repairs: str = ""        # what repair() changed, '; '-joined
    content_key: str = ""    # the request's content key (set by the store when the row is stored)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def cot(self) -> CoT:
        return CoT(self.caption, self.reasoning, self.conclusion)


def leakage(text: str) -> str | None:
    """The first phrase in ``text`` that reveals a target image was seen, or None."""
    m = _LEAKAGE.search(text)
    return m.group(0) if m else None


def rejection(query_id: str, teacher: str, prompt_version: str, raw: str, reason: str) -> Annotation:
    return Annotation(query_id, teacher, prompt_version, None, None, None, raw, "rejected", reason)


def chain_problem(cot: CoT) -> str | None:
    """Why the judge rejects a well-formed chain, as its rejection reason, or None: a phrase that
    betrays the target image (``leakage: ...``), or a conclusion that only repeats the caption. The
    rules every chain meets, a teacher's or a person's (:func:`judge`, :func:`judge_person`)."""
    leaked = leakage(cot.caption + " " + cot.reasoning + " " + cot.conclusion)
    if leaked:
        return f"leakage: {leaked.lower()}"
    if normalised_text(cot.conclusion) == normalised_text(cot.caption):
        return "conclusion_repeats_caption"
    return None


def judge(query_id: str, teacher: str, prompt_version: str, raw: str) -> Annotation:
    """Turn a raw answer into an accepted or a rejected annotation (with the reason)."""
    def rejected(reason: str) -> Annotation:
        return rejection(query_id, teacher, prompt_version, raw, reason)

    if is_blank(raw):
        return rejected("empty_answer")
    try:
        fixed = repair(raw)
    except CoTFormatError as e:
        return rejected(e.reason)
    cot = fixed.cot
    problem = chain_problem(cot)
    if problem:
        return rejected(problem)
    return Annotation(query_id, teacher, prompt_version, cot.caption, cot.reasoning, cot.conclusion, raw, "ok", None,
                      "; ".join(fixed.repairs))


# a chain a person wrote (a correction in the service): its source as the annotations table names it
PERSON = "person"
PERSON_PROMPT_VERSION = "correction-1"


def person_chain_problem(cot: CoT, *, to_train: bool = False) -> str | None:
    """Why a chain a person wrote cannot be used, as a rejection reason, or None: the judge's rules
    (:func:`chain_problem`) and each section at most the annotation suite's words (``too_long``; the
    characters are capped by :class:`CoT` itself). To search with, that is all; ``to_train`` also
    asks for the suite's fewest words (``too_short``), so that every chain accepted for training
    passes the suite."""
    for name in SECTIONS:
        words, bounds = word_count(getattr(cot, name)), DEFAULT_LENGTH_BOUNDS[name]
        if words > bounds.p95_max:
            return f"too_long: <{name}> has {words} words, at most {bounds.p95_max}"
        if to_train and words < bounds.p05_min:
            return f"too_short: <{name}> has {words} words, at least {bounds.p05_min}"
    return chain_problem(cot)


def judge_person(query_id: str, sections: dict) -> Annotation:
    """A person's chain (``{"caption", "reasoning", "conclusion"}``, as the service recorded it) as
    an annotation of source :data:`PERSON`: accepted, or rejected with the reason (kept, never trained
    on), by the rules a teacher's chain meets, strictly (nothing is repaired in a person's words)."""
    raw = json.dumps({k: sections.get(k) for k in SECTIONS}, ensure_ascii=False)
    try:
        cot = CoT(*(sections.get(k) for k in SECTIONS))
    except CoTFormatError as e:
        return rejection(query_id, PERSON, PERSON_PROMPT_VERSION, raw, e.reason)
    problem = person_chain_problem(cot, to_train=True)
    if problem:   # a length as its kind (the reasons are a histogram), the rest as the judge says them
        return rejection(query_id, PERSON, PERSON_PROMPT_VERSION, raw,
                         problem.split(":")[0] if problem.startswith("too_") else problem)
    return Annotation(query_id, PERSON, PERSON_PROMPT_VERSION, cot.caption, cot.reasoning, cot.conclusion, raw, "ok",
                      None)


def judge_by_id(requests: Sequence[AnnotationRequest], teacher: str, prompt_version: str,
                raw_of: Callable[[str], str | None]) -> list[Annotation]:
    """The annotations of an annotator that knows queries by id (the oracle, a chains file):
    ``raw_of(query_id)`` is its raw answer, judged like any teacher's, or None for a query it does not
    know (an ``UNKNOWN_QUERY`` rejection, which the store returns but never keeps)."""
    out = []
    for r in requests:
        raw = raw_of(r.query_id)
        out.append(rejection(r.query_id, teacher, prompt_version, "", UNKNOWN_QUERY) if raw is None
                   else judge(r.query_id, teacher, prompt_version, raw))
    return out


class Annotator(Protocol):
    name: str                   # the `teacher` column
    prompt_version: str
    default_min_acceptance: float

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[Annotation | None]:
        """One annotation per request, in order; None where the request itself failed (a transport
        error after retries): nothing is recorded for it and a later run tries again."""
