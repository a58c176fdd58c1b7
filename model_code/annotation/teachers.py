"""Chain-of-thought annotators behind one interface.

An annotator turns :class:`AnnotationRequest` s (reference image, target image, modification text)
into :class:`Annotation` rows of the annotations table (DESIGN.md §4). Every raw answer goes through
:func:`judge`: parsed strictly, else repaired leniently, and rejected with a reason when it is not a
usable chain of thought (bad format, leakage of the target image, a conclusion that only repeats
the caption). Rejections are recorded, never dropped.

- :class:`OracleAnnotator`: cir-shapes only; writes the chain from the scene graphs and edits.
- :class:`LocalTeacher`: a Qwen2-VL-family model from a local folder, batched greedy generation.
- :class:`RemoteTeacher`: an OpenAI-compatible chat-completions endpoint (vLLM, SGLang, a hosted API).

The teacher prompt is versioned by ``PROMPT_VERSION``: a new version re-annotates everything.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from model_code.annotation.cot import CoT, CoTFormatError, repair

log = logging.getLogger(__name__)

PROMPT_VERSION = "teacher-v1"
ORACLE_VERSION = "oracle-v1"

SYSTEM_PROMPT = (
    "You write training data for composed image retrieval: a person shows a reference image and asks "
    "for a change in words; a model must reason about the request and describe the image they want.")

TEACHER_PROMPT = """The first image is the reference. The second image shows the result of this request applied to it:
"{modification}"

Write three sections, exactly in this form:
<caption>a description of the reference image: the objects, their attributes and layout, whatever the request may touch</caption>
<reasoning>step by step, how the request applies to the reference: what each part of the request refers to in the reference, what changes, and what stays the same</reasoning>
<conclusion>a complete description of the image the person wants</conclusion>

The reasoning and the conclusion must read as if you had seen only the reference image and the request:
use the second image only to get the result right, and never mention it (no "target image", "second image",
"other picture", "both images"). Output only the three sections."""

# Phrases that betray that the annotator saw the target image.
LEAKAGE_PATTERNS = (
    r"\btarget (?:image|picture|photo)\b", r"\bsecond (?:image|picture|photo)\b", r"\bother (?:image|picture|photo)\b",
    r"\bboth (?:images|pictures|photos)\b", r"\btwo (?:images|pictures|photos)\b",
    r"\b(?:image|picture|photo) (?:on the right|2|two)\b",
)
_LEAKAGE = re.compile("|".join(LEAKAGE_PATTERNS), re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class AnnotationRequest:
    query_id: str
    reference_path: Path
    target_path: Path
    modification: str


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

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def cot(self) -> CoT:
        return CoT(self.caption, self.reasoning, self.conclusion)


def normalised_text(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def leakage(text: str) -> str | None:
    """The first phrase in ``text`` that reveals a target image was seen, or None."""
    m = _LEAKAGE.search(text)
    return m.group(0) if m else None


def rejection(query_id: str, teacher: str, prompt_version: str, raw: str, reason: str) -> Annotation:
    return Annotation(query_id, teacher, prompt_version, None, None, None, raw, "rejected", reason)


def judge(query_id: str, teacher: str, prompt_version: str, raw: str) -> Annotation:
    """Turn a raw answer into an accepted or a rejected annotation (with the reason)."""
    def rejected(reason: str) -> Annotation:
        return rejection(query_id, teacher, prompt_version, raw, reason)

    if not isinstance(raw, str) or not raw.strip():
        return rejected("empty_answer")
    try:
        fixed = repair(raw)
    except CoTFormatError as e:
        return rejected(e.reason)
    cot = fixed.cot
    leaked = leakage(cot.caption + " " + cot.reasoning + " " + cot.conclusion)
    if leaked:
        return rejected(f"leakage: {leaked.lower()}")
    if normalised_text(cot.conclusion) == normalised_text(cot.caption):
        return rejected("conclusion_repeats_caption")
    return Annotation(query_id, teacher, prompt_version, cot.caption, cot.reasoning, cot.conclusion, raw, "ok", None,
                      "; ".join(fixed.repairs))


class Annotator(Protocol):
    name: str                   # the `teacher` column
    prompt_version: str
    default_min_acceptance: float

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[Annotation | None]:
        """One annotation per request, in order; None where the request itself failed (a transport
        error after retries): nothing is recorded for it and a later run tries again."""


# ---------------------------------------------------------------------------------------------
# oracle


class OracleAnnotator:
    """Exact chains of thought for the cir-shapes benchmark at ``root`` (see model_code.synthetic.oracle)."""

    name = "oracle"
    prompt_version = ORACLE_VERSION
    default_min_acceptance = 1.0

    def __init__(self, root: str | os.PathLike):
        from model_code.synthetic import generate as syn

        self.root = Path(root)
        self._queries, self._graphs = {}, {}
        for split in syn.SPLITS:
            captions = self.root / "captions" / f"cap.{split}.json"
            if not captions.is_file():
                continue
            for q in json.loads(captions.read_text()):
                self._queries[q["query_id"]] = q
            self._graphs.update(json.loads((self.root / "scene_graphs" / f"{split}.json").read_text()))
        if not self._queries:
            raise FileNotFoundError(f"no cir-shapes captions under {self.root}: the oracle only annotates the synthetic benchmark")

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]:
        from model_code.synthetic import generate as syn
        from model_code.synthetic.oracle import oracle_cot

        out = []
        for r in requests:
            q = self._queries.get(r.query_id)
            if q is None:
                out.append(rejection(r.query_id, self.name, self.prompt_version, "", "unknown_query"))
                continue
            cot = oracle_cot(r.query_id, syn.scene_from_json(self._graphs[q["reference"]]), q["edits"])
            out.append(judge(r.query_id, self.name, self.prompt_version, cot.render()))
        return out


# ---------------------------------------------------------------------------------------------
# teachers


def teacher_messages(modification: str) -> list[dict]:
    """The chat of the versioned teacher prompt: the reference image, the target image, the request."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                     {"type": "text", "text": TEACHER_PROMPT.format(modification=modification.strip())}]},
    ]


