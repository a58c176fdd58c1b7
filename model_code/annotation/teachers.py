"""Teacher MLLMs that write chains of thought (the :class:`~model_code.annotation.judge.Annotator` interface).

- :class:`LocalTeacher`: a Qwen2-VL-family model from a local folder, batched greedy generation.
- :class:`RemoteTeacher`: an OpenAI-compatible chat-completions endpoint (vLLM, SGLang, a hosted API).

The teacher prompt is versioned by ``PROMPT_VERSION``: a new version re-annotates everything.
(The cir-shapes oracle is in ``model_code/synthetic/oracle.py``.)
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import email.utils
import io
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import tenacity
from PIL import Image

from model_code.annotation.judge import Annotation, AnnotationRequest, judge
from model_code.backbone import load_backbone

# torch: imported where used (slow to import; the Dagster resources load this module to build a teacher)

log = logging.getLogger(__name__)

PROMPT_VERSION = "teacher-v1"

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

# ---------------------------------------------------------------------------------------------
# teachers


def teacher_messages(modification: str) -> list[dict]:
    """The chat of the versioned teacher prompt: the reference image, the target image, the request."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "image"},
                {"type": "text", "text": TEACHER_PROMPT.format(modification=modification.strip())},
            ],
        },
    ]


def _open_rgb(path: Path):
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


class _Retryable(Exception):
    """A failed attempt worth another one; ``retry_after``: the seconds the server asked to wait."""

    def __init__(self, problem: str, retry_after: float | None = None):
        super().__init__(problem)
        self.retry_after = retry_after


def retry_after_s(value: str | None) -> float | None:
    """The seconds a ``Retry-After`` header asks for: a number of seconds, or an HTTP date (a date
    already past: 0); None when absent or unreadable."""
    value = (value or "").strip()
    if re.fullmatch(r"\d+(\.\d*)?", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


def image_data_url(path: Path, max_side: int | None = None) -> str:
    """The image as a base64 ``data:`` URL (PNG stays PNG, anything else becomes JPEG)."""
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
    sleep = staticmethod(time.sleep)  # how a retry waits (tests record the waits instead)

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

    def _wait(self, state: tenacity.RetryCallState) -> float:
        """Seconds before the next attempt: what the server asked for (``Retry-After``), else
        ``backoff_s`` x 2^(retry - 1) x a uniform jitter in [0.5, 1.5)."""
        asked = getattr(state.outcome.exception(), "retry_after", None)
        if asked is not None:
            return asked
        half = tenacity.wait_exponential(multiplier=self.backoff_s / 2)
        return (half + tenacity.wait_random_exponential(multiplier=self.backoff_s))(state)

    def complete(self, r: AnnotationRequest, client) -> str:
        """The teacher's answer to one request, retried as the class says; a TeacherRequestError
        at once on another status or a malformed answer, and after the last attempt."""
        body = self.payload(r)
        url = f"{self.base_url}/chat/completions"

        def attempt() -> str:
            try:
                resp = client.post(url, json=body, headers=self._headers(), timeout=self.timeout_s)
            except httpx.TransportError as e:  # connection errors and timeouts
                raise _Retryable(f"{type(e).__name__}: {e}") from e
            if resp.status_code == 200:
                try:
                    return resp.json()["choices"][0]["message"]["content"] or ""
                except (ValueError, KeyError, IndexError, TypeError):
                    raise TeacherRequestError(f"{r.query_id}: malformed response {resp.text[:200]!r}") from None
            problem = f"HTTP {resp.status_code}: {resp.text[:200]}"
            if resp.status_code == 429 or resp.status_code >= 500:
                raise _Retryable(problem, retry_after_s(resp.headers.get("retry-after")))
            raise TeacherRequestError(f"{r.query_id}: {problem}")

        def say(state: tenacity.RetryCallState) -> None:
            log.warning("teacher request %s failed (%s); retry %d in %.1fs", r.query_id, state.outcome.exception(),
                        state.attempt_number, state.next_action.sleep)

        retrying = tenacity.Retrying(stop=tenacity.stop_after_attempt(self.max_retries + 1),
                                     retry=tenacity.retry_if_exception_type(_Retryable), wait=self._wait,
                                     sleep=self.sleep, before_sleep=say)
        try:
            return retrying(attempt)
        except tenacity.RetryError as e:
            last = e.last_attempt
            raise TeacherRequestError(f"{r.query_id}: gave up after {last.attempt_number} attempts; "
                                      f"last: {last.exception()}") from None

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[Annotation | None]:
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
