"""One composed-image query answered end to end: checked inputs, reasoning, embedding, search.

What the service's ``/search`` and the ``gallery_index`` asset's example both run: the reference
image and the modification text are checked (:class:`QueryError` carries the HTTP status a
service answers with), the model writes its chain of thought (``cot``) or not (``no_cot``), and the
query embedding is searched in the gallery index built for the model's version.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from pathlib import Path

MODES = ("cot", "no_cot")
MAX_TEXT_CHARS = 1000
MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGE_PIXELS = 40_000_000


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
    if not isinstance(text, str) or not text.strip():
        raise QueryError("the modification text is empty: say how the target differs from the reference")
    if len(text) > MAX_TEXT_CHARS:
        raise QueryError(f"the modification text has {len(text)} characters; at most {MAX_TEXT_CHARS}")
    return text.strip()


def open_image(data: bytes | str | os.PathLike, *, max_bytes: int = MAX_IMAGE_BYTES,
               max_pixels: int = MAX_IMAGE_PIXELS):
    """The uploaded reference image as RGB, or a QueryError: 413 over the size limits, 400 for
    what is not a whole image."""
    from PIL import Image

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
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad file
        raise QueryError(f"the upload is not a readable image ({type(e).__name__}: {e})") from None


def answer(model, index, model_version: str, image, text: str, k: int = 10, mode: str = "cot", *,
           exclude: set[str] | None = None, max_new_tokens: int = 256) -> Answer:
    """Answer one query: ``image`` a PIL image or path, ``text`` the modification."""
    from model_code.index import GalleryIndexError

    if mode not in MODES:
        raise QueryError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    text = check_text(text)
    t0 = time.perf_counter()
    emb, reasoning = model.infer_queries([image], [text], mode, max_new_tokens=max_new_tokens, batch_size=1)
    t1 = time.perf_counter()
    try:
        ids, scores = index.search(emb.numpy(), k, model_version=model_version,
                                   exclude=[exclude] if exclude else None)
    except GalleryIndexError as e:
        status = 400 if "k must be" in str(e) else 503
        raise QueryError(str(e), status) from None
    t2 = time.perf_counter()
    chain = None
    if mode == "cot":
        r = reasoning[0]
        cot = r.get("cot")
        chain = {"caption": cot.caption if cot else None, "reasoning": cot.reasoning if cot else None,
                 "conclusion": cot.conclusion if cot else None, "raw": r.get("text", ""), "error": r.get("error")}
    step = "reasoning" if mode == "cot" else "embedding"
    return Answer(model_version, mode, ids[0], [round(s, 6) for s in scores[0]], chain,
                  {step: round(t1 - t0, 4), "search": round(t2 - t1, 4)})