def _open_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


@dataclasses.dataclass
class GenerationStats:
    requests: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


class LocalTeacher:
    """A Qwen2-VL-family model loaded by transformers from ``model_path``; greedy, batched, on the
    GPU when there is one."""

    prompt_version = PROMPT_VERSION
    default_min_acceptance = 0.95

    def __init__(self, model_path: str | os.PathLike, *, device: str | None = None, dtype: str = "auto",
                 attn_implementation: str | None = None, batch_size: int = 8, max_new_tokens: int = 384,
                 model=None, processor=None):
        self.model_path = Path(model_path)
        self.name = f"local:{self.model_path.name}"
        self._load_args = {"dtype": dtype, "device": device, "attn_implementation": attn_implementation}
        self.model, self.processor = model, processor  # loaded on first use: a resumed run may need none
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.stats = GenerationStats()

    def generate(self, requests: Sequence[AnnotationRequest]) -> list[str]:
        """Raw answers, in batches of ``batch_size``."""
        import torch

        if self.model is None:
            from model_code.model.backbone import load_backbone

            self.model, self.processor = load_backbone(self.model_path, **self._load_args)
        tok = self.processor.tokenizer
        tok.padding_side = "left"
        answers = []
        for i in range(0, len(requests), self.batch_size):
            batch = requests[i: i + self.batch_size]
            texts = [self.processor.apply_chat_template(teacher_messages(r.modification), add_generation_prompt=True,
                                                        tokenize=False) for r in batch]
            images = [img for r in batch for img in (_open_rgb(r.reference_path), _open_rgb(r.target_path))]
            inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt").to(self.model.device)
            start = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                          pad_token_id=tok.pad_token_id)
            if self.model.device.type == "cuda":
                torch.cuda.synchronize()
            new = out[:, inputs["input_ids"].shape[1]:]
            self.stats.seconds += time.perf_counter() - start
            self.stats.requests += len(batch)
            self.stats.new_tokens += int((new != tok.pad_token_id).sum())
            answers += tok.batch_decode(new, skip_special_tokens=True)
        return answers

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]:
        raws = self.generate(requests)
        return [judge(r.query_id, self.name, self.prompt_version, raw) for r, raw in zip(requests, raws)]


