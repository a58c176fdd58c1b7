"""Training of the CIR-CoT model: one loop, three stages, on ``accelerate``.

    L = λ_txt · CE(answer tokens) + λ_info · InfoNCE(query <emb>, gallery <emb>)

- ``bootstrap`` (the tiny base model only, all parameters): image-text alignment (a scene
  description's ``<emb>`` against its image's gallery ``<emb>``) plus captioning on part of the batch.
- ``align`` (stage 1, LoRA): the no-CoT query (reference + modification → ``<emb>``) against the target.
- ``cot`` (stage 2, LoRA): the query with its teacher-forced chain of thought; CE on the CoT tokens
  (and the closing ``<emb>``) plus InfoNCE.

InfoNCE is symmetric with in-batch negatives, gathered across processes with gradients (so
``accelerate launch`` on several GPUs sees the global batch), plus each query's hard negatives and
the references as extra gallery candidates. Batches are drawn from a generator seeded by (seed,
step), so a run is deterministic and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from model_code.model.cir_cot import CirCoTModel

log = logging.getLogger(__name__)


STAGES = ("bootstrap", "align", "cot")


@dataclasses.dataclass
class TrainConfig:
    """Hyperparameters of one stage. (A dataclass, not pydantic: the GPU image has no pydantic.)"""

    stage: Literal["bootstrap", "align", "cot"]
    steps: int
    batch_size: int = 32                 # queries per process and micro-batch
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_clip: float = 1.0
    temperature: float = 0.05
    lambda_txt: float = 1.0
    lambda_info: float = 1.0
    hard_negatives: int = 1              # per query, from the benchmark's hard negatives
    reference_negatives: bool = True     # the references as extra gallery candidates
    caption_fraction: float = 0.25       # bootstrap: share of the batch also trained to caption
    identity_queries: bool = True        # bootstrap: also align each image's no-change query with its gallery <emb>
    seed: int = 0
    mixed_precision: Literal["no", "bf16"] = "no"
    gradient_checkpointing: bool = False
    compile_layers: bool = False         # torch.compile each decoder layer (GPU: faster, less memory)
    checkpoint_every: int = 50
    log_every: int = 10

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, not {self.stage!r}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be at least 1")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be 'no' or 'bf16', not {self.mixed_precision!r}")


@dataclasses.dataclass(frozen=True)
class TrainExample:
    """One training pair. ``reference`` None means a text-only query (bootstrap)."""

    query_id: str
    reference: Path | None
    text: str
    target: Path
    cot: str | None = None
    negatives: tuple[Path, ...] = ()


@dataclasses.dataclass
class TrainResult:
    history: list[dict]
    steps: int
    seconds: float
    resumed_from: int
    plot: Path | None = None


# ---------------------------------------------------------------------------------------------
# the loss


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Concatenate ``x`` from every process along dim 0, keeping gradients to the local part.
    Processes may hold different numbers of rows (their extra negatives differ): rows are padded
    for the collective and the padding dropped. Returns the rows and each process's count."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, [x.shape[0]]
    from torch.distributed.nn.functional import all_gather

    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device))
    counts = [int(c) for c in counts]
    padded = F.pad(x, (0, 0, 0, max(counts) - x.shape[0]))
    parts = all_gather(padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)], dim=0), counts


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def info_nce(queries: torch.Tensor, candidates: torch.Tensor, n_pairs: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE. ``queries`` [B, H]; ``candidates`` [B + E, H] whose first B rows are the
    queries' targets, the rest extra negatives. Both sides are gathered across processes. Returns
    (loss, in-batch top-1 accuracy of query → candidates)."""
    B = n_pairs
    all_q, q_counts = gather_with_grad(queries)             # [sum of B over processes, H]
    all_c, c_counts = gather_with_grad(candidates)          # [sum of (B + E) over processes, H]
    rank = _rank()
    local = torch.arange(B, device=queries.device)
    labels = sum(c_counts[:rank]) + local                   # this process's targets in the global candidates
    logits = queries @ all_c.T / temperature
    q2t = F.cross_entropy(logits, labels)
    # target → query: each local target against every query of the global batch
    t2q = F.cross_entropy(candidates[:B] @ all_q.T / temperature, sum(q_counts[:rank]) + local)
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return (q2t + t2q) / 2, accuracy


IDENTITY_REQUEST = "keep the image exactly as it is"


