"""Decoding, kept apart from the model (as transformers keeps generation apart from modelling): the
constraint that makes every generated chain of thought parse, and the two greedy loops written once.

- :func:`reason_and_embed`: a query's chain of thought, constrained to the three sections in order and
  ending in ``<emb>``, whose hidden state (fed on the KV cache) is the query embedding;
- :func:`generate_until`: plain greedy continuations up to a stop token, as text (the pretraining's
  perception scores, the diagnostics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@torch.inference_mode()
def reason_and_embed(m, images: Sequence, texts: Sequence[str], *, max_new_tokens: int = 256, batch_size: int = 16,
                     static_cache: bool | None = None) -> tuple[torch.Tensor, list[list[int]]]:
    """Write each query's chain of thought greedily and embed it, in one decoding pass (``m`` a
    :class:`~model_code.model.cir_cot.CirCoTModel`).

    Decoding is constrained to the three sections in order, ending in ``<emb>`` within
    ``max_new_tokens`` (:class:`CoTFormat`: every chain parses), then runs one more step so that
    ``<emb>`` is fed to the model on the KV cache: its last-layer hidden state there is the
    query embedding. Nothing is decoded to text and tokenised again, and there is no second
    forward pass over the sequence. Returns the L2-normalised float32 embeddings [n, hidden] and
    each chain's generated token ids up to (without) ``<emb>``. ``static_cache`` (default: on a
    GPU) decodes with a static KV cache."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    images, texts = list(images), list(texts)
    if static_cache is None:
        static_cache = m.device.type == "cuda"
    tok = m.tokenizer
    embeddings, chains = [], []
    with _eval_mode(m.model):
        for i in range(0, len(texts), batch_size):
            prompts = [m.prompt("query", t) for t in texts[i: i + batch_size]]
            inputs = m.encode(prompts, [""] * len(prompts), images[i: i + batch_size])
            inputs = {k: v.to(m.device) for k, v in inputs.items()}
            start = inputs["input_ids"].shape[1]
            extra = {"cache_implementation": "static"} if static_cache else {}
            out = m.model.generate(
                **inputs, max_new_tokens=max_new_tokens + 1, do_sample=False, pad_token_id=tok.pad_token_id,
                eos_token_id=None, output_hidden_states=True, return_dict_in_generate=True,
                logits_processor=LogitsProcessorList([cot_format(m, start, max_new_tokens)]),
                stopping_criteria=StoppingCriteriaList([EmbFed(m.emb_id, start)]), **extra)
            generated = out.sequences[:, start:]                                # [b, steps]
            for row, ids in enumerate(generated.tolist()):
                j = ids.index(m.emb_id)                                         # <emb> was generated at step j...
                h = out.hidden_states[j + 1][-1][row, -1]                       # ...and fed at step j + 1: [hidden]
                embeddings.append(F.normalize(h.float(), dim=-1).cpu())
                chains.append(ids[:j])
    if not embeddings:
        return torch.empty(0, m.hidden_size), []
    return torch.stack(embeddings), chains


