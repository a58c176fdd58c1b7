"""Every loss of CIR-CoT training, in one place (docs/architecture.md §5):

    L = λ_txt · CE(chain-of-thought tokens) + λ_info · InfoNCE(query <emb>, target <emb>)

- :func:`answer_ce`: cross-entropy on the supervised answer tokens only (the chain of thought and
  its closing ``<emb>``; captions in the tiny base's pretraining). The LM head runs on just those
  positions, never on the whole sequence over the whole vocabulary.
- :func:`info_nce`: the symmetric InfoNCE over the query and gallery ``<emb>`` embeddings, with the
  in-batch targets as negatives plus any extra gallery candidates (hard negatives, references).
  Candidates that are the query's own target under another row (two queries of the batch with the
  same target image) are positives, not negatives: they are masked out.
- :func:`joint_loss`: the weighted sum above.

The gathers across processes are separate from the losses (as in open_clip): :func:`gather_with_grad`
concatenates every process's rows keeping gradients to the local part, so ``accelerate launch`` on
several GPUs sees the global batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE = -100  # label of the positions no loss is computed on


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