class TrainStep(torch.nn.Module):
    """Computes the losses of one micro-batch (the module ``accelerate`` wraps)."""

    def __init__(self, model: CirCoTModel, cfg: TrainConfig):
        super().__init__()
        self.cirmodel, self.cfg = model, cfg

    def forward(self, batch: Sequence[TrainExample], negatives: Sequence[Path]) -> dict[str, torch.Tensor]:
        m, cfg = self.cirmodel, self.cfg
        if cfg.stage == "bootstrap":
            q_inputs = m.text_inputs([ex.text for ex in batch])
        else:
            cots = [ex.cot for ex in batch] if cfg.stage == "cot" else None
            q_inputs = m.query_inputs([ex.reference for ex in batch], [ex.text for ex in batch], cots,
                                      train_answer=cfg.stage == "cot")
        q_hidden = m.hidden_states(q_inputs)
        queries = m.emb(q_inputs, q_hidden)
        g_inputs = m.gallery_inputs([ex.target for ex in batch] + list(negatives))
        gallery = m.emb(g_inputs, m.hidden_states(g_inputs))
        l_info, acc = info_nce(queries, gallery, len(batch), cfg.temperature)
        out = {"info": l_info, "acc": acc}
        if cfg.stage == "bootstrap" and cfg.identity_queries:
            # the query prompt (image + request) and the gallery prompt share one space from the start
            i_inputs = m.query_inputs([ex.target for ex in batch], [IDENTITY_REQUEST] * len(batch))
            l_img, out["acc_image"] = info_nce(m.emb(i_inputs, m.hidden_states(i_inputs)), gallery, len(batch),
                                               cfg.temperature)
            out["info"] = l_info = (l_info + l_img) / 2
        loss = cfg.lambda_info * l_info
        if cfg.stage == "cot":
            out["txt"] = m.answer_loss(q_inputs, q_hidden)
            loss = loss + cfg.lambda_txt * out["txt"]
        elif cfg.stage == "bootstrap" and cfg.caption_fraction > 0:
            k = max(1, int(len(batch) * cfg.caption_fraction))
            c_inputs = m.encode([m.prompt("describe")] * k, [ex.text for ex in batch[:k]],
                                [ex.target for ex in batch[:k]], train_answer=True)
            out["txt"] = m.answer_loss(c_inputs, m.hidden_states(c_inputs))
            loss = loss + cfg.lambda_txt * out["txt"]
        out["loss"] = loss
        return out