@torch.inference_mode()
def generate_until(m, prompts: Sequence[str], images, stop: str, max_new_tokens: int,
                   batch_size: int | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (with ``images``, or None for text prompts) up to the token
    ``stop``, as text (in batches of 50 on a CPU, 200 on a GPU, where a decoding step costs about the
    same at either size)."""
    batch_size = batch_size or (200 if m.device.type == "cuda" else 50)
    tok = m.tokenizer
    stop_id = tok.convert_tokens_to_ids(stop)
    out = []
    with _eval_mode(m.model):
        for i in range(0, len(prompts), batch_size):
            inputs = m.encode(prompts[i:i + batch_size], [""] * len(prompts[i:i + batch_size]),
                              images[i:i + batch_size] if images is not None else None)
            inputs = {k: v.to(m.device) for k, v in inputs.items()}
            ids = m.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=[stop_id, tok.convert_tokens_to_ids("<|im_end|>")],
                                   pad_token_id=tok.pad_token_id)
            out += tok.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=False)
    return out


def cot_format(m, prompt_length: int, budget: int) -> CoTFormat:
    """The :class:`CoTFormat` of ``m``'s tokenizer for prompts of ``prompt_length`` tokens."""
    from model_code.model.cir_cot import CIR_TOKENS

    tok = m.tokenizer
    ends = [t for t in {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id} if t is not None]
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    tags = tok.convert_tokens_to_ids(list(CIR_TOKENS[:6]))
    return CoTFormat(tags, m.emb_id, ends, newline[0] if len(newline) == 1 else None, prompt_length, budget)


class CoTFormat:
    """Greedy decoding constrained to the chain-of-thought format, ending in ``<emb>``:

        <caption> text </caption> [newline] <reasoning> text </reasoning> [newline]
        <conclusion> text </conclusion> <emb>

    Each section opens in turn, holds at least one token of text and no other section tag or end
    of turn, and is closed in time for the rest to fit in ``budget`` tokens; within those rules the
    model's own preference decides. So every chain parses, whatever the model (real checkpoints
    too). Below the 10 tokens the shortest chain needs, only the last rule holds: the
    ``budget``-th token is ``<emb>``. (A transformers logits processor.)"""

    SHORTEST = 10  # <caption> x </caption> <reasoning> x </reasoning> <conclusion> x </conclusion> <emb>

    def __init__(self, tag_ids: Sequence[int], emb_id: int, end_ids: Sequence[int], newline_id: int | None,
                 prompt_length: int, budget: int):
        self.tags, self.emb_id, self.newline = list(tag_ids), emb_id, newline_id
        self.not_text = list(tag_ids) + [emb_id] + list(end_ids)  # never inside a section
        self.start, self.budget = prompt_length, budget

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.start:]                                        # [b, n]
        n = generated.shape[1]
        left = self.budget - n                                                       # tokens left, this one included
        marks = torch.tensor(self.tags + [self.emb_id], device=scores.device)
        seen = ((generated[:, :, None] == marks).any(dim=1) if n else
                torch.zeros(len(scores), len(marks), dtype=torch.bool, device=scores.device)).tolist()
        last = generated[:, -1].tolist() if n else [-1] * len(scores)
        scores = scores.clone()
        for row in range(len(scores)):
            rule, tokens = self.rule(seen[row], last[row], left)
            if rule == "only":                      # exactly these tokens
                keep = scores[row, tokens].clone()
                scores[row] = float("-inf")
                scores[row, tokens] = keep
            elif rule == "text":                    # section text, and these tokens besides
                banned = [t for t in self.not_text if t not in tokens]
                scores[row, banned] = float("-inf")
        return scores

    def rule(self, seen: list[bool], last: int, left: int) -> tuple[str, list[int]]:
        """What a row may write now: ("any", []), ("only", tokens) or ("text", extra tokens)."""
        c_open, c_close, r_open, r_close, k_open, k_close, emb = seen
        if emb:
            return "any", []                        # <emb> written: the step that feeds it to the model
        if left <= 1:
            return "only", [self.emb_id]
        if self.budget < self.SHORTEST:
            return "text", []
        if not c_open:
            return "only", [self.tags[0]]
        # each section in turn is open here: the one before it was closed and the next opened (below)
        sections = ((c_close, self.tags[1], r_open, self.tags[2], 8),
                    (r_close, self.tags[3], k_open, self.tags[4], 5),
                    (k_close, self.tags[5], True, None, 2))  # need: tokens to finish from this section's close
        for closed, close_id, next_seen, next_open, need in sections:
            if not closed:
                if last in self.tags:               # just opened: at least one token of text
                    return "text", []
                if left <= need:                    # close now, or the rest no longer fits
                    return "only", [close_id]
                return "text", [close_id]
            if next_open is None:
                return "only", [self.emb_id]        # the conclusion is closed
            if not next_seen:
                # between two sections: the next opens (after one newline, where there is room)
                room = self.newline is not None and last != self.newline and left > need
                return "only", [next_open, self.newline] if room else [next_open]
        return "only", [self.emb_id]


class EmbFed:
    """Stops a row once ``<emb>`` has been fed to the model (it was generated one step earlier), so
    that its hidden state at ``<emb>`` exists. (A transformers stopping criterion, per row.)"""

    def __init__(self, emb_id: int, prompt_length: int):
        self.emb_id, self.start = emb_id, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        fed = input_ids[:, self.start:-1]                                            # tokens the model has seen
        return (fed == self.emb_id).any(dim=1)
