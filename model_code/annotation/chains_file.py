"""Chains of thought written elsewhere, brought in as a teacher (the :class:`~model_code.annotation.judge.Annotator`
interface): :class:`FileTeacher` reads a JSON Lines file of chains by query id and hands each one to
:func:`~model_code.annotation.judge.judge`, so a chain from a file is stored, checked and rejected
exactly like a chain a teacher model wrote.

The file, one JSON object a line (blank lines are skipped)::

    {"query_id": "12060", "chain": "<caption>…</caption><reasoning>…</reasoning><conclusion>…</conclusion>"}
    {"query_id": "12062", "caption": "…", "reasoning": "…", "conclusion": "…"}

``chain`` is the whole tagged text (a trailing ``<emb>`` is allowed and dropped); the three separate
fields are how published annotations often come, and are rendered with :meth:`model_code.chain.CoT.render`.
A chain that is empty, malformed, leaks the target image or concludes with its caption is not a
file error: it becomes a rejected annotation with its reason, recorded like a teacher's. A file that
cannot be read as such chains at all raises :class:`ChainsFileError` naming the file and the line.

:func:`chains_from_text` makes placeholder chains from the queries' own texts (no images, no
model), so that the path of a real benchmark can be tried on a CPU; :func:`write_chains_file`
writes a file of chains.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from model_code.annotation.judge import LEAKAGE_PATTERNS, Annotation, AnnotationRequest, judge_by_id
from model_code.chain import MAX_SECTION_CHARS, SECTIONS, CoT, CoTFormatError
from model_code.common import atomic_write_text, bytes_md5

EMB = "<emb>"   # the CIR-CoT model's embedding token: may end a chain in the file, is not part of it
_LEAKAGE = re.compile("|".join(LEAKAGE_PATTERNS), re.IGNORECASE)
_SECTION_TAG = re.compile(r"</?(?:caption|reasoning|conclusion)>", re.IGNORECASE)
_PLACEHOLDER_TEXT_CHARS = MAX_SECTION_CHARS - 100   # room for the words around the quoted request


class ChainsFileError(ValueError):
    """A chains file that cannot be used: the message names the file and, where there is one, the
    (1-based) line."""


def _render(caption: str, reasoning: str, conclusion: str) -> str:
    """The tagged text of three sections; sections the chain format refuses (blank, too long, holding
    a tag) are put in the same layout unchecked, so that the judge records why they are rejected."""
    try:
        return CoT(caption, reasoning, conclusion).render()
    except CoTFormatError:
        return "\n".join(f"<{name}>{text}</{name}>" for name, text in zip(SECTIONS, (caption, reasoning, conclusion)))


def _chain_of(obj: dict, where: str) -> str:
    """The chain text of one line's object (``chain``, or the three sections rendered)."""
    given = [name for name in SECTIONS if name in obj]
    if "chain" in obj:
        if given:
            raise ChainsFileError(f"{where}: has both 'chain' and {', '.join(repr(g) for g in given)}; give either "
                                  f"the whole chain or its three sections")
        chain = obj["chain"]
        if not isinstance(chain, str):
            raise ChainsFileError(f"{where}: 'chain' is {type(chain).__name__}, expected a string")
        chain = chain.strip()
        if chain.endswith(EMB):
            chain = chain[: -len(EMB)].rstrip()
        return chain
    if len(given) < len(SECTIONS):
        missing = [name for name in SECTIONS if name not in obj]
        raise ChainsFileError(f"{where}: neither 'chain' nor all three sections (missing "
                              f"{', '.join(repr(m) for m in missing)})")
    for name in SECTIONS:
        if not isinstance(obj[name], str):
            raise ChainsFileError(f"{where}: '{name}' is {type(obj[name]).__name__}, expected a string")
    return _render(*(obj[name] for name in SECTIONS))


