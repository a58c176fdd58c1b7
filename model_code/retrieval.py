"""One composed-image query answered end to end: checked inputs, reasoning, embedding, search.

What the service's ``/search`` and the ``gallery_index`` asset's example both run: the reference
image and the modification text are checked (:class:`QueryError` carries the HTTP status a
service answers with), the model writes its chain of thought (``cot``) or not (``no_cot``), and the
query embedding is searched in the gallery index built for the model's version.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import time
from pathlib import Path

from PIL import Image

from model_code.annotation.judge import person_chain_problem
from model_code.chain import MAX_TEXT_CHARS as MAX_CHAIN_CHARS
from model_code.chain import SECTIONS, CoT, CoTFormatError, is_blank, parse
from model_code.index import GalleryIndexError

MODES = ("cot", "no_cot")
MAX_TEXT_CHARS = 1000
MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGE_PIXELS = 25_000_000


class QueryError(ValueError):
    """A query that cannot be answered; ``status`` is the HTTP status that says why."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class Answer:
    model_version: str
    mode: str
    ids: list[str]
    scores: list[float]
    reasoning: dict | None          # {"caption", "reasoning", "conclusion", "raw", "error"} in cot mode
    timings: dict[str, float]       # seconds: reasoning (cot: generation + <emb>), embedding (no_cot), search


def check_text(text) -> str:
    if is_blank(text):
        raise QueryError("the modification text is empty: say how the target differs from the reference")
    if len(text) > MAX_TEXT_CHARS:
        raise QueryError(f"the modification text has {len(text)} characters; at most {MAX_TEXT_CHARS}")
    return text.strip()


def open_image(data: bytes | str | os.PathLike, *, max_bytes: int = MAX_IMAGE_BYTES,
               max_pixels: int = MAX_IMAGE_PIXELS):
    """The uploaded reference image as RGB, or a QueryError: 413 over the size limits, 400 for
    what is not a whole image."""
    if not isinstance(data, bytes):
        data = Path(data).read_bytes()
    if len(data) > max_bytes:
        raise QueryError(f"the image has {len(data)} bytes; at most {max_bytes}", 413)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                raise QueryError(f"the image has {im.width}x{im.height} pixels; at most {max_pixels} in all", 413)
            im.load()
            return im.convert("RGB")
    except QueryError:
        raise
    except Image.DecompressionBombError:   # PIL's own limit, far above ours: refused from the header too
        raise QueryError(f"the image has more than {max_pixels} pixels", 413) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad file
        why = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e))   # no internal object text
        raise QueryError(f"the upload is not a readable image ({type(e).__name__}: {why})") from None


def infer(model, images, texts, mode: str = "cot", *, max_new_tokens: int = 256, chains=None):
    """Query embeddings [n, hidden] (numpy) of a batch of checked queries and, in ``cot`` mode, each
    one's chain of thought as ``{"caption", "reasoning", "conclusion", "raw", "error"}`` (None in
    ``no_cot``). The batch is decoded together (the service batches the queries that arrive together).
    In ``no_cot`` mode, ``chains`` (one per query, a checked chain or None) are teacher-forced before
    ``<emb>`` where given (:func:`embed_with_chains`: a corrected search, no decoding)."""
    if mode not in MODES:
        raise QueryError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "no_cot" and chains is not None and any(c is not None for c in chains):
        emb = embed_with_chains(model, images, texts, chains, batch_size=max(len(texts), 1))
        return emb.numpy(), [None] * len(emb)
    emb, reasoning = model.infer_queries(list(images), list(texts), mode, max_new_tokens=max_new_tokens,
                                         batch_size=max(len(texts), 1))
    chains = []
    for r in reasoning:
        cot = r.get("cot") if mode == "cot" else None
        chains.append({"caption": cot.caption if cot else None, "reasoning": cot.reasoning if cot else None,
                       "conclusion": cot.conclusion if cot else None, "raw": r.get("text", ""),
                       "error": r.get("error")} if mode == "cot" else None)
    return emb.numpy(), chains


def check_chain(value):
    """A chain of thought a person gives (to search with it: a correction) as a :class:`CoT`, checked
    as a teacher's chain is (the format, the judge's rules, the length cap), or a QueryError (400)
    that says what is wrong. ``value``: ``{"caption", "reasoning", "conclusion"}`` (a dict, or its
    JSON text), or the tagged text (``<caption>...</caption><reasoning>...``)."""
    if isinstance(value, str) and len(value) > MAX_CHAIN_CHARS:
        raise QueryError(f"the chain has {len(value)} characters; at most {MAX_CHAIN_CHARS}")
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as e:
            raise QueryError(f"the chain is not valid JSON: {str(e)[:200]}") from None
    try:
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(SECTIONS))
            if unknown:
                raise QueryError(f"the chain has unknown sections {', '.join(map(repr, unknown))}: give caption, "
                                 "reasoning and conclusion")
            if not all(isinstance(value.get(k), str) for k in SECTIONS):
                raise QueryError("the chain needs caption, reasoning and conclusion, each a text")
        elif isinstance(value, str):
            value = dataclasses.asdict(parse(value.strip()))
        else:
            raise QueryError("the chain must be its three sections (JSON) or the tagged text")
        # each section without its own blanks, however it came: one chain, one ranking
        cot = CoT(*(value[s].strip() for s in SECTIONS))
    except CoTFormatError as e:
        raise QueryError(f"the chain is not usable ({e.reason}): {e.detail}") from None
    problem = person_chain_problem(cot)
    if problem:
        raise QueryError(f"the chain is not usable: {problem}")
    return cot


def embed_with_chains(model, images, texts, chains, *, batch_size: int = 32):
    """Query embeddings [n, hidden] (torch) with each query's chain given (a :class:`CoT`, its
    rendered text, or None for the no-CoT prompt) and teacher-forced before ``<emb>``: one forward
    pass, no decoding. What a corrected search runs and what the oracle-chain upper bound measures
    (``bench/diagnose_embedded.py upper-bounds``)."""
    rendered = [c if c is None or isinstance(c, str) else c.render() for c in chains]
    return model.embed_queries(list(images), list(texts), rendered, batch_size=batch_size)


def search(index, model_version: str, embeddings, k: int, *, exclude: set[str] | None = None):
    """The top-k (ids, scores) of each query embedding in the index built for ``model_version``."""
    try:
        return index.search(embeddings, k, model_version=model_version, exclude=[exclude] if exclude else None)
    except GalleryIndexError as e:
        raise QueryError(str(e), 400 if "k must be" in str(e) else 503) from None


def answer(model, index, model_version: str, image, text: str, k: int = 10, mode: str = "cot", *,
           exclude: set[str] | None = None, max_new_tokens: int = 256) -> Answer:
    """Answer one query: ``image`` a PIL image or path, ``text`` the modification."""
    if mode not in MODES:
        raise QueryError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    text = check_text(text)
    t0 = time.perf_counter()
    emb, chains = infer(model, [image], [text], mode, max_new_tokens=max_new_tokens)
    t1 = time.perf_counter()
    ids, scores = search(index, model_version, emb, k, exclude=exclude)
    t2 = time.perf_counter()
    step = "reasoning" if mode == "cot" else "embedding"
    return Answer(model_version, mode, ids[0], [round(s, 6) for s in scores[0]], chains[0],
                  {step: round(t1 - t0, 4), "search": round(t2 - t1, 4)})