class TeacherRequestError(RuntimeError):
    """A request to the remote teacher failed for good (after retries, or a non-retryable status)."""


def image_data_url(path: Path, max_side: int | None = None) -> str:
    """The image as a base64 ``data:`` URL (PNG stays PNG, anything else becomes JPEG)."""
    from PIL import Image

    with Image.open(path) as im:
        if max_side and max(im.size) > max_side:
            im.thumbnail((max_side, max_side))
        fmt = "PNG" if (im.format or "").upper() == "PNG" else "JPEG"
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


class RemoteTeacher:
    """An OpenAI-compatible ``/chat/completions`` endpoint. At most ``max_concurrency`` requests
    in flight; each with ``timeout_s``; 429, 5xx and connection errors retried up to
    ``max_retries`` times with exponential backoff and jitter (honouring ``Retry-After``). The API key
    is read from the environment variable ``api_key_env`` (no key: no Authorization header)."""

    prompt_version = PROMPT_VERSION
    default_min_acceptance = 0.95

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", max_concurrency: int = 8,
                 timeout_s: float = 120.0, max_retries: int = 5, backoff_s: float = 1.0, max_tokens: int = 512,
                 max_image_side: int | None = 1024):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = f"remote:{model}"
        self.api_key_env = api_key_env
        self.max_concurrency, self.timeout_s = max_concurrency, timeout_s
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.max_tokens, self.max_image_side = max_tokens, max_image_side
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def payload(self, r: AnnotationRequest) -> dict:
        system, user = teacher_messages(r.modification)
        content = [{"type": "image_url", "image_url": {"url": image_data_url(p, self.max_image_side)}}
                   for p in (r.reference_path, r.target_path)]
        content.append(user["content"][-1])
        return {"model": self.model, "temperature": 0.0, "max_tokens": self.max_tokens,
                "messages": [system, {"role": "user", "content": content}]}

    def _headers(self) -> dict:
        key = os.environ.get(self.api_key_env)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def complete(self, r: AnnotationRequest, client) -> str:
        import httpx

        body = self.payload(r)
        url = f"{self.base_url}/chat/completions"
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                resp = client.post(url, json=body, headers=self._headers(), timeout=self.timeout_s)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                problem, wait = f"{type(e).__name__}: {e}", None
            else:
                if resp.status_code == 200:
                    try:
                        return resp.json()["choices"][0]["message"]["content"] or ""
                    except (ValueError, KeyError, IndexError, TypeError):
                        raise TeacherRequestError(f"{r.query_id}: malformed response {resp.text[:200]!r}") from None
                problem = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code != 429 and resp.status_code < 500:
                    raise TeacherRequestError(f"{r.query_id}: {problem}")
                retry_after = resp.headers.get("retry-after")
                wait = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else None
            if attempt == self.max_retries:
                raise TeacherRequestError(f"{r.query_id}: gave up after {attempt + 1} attempts; last: {problem}")
            delay = wait if wait is not None else self.backoff_s * 2 ** attempt * (0.5 + random.random())
            log.warning("teacher request %s failed (%s); retry %d in %.1fs", r.query_id, problem, attempt + 1, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[Annotation | None]:
        import httpx

        def one(r: AnnotationRequest) -> Annotation | None:
            try:
                raw = self.complete(r, client)
            except TeacherRequestError as e:
                with self._lock:
                    self.errors.append(str(e))
                return None
            return judge(r.query_id, self.name, self.prompt_version, raw)

        limits = httpx.Limits(max_connections=self.max_concurrency)
        with httpx.Client(limits=limits) as client, ThreadPoolExecutor(self.max_concurrency) as pool:
            return list(pool.map(one, requests))