def parse_chains(data: bytes, path: str | os.PathLike) -> dict[str, str]:
    """``{query_id: chain}`` from the bytes of a chains file (``path`` names it in errors)."""
    path = Path(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ChainsFileError(f"{path}: line {line}: not UTF-8 text") from None
    text = text.removeprefix("\ufeff")
    chains: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.split("\n"), start=1):   # not splitlines(): U+2028 may sit in a string
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ChainsFileError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ChainsFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        query_id = obj.get("query_id")
        if not isinstance(query_id, str) or not query_id.strip():
            got = "no 'query_id'" if "query_id" not in obj else f"'query_id' is {query_id!r}"
            raise ChainsFileError(f"{where}: {got}; expected the query's id as a non-empty string")
        chain = _chain_of(obj, where)
        if query_id in chains and chains[query_id] != chain:
            raise ChainsFileError(f"{where}: query {query_id!r} already has a different chain (line "
                                  f"{first_line[query_id]}); give each query one chain")
        chains.setdefault(query_id, chain)
        first_line.setdefault(query_id, number)
    if not chains:
        raise ChainsFileError(f"{path}: no chains in the file (one JSON object a line: query_id and chain)")
    return chains


class FileTeacher:
    """The chains of a JSON Lines file (see the module), judged like a teacher's answers.

    The file is read once, in ``__init__`` (a missing or unusable file fails at once, before any
    request); its bytes give ``prompt_version``, so a changed file re-judges every query and an
    unchanged one, run again, annotates nothing new. A query whose id is not in the file gets an
    ``UNKNOWN_QUERY`` rejection, which the store returns but does not store."""

    default_min_acceptance = 0.95

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            what = "is a folder, not a file" if self.path.is_dir() else "does not exist"
            raise ChainsFileError(f"chains file {self.path} {what}")
        data = self.path.read_bytes()
        self.name = f"file:{self.path.name}"
        self.prompt_version = "chains-" + bytes_md5(data)[:12]
        self.chains = parse_chains(data, self.path)

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]:
        return judge_by_id(requests, self.name, self.prompt_version, self.chains.get)


def write_chains_file(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write ``rows`` (each with ``query_id`` and ``chain``) as a chains file, one ``{"query_id", "chain"}``
    object a line, atomically (a reader never sees half a file). Returns the path."""
    lines = [json.dumps({"query_id": row["query_id"], "chain": row["chain"]}, ensure_ascii=False) for row in rows]
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


def _thing(category) -> str:
    return category.strip() if isinstance(category, str) and category.strip() else "image"


def placeholder_chain(modification: str, category: str | None = None) -> CoT:
    """A placeholder chain for one query, from its modification text alone (and the FashionIQ
    category, when there is one). It knows nothing of the images: training on it teaches the
    format, never what an image shows, and the figures of a model trained on it mean nothing.
    The request is quoted with section tags removed, the phrases the judge reads as a glimpse of the
    target ("the target photo", "second picture", …) replaced by "result", and cut to fit a section,
    so that every placeholder passes :func:`~model_code.annotation.judge.judge`."""
    thing = _thing(category)
    text = " ".join(_SECTION_TAG.sub(" ", modification).split())
    # some benchmark texts name the image wanted as "the target photo" (CIRR) or "second picture"
    # (FashionIQ): in the request that is no leak, but the judge would read it as one in a chain
    while _LEAKAGE.search(text):
        text = _LEAKAGE.sub("result", text)
    if len(text) > _PLACEHOLDER_TEXT_CHARS:
        text = text[:_PLACEHOLDER_TEXT_CHARS].rstrip() + "…"
    return CoT(f"the reference {thing}",
               f"the request asks: {text}; everything it does not mention stays as in the reference",
               f"the reference {thing} changed as asked: {text}")


def chains_from_text(triplets: pd.DataFrame) -> list[dict]:
    """``[{"query_id", "chain"}]``: one placeholder chain (:func:`placeholder_chain`) per row of a
    triplets table, made from the row's own modification text (and ``category``, when the table has
    one). **These chains carry no knowledge of the images**: they let a real benchmark's path (file
    teacher, judge, store, annotations_suite, training, evaluation) run on a CPU without a teacher
    model, and the figures of a model trained on them mean nothing."""
    categories = triplets["category"] if "category" in triplets.columns else [None] * len(triplets)
    return [{"query_id": str(q), "chain": placeholder_chain(text, category).render()}
            for q, text, category in zip(triplets["query_id"], triplets["modification"], categories)]
