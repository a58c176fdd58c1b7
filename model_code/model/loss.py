"""Every loss of CIR-CoT training, and each stage's objective built from them, in one place
(docs/architecture.md §5):

    L = λ_txt · CE(answer tokens) + λ_info · InfoNCE(query <emb>, target <emb>)

- :func:`answer_ce`: cross-entropy on the supervised answer tokens only (the chain of thought and
  its closing ``<emb>``; captions and text edits in pretraining). The LM head runs on just those
  positions, never on the whole sequence over the whole vocabulary.
- :func:`info_nce`: the symmetric InfoNCE over the query and gallery ``<emb>`` embeddings, with the
  in-batch targets as negatives plus any extra gallery candidates (hard negatives, references).
  Candidates that are the query's own target under another row (two queries of the batch with the
  same target image) are positives, not negatives: they are masked out.
- :func:`joint_loss`: the weighted sum above.
- The objectives (:data:`OBJECTIVES`, one per stage; each takes the model, a micro-batch, its extra
  gallery negatives and the stage's ``TrainConfig`` and returns the losses by name, ``loss`` the one
  optimised): :func:`pretrain_objective` (the embedded base's pretraining), :func:`align_objective`
  (stage 1) and :func:`cot_objective` (stage 2).

The gathers across processes are separate from the losses (as in open_clip): :func:`gather_with_grad`
concatenates every process's rows keeping gradients to the local part, so ``accelerate launch`` on
several GPUs sees the global batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from model_code.chain import parse
from model_code.model.cir_cot import (
    IDENTITY_REQUEST,
    IGNORE,
    CirCoTModel,
    caption_answer,
    edit_answer,
    edit_request,
    unwrap,
)

if TYPE_CHECKING:
    from model_code.model.train import TrainConfig, TrainExample


# ---------------------------------------------------------------------------------------------
# gathering across processes


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def _gather(x: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, list[int]]:
    dist = _dist()
    if dist is None:
        return x, [x.shape[0]]
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device))
    counts = [int(c) for c in counts]
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, max(counts) - x.shape[0]))
    if with_grad:
        from torch.distributed.nn.functional import all_gather

        parts = all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)], dim=0), counts


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Concatenate ``x`` from every process along dim 0, keeping gradients to the local part.
    Processes may hold different numbers of rows (their extra negatives differ): rows are padded
    for the collective and the padding dropped. Returns the rows and each process's count."""
    return _gather(x, with_grad=True)


def image_keys(items: Sequence, device: torch.device | str = "cpu") -> torch.Tensor:
    """One int64 per item (an image path or id), equal for equal items and the same on every
    process: what tells two rows of a batch that they hold the same image."""
    values = [int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "big", signed=True)
              for i in items]
    return torch.tensor(values, dtype=torch.long, device=device)


# ---------------------------------------------------------------------------------------------
# the losses


