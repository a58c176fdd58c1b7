"""Reference resolution in cir-shapes chains, measured: which object each phrase of a modification
means ("the yellow shape is middle left: small yellow triangle"), right or wrong by the kind of phrase,
and where a wrong chain first leaves the oracle's.

The oracle's reasoning (``model_code.synthetic.oracle``) states, for every edit, which object(s) each
phrase means before what they become. A *resolution clause* is one such statement: a phrase, "is" or
"are", and the objects, cell first. A generated chain's clause is right when it names exactly the
oracle's objects for the same phrase (the k-th time a phrase is resolved is compared with the k-th).

- :func:`phrase_kind`: colour, shape, size, position, superlative, negation, or "only" (the one object).
- :func:`resolution_hits`: per oracle clause, its kind and whether the generated reasoning resolves it so.
- :func:`first_error`: the part of the oracle's text where a generated text first differs from it:
  caption, resolution, result (what an object becomes), restated scene ("Now: ..."), conclusion.
- :func:`resolution_scores`: both over many chains, as the flat metrics pretraining and
  ``bench/diagnose_embedded.py skills`` report (``resolution_acc[kind=colour]``, ``first_error[part=result]``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from model_code.synthetic import scenes
from model_code.synthetic.oracle import CELLS, scene_from_text

PHRASE_KINDS = ("colour", "shape", "size", "position", "superlative", "negation", "only")
PARTS = ("caption", "resolution", "result", "restated scene", "conclusion")

_SUPERLATIVES = ("leftmost", "rightmost", "topmost", "highest", "lowest", "bottom-most", "largest", "biggest",
                 "smallest")
_CELL = "|".join(sorted(CELLS.values(), key=len, reverse=True))
# a clause naming objects: "<phrase> is|are <cell>: ..." (the objects start with a canonical cell)
_CLAUSE = re.compile(rf"^(?P<phrase>.+?) (?:is|are) (?P<objects>(?:{_CELL}):.*)$", re.IGNORECASE | re.DOTALL)
_SPECIAL = re.compile(r"<\|[a-z_]+\|>")
_RESULT_STARTS = ("it ", "they ", "taking ", "swapping ")
_SECTION = re.compile(r"<(caption|reasoning|conclusion)>(.*?)(?:</\1>|$)", re.DOTALL)


def _words(phrase: str) -> set[str]:
    return set(re.findall(r"[a-z-]+", phrase.lower()))


def phrase_kind(phrase: str) -> str:
    """The kind of a referring phrase as a modification words it ("the yellow shape": colour, "the big
    circle": size, "the object at the top middle": position, "the lowest object": superlative, "the
    objects that are not red": negation, "the shape" of a one-object scene: only). A phrase stating two
    attributes counts as the one that is not its shape (colour or size), as a shape alone is the weaker cue."""
    words = _words(phrase)
    if "not" in words:
        return "negation"
    if words & set(_SUPERLATIVES):
        return "superlative"
    if re.search(r"\b(in|at) the\b", phrase.lower()):
        return "position"
    if words & set(scenes.COLORS):
        return "colour"
    if words & {w for ws in scenes.SIZE_WORDS.values() for w in ws}:
        return "size"
    if words & (set(scenes.SHAPES) | set(scenes.SHAPE_PLURAL.values())):
        return "shape"
    return "only"


def _sentences(reasoning: str) -> list[str]:
    """The reasoning's sentences (each starts with a capital letter after ". ")."""
    return [s for s in re.split(r"(?<=\.)\s+(?=[A-Z])", reasoning.strip()) if s]


def resolution_clauses(reasoning: str) -> list[tuple[str, str]]:
    """Every resolution clause of a reasoning, in order: (the phrase lower-cased, the objects' text)."""
    out = []
    for sentence in _sentences(reasoning):
        if sentence.startswith(("Now:", "Added:")):
            continue
        for clause in sentence.rstrip(".").split("; "):
            if clause.lower().startswith(_RESULT_STARTS):
                continue
            m = _CLAUSE.match(clause)
            if m:
                out.append((m["phrase"].lower().strip(), m["objects"]))
    return out


def resolution_hits(generated: str, oracle: str) -> list[tuple[str, bool]]:
    """Per resolution clause of the oracle's reasoning ``oracle``: its phrase's kind and whether the
    generated reasoning ``generated`` names the same objects for the same phrase (its k-th clause
    of that phrase against the oracle's k-th; a phrase the generated text never resolves is wrong)."""
    mine: dict[str, list[str]] = {}
    for phrase, objects in resolution_clauses(generated):
        mine.setdefault(phrase, []).append(objects)
    seen: Counter = Counter()
    out = []
    for phrase, objects in resolution_clauses(oracle):
        k = seen[phrase]
        seen[phrase] += 1
        got = mine.get(phrase, [])
        right = k < len(got) and scene_from_text(got[k]) == scene_from_text(objects)
        out.append((phrase_kind(phrase), right))
    return out


def _parts(oracle: str) -> list[tuple[int, str]]:
    """Where each part of an oracle text (a rendered chain, or a text edit's reasoning and conclusion)
    starts, in order: (character offset, part)."""
    starts: list[tuple[int, str]] = []
    for m in _SECTION.finditer(oracle):
        name, body, at = m.group(1), m.group(2), m.start()
        if name != "reasoning":
            starts.append((at, name))
            continue
        pos = m.start(2)
        starts.append((at, "resolution"))
        for sentence in _sentences(body):
            s_at = body.index(sentence, pos - m.start(2)) + m.start(2)
            pos = s_at + len(sentence)
            if sentence.startswith("Now:"):
                starts.append((s_at, "restated scene"))
                continue
            if sentence.startswith("Added:"):
                starts.append((s_at, "result"))
                continue
            c_at = s_at
            for clause in sentence.split("; "):
                starts.append((c_at, "result" if clause.lower().startswith(_RESULT_STARTS) else "resolution"))
                c_at += len(clause) + 2
    return sorted(starts)


def _section(text: str, name: str) -> str:
    """A section's text in a tagged text ("" when it has none; an unclosed one runs to the end)."""
    return next((m.group(2) for m in _SECTION.finditer(text) if m.group(1) == name), "")


def first_error(generated: str, oracle: str) -> str | None:
    """The part of ``oracle`` (one of ``PARTS``) in which ``generated`` first differs from it, None
    when they are the same text. A difference at the boundary after a part (a list of objects that
    goes on, a section closed early) belongs to the part before it."""
    generated = _SPECIAL.sub("", generated).strip()   # padding or the end of turn after the text
    if generated == oracle.strip():
        return None
    d = 0
    for a, b in zip(generated, oracle):
        if a != b:
            break
        d += 1
    label = None
    for start, part in _parts(oracle):
        if start > d:
            break
        label = part
    return label or "caption"


def resolution_scores(generated: Sequence[str], oracle: Sequence[str], prefix: str = "") -> dict:
    """Resolution accuracy overall and per phrase kind (``resolution_acc[kind=colour]`` with its count
    ``n_resolved[kind=colour]``), and the first-error part of the wrong texts (``first_error[part=...]``:
    a share of the wrong ones, with ``n_wrong``), over pairs of generated and oracle texts (whole
    chains, or a text edit's reasoning and conclusion). ``prefix`` goes before every key."""
    hits: list[tuple[str, bool]] = []
    errors: Counter = Counter()
    for g, o in zip(generated, oracle):
        hits += resolution_hits(_section(g, "reasoning"), _section(o, "reasoning"))
        part = first_error(g, o)
        if part is not None:
            errors[part] += 1
    out = {f"{prefix}resolution_acc": round(sum(ok for _, ok in hits) / max(len(hits), 1), 4),
           f"{prefix}n_resolved": len(hits)}
    for kind in PHRASE_KINDS:
        mine = [ok for k, ok in hits if k == kind]
        if mine:
            out[f"{prefix}resolution_acc[kind={kind}]"] = round(sum(mine) / len(mine), 4)
            out[f"{prefix}n_resolved[kind={kind}]"] = len(mine)
    wrong = sum(errors.values())
    out[f"{prefix}n_wrong"] = wrong
    for part in PARTS:
        if errors[part]:
            out[f"{prefix}first_error[part={part}]"] = round(errors[part] / wrong, 4)
    return out