def sample_batch(examples: Sequence[TrainExample], cfg: TrainConfig, step: int, micro: int, rank: int,
                 world: int) -> tuple[list[TrainExample], list[Path]]:
    """The examples and extra gallery negatives of one micro-batch: a pure function of the seed,
    the step and the process, so that a resumed run draws exactly what the original would have."""
    rng = np.random.default_rng([cfg.seed, step, micro])
    n = len(examples)
    size = min(cfg.batch_size * world, n)
    idx = rng.choice(n, size=size, replace=False)[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
    batch = [examples[i] for i in idx]
    negatives: list[Path] = []
    targets = {ex.target for ex in batch}
    for ex in batch:
        pool = [p for p in ex.negatives if p not in targets]
        if pool and cfg.hard_negatives:
            picks = rng.choice(len(pool), size=min(cfg.hard_negatives, len(pool)), replace=False)
            negatives += [pool[i] for i in picks]
    if cfg.reference_negatives and cfg.stage != "bootstrap":
        negatives += [ex.reference for ex in batch if ex.reference is not None and ex.reference not in targets]
    return batch, list(dict.fromkeys(negatives))


# ---------------------------------------------------------------------------------------------
# checkpoints


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(path: Path, model, optimizer, scheduler, step: int, history: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    torch.save({"params": _trainable_state(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "step": step}, tmp / "state.pt")
    (tmp / "history.json").write_text(json.dumps(history))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def _load_checkpoint(path: Path, model, optimizer, scheduler) -> tuple[int, list[dict]]:
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["params"].items():
            params[name].copy_(value.to(params[name].device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"], json.loads((path / "history.json").read_text())


# ---------------------------------------------------------------------------------------------
# the loop


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def train(model: CirCoTModel, examples: Sequence[TrainExample], cfg: TrainConfig, out_dir: str | os.PathLike, *,
          progress: Callable[[str], None] | None = None, stop_after: int | None = None) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` optimizer steps, checkpointing to
    ``out_dir/checkpoint`` every ``cfg.checkpoint_every`` steps and resuming from it when present.
    ``stop_after`` ends the run early after that step (as an interruption would)."""
    from transformers import get_cosine_schedule_with_warmup

    say = progress or log.info
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not examples:
        raise ValueError(f"stage {cfg.stage}: no training examples")
    accelerator = _accelerator(cfg)
    if cfg.gradient_checkpointing:
        model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model.model, "enable_input_require_grads"):
            model.model.enable_input_require_grads()
    if cfg.compile_layers:
        from model_code.model.cir_cot import compile_decoder_layers

        compile_decoder_layers(model.model)
    model.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    step_module = TrainStep(model, cfg)
    ckpt = out_dir / "checkpoint"
    start, history = 0, []
    if (ckpt / "state.pt").is_file():
        start, history = _load_checkpoint(ckpt, step_module, optimizer, scheduler)
        say(f"{cfg.stage}: resuming from the checkpoint at step {start}")
    wrapped, optimizer, scheduler = accelerator.prepare(step_module, optimizer, scheduler)
    rank, world = accelerator.process_index, accelerator.num_processes

    t0 = time.monotonic()
    last_log = t0
    step = start
    for step in range(start, cfg.steps):
        totals: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch, negatives = sample_batch(examples, cfg, step, micro, rank, world)
            sync = micro == cfg.grad_accum - 1
            ctx = accelerator.no_sync(wrapped) if not sync and world > 1 else contextlib.nullcontext()
            with ctx, accelerator.autocast():
                out = wrapped(batch, negatives)
                accelerator.backward(out["loss"] / cfg.grad_accum)
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
        if cfg.grad_clip:
            accelerator.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "lr": scheduler.get_last_lr()[0], **{k: round(v, 6) for k, v in totals.items()}})
        done = step + 1
        now = time.monotonic()
        if done % cfg.log_every == 0 or done == cfg.steps or now - last_log > 30:
            last_log = now
            rate = (done - start) / (now - t0)
            say(f"{cfg.stage} step {done}/{cfg.steps}: loss {totals['loss']:.4f} (info {totals['info']:.4f}"
                + (f", txt {totals['txt']:.4f}" if "txt" in totals else "")
                + f"), in-batch acc {totals['acc']:.3f}, {1 / rate:.2f} s/step, ETA {(cfg.steps - done) / rate:.0f}s")
        if accelerator.is_main_process and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            _save_checkpoint(ckpt, step_module, optimizer, scheduler, done, history)
        if stop_after is not None and done >= stop_after:
            break
    accelerator.wait_for_everyone()
    seconds = time.monotonic() - t0
    plot = (plot_history(history, out_dir / "training.png", title=f"stage {cfg.stage}")
            if history and accelerator.is_main_process else None)
    return TrainResult(history, len(history), seconds, start, plot)


@torch.no_grad()
def evaluate_in_batch(model: CirCoTModel, examples: Sequence[TrainExample], cfg: TrainConfig,
                      batches: int = 4) -> dict[str, float]:
    """Mean in-batch retrieval accuracy and losses of ``cfg``'s stage on ``examples`` (e.g. the
    validation split), without training; ``batches`` batches drawn as in training."""
    model.model.eval()
    step_module = TrainStep(model, cfg)
    sums: dict[str, float] = {}
    for b in range(batches):
        batch, negatives = sample_batch(examples, cfg, 10**6 + b, 0, 0, 1)
        out = step_module(batch, negatives)
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v) / batches
    model.model.train()
    return sums


def plot_history(history: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Loss curves and in-batch accuracy against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in ("loss", "info", "txt"):
        if any(key in h and h[key] == h[key] for h in history):  # present and not NaN somewhere
            ax1.plot(steps, _smooth([h.get(key, float("nan")) for h in history]), label=key)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(steps, _smooth([h["acc"] for h in history]), color="tab:green")
    ax2.set_xlabel("step")
    ax2.set_ylabel("in-batch top-1 accuracy")
    ax2.set_ylim(0, 1)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _smooth(values: list[float], window: int = 5) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc))
    return out



# ---------------------------------------------------------------------------------------------
# training examples from the pipeline's tables


def pair_examples(triplets, images, root: str | os.PathLike, split: str = "train",
                  annotations=None) -> list[TrainExample]:
    """Training pairs of ``split``: reference, modification, first target, hard negatives and, when
    ``annotations`` (the accepted rows of the annotations table) has one, the rendered chain of thought."""
    from model_code.annotation.cot import CoT

    root = Path(root)
    rows = triplets[triplets["split"] == split]
    path = {(s, i): root / p for s, i, p in zip(images["split"], images["image_id"], images["path"])}
    cots = {}
    if annotations is not None:
        ok = annotations[annotations["status"] == "ok"]
        cots = {q: CoT(c, r, k).render() for q, c, r, k in zip(ok["query_id"], ok["caption"], ok["reasoning"], ok["conclusion"])}
    out = []
    for q, s, ref, text, targets, negs in zip(rows["query_id"], rows["split"], rows["reference_id"], rows["modification"],
                                              rows["target_ids"], rows["hard_negative_ids"]):
        if not len(targets):
            continue
        out.append(TrainExample(q, path[(s, ref)], text, path[(s, targets[0])], cots.get(q),
                                tuple(path[(s, n)] for n in negs if (s, n) in path)))
    return out


def description_examples(root: str | os.PathLike, split: str = "train", limit: int | None = None) -> list[TrainExample]:
    """Bootstrap pairs for cir-shapes: each image of ``split`` with a description of its scene graph."""
    from model_code.synthetic import generate as syn
    from model_code.synthetic.oracle import describe

    import random

    root = Path(root)
    graphs = json.loads((root / "scene_graphs" / f"{split}.json").read_text())
    paths = json.loads((root / "image_splits" / f"split.{split}.json").read_text())
    out = []
    for image_id, graph in graphs.items():
        rng = random.Random(f"describe/{image_id}")
        text = describe(syn.scene_from_json(graph), rng, result=False)
        out.append(TrainExample(image_id, None, text, root / paths[image_id]))
        if limit is not None and len(out) >= limit:
            break
    return out


# ---------------------------------------------------------------------------------------------
# profiles: the hyperparameters of a whole training run


@dataclasses.dataclass
class BaseSpec:
    """Where the base model comes from: ``tiny`` (built and bootstrapped here) or a local checkpoint."""

    kind: Literal["tiny", "checkpoint"] = "tiny"
    checkpoint_path: str | None = None
    dtype: str = "auto"
    device: str | None = None
    attn_implementation: str | None = None
    vocab_size: int = 1024                # tiny: the tokenizer trained on the corpus
    bootstrap: TrainConfig | None = None  # tiny: the full-parameter pretraining pass


@dataclasses.dataclass
class TrainingProfile:
    base: BaseSpec
    align: TrainConfig
    cot: TrainConfig
    lora_r: int = 16
    lora_alpha: int = 32
    eval_batches: int = 4

    def copy(self) -> TrainingProfile:
        import copy

        return copy.deepcopy(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PROFILES = {
    # CPU, the tiny base: bootstrap plus both stages in about 13 minutes on 2 cores. The bootstrap gets
    # most of it: its description -> image alignment stays at chance for ~60 steps, then climbs
    # (validation in-batch accuracy 0.12 after 110 steps, 0.73 after 330); without the identity
    # queries a step is 23 % cheaper, and 240 steps reach 0.32 (README, "Why the tiny model falls short")
    "embedded": TrainingProfile(
        base=BaseSpec(kind="tiny", vocab_size=1024, bootstrap=TrainConfig(
            stage="bootstrap", steps=240, batch_size=64, lr=1e-3, warmup_steps=10, caption_fraction=0.25,
            identity_queries=False,
            checkpoint_every=25, log_every=10)),
        lora_r=16, lora_alpha=32,
        align=TrainConfig(stage="align", steps=70, batch_size=48, lr=2e-3, warmup_steps=5, hard_negatives=1,
                          checkpoint_every=25, log_every=10),
        cot=TrainConfig(stage="cot", steps=100, batch_size=24, lr=2e-3, warmup_steps=5, hard_negatives=1,
                        checkpoint_every=20, log_every=10),
        eval_batches=3,
    ),
    # one GPU, a Qwen2-VL-2B-class checkpoint in bf16
    "gpu": TrainingProfile(
        base=BaseSpec(kind="checkpoint", dtype="bfloat16", attn_implementation="sdpa"),
        lora_r=16, lora_alpha=32,
        align=TrainConfig(stage="align", steps=2000, batch_size=64, lr=2e-4, warmup_steps=100,
                          mixed_precision="bf16", compile_layers=True, checkpoint_every=200, log_every=20),
        cot=TrainConfig(stage="cot", steps=3000, batch_size=16, grad_accum=2, lr=2e-4, warmup_steps=100,
                        mixed_precision="bf16", compile_layers=True, checkpoint_every=200, log_every=20),
        eval_batches=8,
    ),
}


# ---------------------------------------------------------------------------------------------
# whole runs: the tiny base model, and the two LoRA stages


def _file_md5(*paths: Path) -> str:
    import hashlib

    h = hashlib.md5()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def tiny_corpus(triplets, annotations, descriptions: Sequence[TrainExample]) -> list[str]:
    """The text a tiny tokenizer is trained on: modifications, chains of thought, scene
    descriptions and the prompts."""
    from model_code.annotation.cot import CoT
    from model_code.model.cir_cot import PROMPTS

    ok = annotations[annotations["status"] == "ok"] if annotations is not None else None
    cots = [] if ok is None else [CoT(c, r, k).render() for c, r, k in zip(ok["caption"], ok["reasoning"], ok["conclusion"])]
    return list(triplets["modification"]) + cots + [d.text for d in descriptions] + list(PROMPTS.values()) * 50


def bootstrap_tiny(root: str | os.PathLike, triplets, annotations, spec: BaseSpec, out_dir: str | os.PathLike, *,
                   progress: Callable[[str], None] | None = None, eval_batches: int = 3) -> dict:
    """Build the tiny base model (tokenizer trained on the corpus, random Qwen2-VL) and pretrain all
    of it on cir-shapes images and their scene descriptions. Resumes an interrupted run; returns
    the summary of a finished one without training again."""
    from model_code.model.backbone import build_random_backbone, save_backbone
    from model_code.model.cir_cot import add_cir_tokens, parameter_counts

    out_dir = Path(out_dir)
    if (out_dir / "base.json").is_file():
        return json.loads((out_dir / "base.json").read_text())
    cfg = spec.bootstrap
    train_ex, val_ex = description_examples(root, "train"), description_examples(root, "val")
    torch.manual_seed(cfg.seed)
    model, processor = build_random_backbone("tiny", tiny_corpus(triplets, annotations, train_ex),
                                             vocab_size=spec.vocab_size, seed=cfg.seed)
    add_cir_tokens(model, processor)
    m = CirCoTModel(model, processor)
    result = train(m, train_ex, cfg, out_dir / "bootstrap", progress=progress)
    val = evaluate_in_batch(m, val_ex, cfg, eval_batches)
    model_dir = save_backbone(model, processor, out_dir / "model")
    summary = {"path": str(model_dir), "kind": "tiny", "version": _file_md5(*sorted(model_dir.glob("*.safetensors"))),
               "parameters": parameter_counts(model), "steps": result.steps, "seconds": round(result.seconds, 1),
               "first": result.history[0], "last": result.history[-1], "val": val,
               "plot": str(result.plot) if result.plot else None}
    (out_dir / "base.json").write_text(json.dumps(summary, indent=1))
    return summary


def register_checkpoint(path: str | os.PathLike) -> dict:
    """A local checkpoint folder as the base model: checked, versioned by its config and weights index."""
    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no model checkpoint at {path} (config.json missing)")
    index = sorted(path.glob("*.safetensors.index.json")) or sorted(path.glob("*.safetensors"))[:1]
    return {"path": str(path.resolve()), "kind": "checkpoint", "version": _file_md5(config, *index)}


def train_cir_cot(base: dict, train_pairs: Sequence[TrainExample], val_pairs: Sequence[TrainExample],
                  profile: TrainingProfile, out_dir: str | os.PathLike, *,
                  progress: Callable[[str], None] | None = None) -> dict:
    """LoRA on the base model: stage 1 (``align``, no CoT), then stage 2 (``cot``, the joint loss on
    the pairs that have an accepted chain of thought). Saves the model to ``out_dir/model``.
    Each stage resumes from its checkpoint."""
    from model_code.model.backbone import load_backbone
    from model_code.model.cir_cot import apply_lora, parameter_counts

    out_dir = Path(out_dir)
    spec = profile.base
    torch.manual_seed(profile.align.seed)
    model, processor = load_backbone(base["path"], dtype=spec.dtype, device=spec.device,
                                     attn_implementation=spec.attn_implementation)
    model.train()
    model = apply_lora(model, processor, r=profile.lora_r, alpha=profile.lora_alpha)
    m = CirCoTModel(model, processor, base_path=base["path"])
    stages = {}
    for cfg in (profile.align, profile.cot):
        pairs = [p for p in train_pairs if p.cot] if cfg.stage == "cot" else list(train_pairs)
        val = [p for p in val_pairs if p.cot] if cfg.stage == "cot" else list(val_pairs)
        if not pairs:
            raise ValueError(f"stage {cfg.stage}: no training pair has an accepted chain of thought")
        result = train(m, pairs, cfg, out_dir / cfg.stage, progress=progress)
        stages[cfg.stage] = {"steps": result.steps, "seconds": round(result.seconds, 1), "examples": len(pairs),
                             "first": result.history[0], "last": result.history[-1],
                             "val": evaluate_in_batch(m, val, cfg, profile.eval_batches) if val else None,
                             "history": result.history}
    summary = {"path": str(out_dir / "model"), "base": base["path"], "base_version": base["version"],
               "parameters": parameter_counts(model),
               "stages": {k: {kk: vv for kk, vv in v.items() if kk != "history"} for k, v in stages.items()}}
    if _rank() == 0:  # under `accelerate launch` one process writes the results
        summary["version"] = m.save(out_dir / "model")
        summary["plot"] = str(plot_stages({k: v["history"] for k, v in stages.items()}, out_dir / "training.png"))
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    _barrier()
    return summary


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def plot_stages(histories: dict[str, list[dict]], path: str | os.PathLike) -> Path:
    """Both LoRA stages on one time axis."""
    offset, merged = 0, []
    for stage, history in histories.items():
        merged += [{**h, "step": h["step"] + offset} for h in history]
        offset += len(history)
    keys = set.intersection(*(set(h) for h in merged)) | {"txt"}
    merged = [{k: h.get(k, float("nan")) for k in keys} for h in merged]
    return plot_history(merged, path, title=" then ".join(histories))

# a few steps of everything: checks the wiring end to end in seconds (tests, a new machine)
PROFILES["smoke"] = TrainingProfile(
    base=BaseSpec(kind="tiny", vocab_size=512, bootstrap=TrainConfig(stage="bootstrap", steps=3, batch_size=8,
                                                                     warmup_steps=1, checkpoint_every=2)),
    lora_r=4, lora_alpha=8,
    align=TrainConfig(stage="align", steps=3, batch_size=8, warmup_steps=1, checkpoint_every=2),
    cot=TrainConfig(stage="cot", steps=3, batch_size=4, warmup_steps=1, checkpoint_every=2),
    eval_batches=1,
)


def main(argv: list[str] | None = None) -> int:
    """Train the CIR-CoT model outside Dagster, e.g. across GPUs:

        accelerate launch --num_processes 8 -m model_code.model.train --tables artifacts/triplets/synthetic \\
            --annotations artifacts/cot_annotations/synthetic/annotations.parquet \\
            --base /models/Qwen2-VL-2B-Instruct --profile gpu --out artifacts/cir_cot_model/runs/manual

    Every process runs this; in-batch negatives are gathered across them; process 0 writes the model.
    """
    import argparse
    import logging as _logging

    from model_code.annotation.store import read_annotations
    from model_code.data.readers import read_tables

    p = argparse.ArgumentParser(prog="python -m model_code.model.train", description=main.__doc__.split("\n\n")[0])
    p.add_argument("--tables", required=True, help="a triplets folder written by the pipeline (triplets/images parquet, meta.json)")
    p.add_argument("--annotations", required=True, help="an annotations.parquet written by the pipeline")
    p.add_argument("--base", required=True, help="the base model folder (a checkpoint, or the bootstrapped tiny model)")
    p.add_argument("--profile", default="gpu", choices=sorted(PROFILES))
    p.add_argument("--out", required=True)
    p.add_argument("--align-steps", type=int)
    p.add_argument("--cot-steps", type=int)
    args = p.parse_args(argv)
    _logging.basicConfig(level=_logging.INFO, format="%(asctime)s %(message)s")

    profile = PROFILES[args.profile].copy()
    profile.align.steps = args.align_steps or profile.align.steps
    profile.cot.steps = args.cot_steps or profile.cot.steps
    tables = Path(args.tables)
    root = json.loads((tables / "meta.json").read_text())["root"]
    bench, ann = read_tables(tables), read_annotations(args.annotations)
    base = {"path": str(Path(args.base).resolve()), "version": _file_md5(Path(args.base) / "config.json")}
    summary = train_cir_cot(base, pair_examples(bench.triplets, bench.images, root, "train", ann),
                            pair_examples(bench.triplets, bench.images, root, "val", ann), profile, args.out)
    if _rank() == 0:
        print(json.dumps({k: summary[k] for k in ("path", "version")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