def info_nce(queries: torch.Tensor, candidates: torch.Tensor, n_pairs: int, temperature: float, *,
             candidate_keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE. ``queries`` [B, H]; ``candidates`` [B + E, H] whose first B rows are the
    queries' targets, the rest extra negatives; ``candidate_keys`` [B + E] (:func:`image_keys`):
    a candidate with the same key as a query's target is not a negative of that query. Both sides
    are gathered across processes. Returns (loss, in-batch top-1 accuracy of query → candidates)."""
    B = n_pairs
    all_q, q_counts = gather_with_grad(queries)             # [sum of B over processes, H]
    all_c, c_counts = gather_with_grad(candidates)          # [sum of (B + E) over processes, H]
    r = rank()
    local = torch.arange(B, device=queries.device)
    labels = sum(c_counts[:r]) + local                      # this process's targets among the global candidates
    q_labels = sum(q_counts[:r]) + local                    # this process's queries among the global queries
    logits = queries @ all_c.T / temperature                # [B, C]
    t_logits = candidates[:B] @ all_q.T / temperature       # [B, Q]: each local target against every query
    if candidate_keys is not None:
        all_keys, _ = _gather(candidate_keys.to(queries.device)[:, None], with_grad=False)
        all_keys = all_keys[:, 0]                           # [C]
        target_keys = candidate_keys.to(queries.device)[:B]
        query_keys = torch.cat([all_keys[sum(c_counts[:p]):sum(c_counts[:p]) + q_counts[p]]
                                for p in range(len(c_counts))])  # [Q]: each query's target key
        same = (target_keys[:, None] == all_keys[None, :])
        same[local, labels] = False
        logits = logits.masked_fill(same, float("-inf"))
        same_q = (target_keys[:, None] == query_keys[None, :])
        same_q[local, q_labels] = False
        t_logits = t_logits.masked_fill(same_q, float("-inf"))
    q2t = F.cross_entropy(logits, labels)
    t2q = F.cross_entropy(t_logits, q_labels)
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return (q2t + t2q) / 2, accuracy


def answer_ce(hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
    """Cross-entropy of next-token prediction on the positions whose label is not IGNORE.
    ``hidden`` [batch, seq, H] last-layer states; ``labels`` [batch, seq]."""
    labels = labels.to(hidden.device)
    target = labels[:, 1:]
    keep = target != IGNORE                       # [batch, seq-1]
    h = hidden[:, :-1][keep]                      # [n_supervised, H]: position t predicts token t+1
    logits = lm_head(h)                           # [n_supervised, vocab]
    return F.cross_entropy(logits.float(), target[keep])


def joint_loss(info: torch.Tensor, txt: torch.Tensor | None, *, lambda_info: float, lambda_txt: float) -> torch.Tensor:
    """L = λ_txt · CE + λ_info · InfoNCE (CE absent in the stages without text supervision)."""
    loss = lambda_info * info
    if txt is not None:
        loss = loss + lambda_txt * txt
    return loss


# ---------------------------------------------------------------------------------------------
# the objectives: what each stage computes on one micro-batch


def gallery_embeddings(m: CirCoTModel, batch: Sequence[TrainExample], negatives: Sequence) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """The gallery ``<emb>`` of the batch's targets, then of the extra negatives [B + E, H], and their
    :func:`image_keys` (what tells :func:`info_nce` two rows holding one image)."""
    candidates = [ex.target for ex in batch] + list(negatives)
    g_inputs = m.gallery_inputs(candidates)
    gallery = m.emb(g_inputs, m.hidden_states(g_inputs))
    return gallery, image_keys(candidates, gallery.device)


def align_objective(m: CirCoTModel, batch: Sequence[TrainExample], negatives: Sequence,
                    cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Stage 1: the no-CoT query (reference + modification -> ``<emb>``) against its target; InfoNCE only."""
    q_inputs = m.query_inputs([ex.reference for ex in batch], [ex.text for ex in batch])
    queries = m.emb(q_inputs, m.hidden_states(q_inputs))                         # [B, H]
    gallery, keys = gallery_embeddings(m, batch, negatives)                     # [B + E, H]
    info, acc = info_nce(queries, gallery, len(batch), cfg.temperature, candidate_keys=keys)
    return {"info": info, "acc": acc,
            "loss": joint_loss(info, None, lambda_info=cfg.lambda_info, lambda_txt=cfg.lambda_txt)}


def cot_objective(m: CirCoTModel, batch: Sequence[TrainExample], negatives: Sequence,
                  cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Stage 2: the query with its teacher-forced chain of thought: CE on the chain's tokens (and the
    closing ``<emb>``) plus InfoNCE of its ``<emb>``; with ``cfg.rehearse_fraction``, part of the batch
    also rehearses the chain's two halves in the pretraining prompts (:func:`rehearsal_ce`)."""
    q_inputs = m.query_inputs([ex.reference for ex in batch], [ex.text for ex in batch], [ex.cot for ex in batch],
                              train_answer=True)
    q_hidden = m.hidden_states(q_inputs)
    queries = m.emb(q_inputs, q_hidden)
    gallery, keys = gallery_embeddings(m, batch, negatives)
    info, acc = info_nce(queries, gallery, len(batch), cfg.temperature, candidate_keys=keys)
    lm_head = unwrap(m.model).lm_head
    out = {"info": info, "acc": acc, "txt": answer_ce(q_hidden, q_inputs["labels"], lm_head)}
    if cfg.rehearse_fraction > 0:
        out["rehearse"] = rehearsal_ce(m, batch[:max(1, int(len(batch) * cfg.rehearse_fraction))], lm_head)
        out["txt"] = out["txt"] + out["rehearse"]
    out["loss"] = joint_loss(info, out["txt"], lambda_info=cfg.lambda_info, lambda_txt=cfg.lambda_txt)
    return out


def rehearsal_ce(m: CirCoTModel, batch: Sequence[TrainExample], lm_head) -> torch.Tensor:
    """Cross-entropy of the chains' two halves asked the way pretraining asked them: the
    reference's caption (describe prompt, with the image) and, from that caption and the
    modification, the reasoning and conclusion (edit prompt, text only); their mean."""

    cots = [parse(ex.cot) for ex in batch]
    c_inputs = m.encode([m.prompt("describe")] * len(batch), [caption_answer(c.caption) for c in cots],
                        [ex.reference for ex in batch], train_answer=True)
    e_inputs = m.encode([m.prompt("edit", edit_request(c.caption, ex.text), image=False)
                         for c, ex in zip(cots, batch)],
                        [edit_answer(c.reasoning, c.conclusion) for c in cots], None, train_answer=True)
    return (answer_ce(m.hidden_states(c_inputs), c_inputs["labels"], lm_head)
            + answer_ce(m.hidden_states(e_inputs), e_inputs["labels"], lm_head)) / 2


def pretrain_objective(m: CirCoTModel, batch: Sequence[TrainExample], negatives: Sequence,
                       cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The embedded base's pretraining (``model_code/model/pretrain.py``), on text-only examples: a
    scene description's ``<emb>`` against its image (of the batch's first ``cfg.align_size`` rows, or
    all), the image's no-change query against the same (``cfg.identity_queries``), captioning of the
    first ``cfg.caption_fraction`` of them (``<caption>`` tags, as the chain writes it) and the text
    edits of the first ``cfg.edit_fraction`` of the whole batch (``<conclusion>`` the edited description),
    and the resolutions of the first ``cfg.resolve_fraction`` (short sequences: a description and a
    phrase -> the clause naming the object(s) it means)."""
    aligned = batch[:cfg.align_size] if cfg.align_size else batch
    q_inputs = m.text_inputs([ex.text for ex in aligned])
    queries = m.emb(q_inputs, m.hidden_states(q_inputs))
    gallery, keys = gallery_embeddings(m, aligned, negatives)
    info, acc = info_nce(queries, gallery, len(aligned), cfg.temperature, candidate_keys=keys)
    out = {"info": info, "acc": acc}
    if cfg.identity_queries:
        # the query prompt (image + request) and the gallery prompt share one space from the start
        i_inputs = m.query_inputs([ex.target for ex in aligned], [IDENTITY_REQUEST] * len(aligned))
        l_img, out["acc_image"] = info_nce(m.emb(i_inputs, m.hidden_states(i_inputs)), gallery, len(aligned),
                                           cfg.temperature, candidate_keys=keys)
        out["info"] = info = (info + l_img) / 2
    lm_head = unwrap(m.model).lm_head
    if cfg.caption_fraction > 0:
        k = max(1, int(len(aligned) * cfg.caption_fraction))
        c_inputs = m.encode([m.prompt("describe")] * k, [caption_answer(ex.text) for ex in aligned[:k]],
                            [ex.target for ex in aligned[:k]], train_answer=True)
        out["txt"] = out["cap"] = answer_ce(m.hidden_states(c_inputs), c_inputs["labels"], lm_head)
    edits = [ex.edit for ex in batch if ex.edit][:int(len(batch) * cfg.edit_fraction)]
    if edits:
        e_inputs = m.encode([m.prompt("edit", q, image=False) for q, _ in edits], [a for _, a in edits], None,
                            train_answer=True)
        out["edit"] = answer_ce(m.hidden_states(e_inputs), e_inputs["labels"], lm_head)
        out["txt"] = out.get("txt", 0) + out["edit"]
    resolves = [r for ex in batch[:int(len(batch) * cfg.resolve_fraction)] for r in ex.resolve]
    if resolves:
        r_inputs = m.encode([m.prompt("resolve", q, image=False) for q, _ in resolves], [a for _, a in resolves],
                            None, train_answer=True)
        out["resolve"] = answer_ce(m.hidden_states(r_inputs), r_inputs["labels"], lm_head)
        out["txt"] = out.get("txt", 0) + out["resolve"]
    out["loss"] = joint_loss(info, out.get("txt"), lambda_info=cfg.lambda_info, lambda_txt=cfg.lambda_txt)
    return out


OBJECTIVES = {"pretrain": pretrain_objective, "align": align_objective, "cot": cot_objective}
