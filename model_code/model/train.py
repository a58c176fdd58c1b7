"""Training of the CIR-CoT model: one loop for every stage, on ``accelerate``.

    L = λ_txt · CE(answer tokens) + λ_info · InfoNCE(query <emb>, gallery <emb>)

A stage is a ``TrainConfig`` and its objective (``model_code/model/loss.py``: ``OBJECTIVES``):

- ``pretrain`` (the embedded base, ``model_code/model/pretrain.py``): a scene description's ``<emb>``
  against its image's gallery ``<emb>``, captioning (in ``<caption>`` tags, as the chain writes it)
  and text-level edits (a description and an edit -> ``<conclusion>`` the edited description).
- ``align`` (stage 1): the no-CoT query (reference + modification → ``<emb>``) against the target.
- ``cot`` (stage 2): the query with its teacher-forced chain of thought; CE on the CoT tokens
  (and the closing ``<emb>``) plus InfoNCE.

InfoNCE is symmetric with in-batch negatives, gathered across processes (so ``accelerate launch`` on
several GPUs sees the global batch), plus each query's hard negatives and the references as extra
gallery candidates. Batches are drawn from a generator seeded by (seed, step), so a run is
deterministic and a resumed run continues exactly where it stopped.
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

from model_code.common import replace_dir, writing
from model_code.model.cir_cot import CirCoTModel, compile_decoder_layers, unwrap
from model_code.model.loss import OBJECTIVES

log = logging.getLogger(__name__)


STAGES = tuple(OBJECTIVES)   # pretrain, align, cot

# For tests of an interrupted training (tests/test_pipeline.py): set to a file path, the main process
# creates that file after its first checkpoint of a run and waits there (until the file is removed, at
# most 10 minutes), so a test that kills it once the file exists kills it mid-run, however fast the machine.
HOLD_AFTER_CHECKPOINT_ENV = "CIRCOT_HOLD_AFTER_CHECKPOINT"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one stage (frozen: ``dataclasses.replace`` makes a changed copy). A
    dataclass, not pydantic: the GPU image has no pydantic."""

    stage: Literal["pretrain", "align", "cot"]
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
    caption_fraction: float = 0.25       # pretrain: share of the batch also trained to caption
    edit_fraction: float = 0.0           # pretrain: share of the batch also trained on its text edit
    resolve_fraction: float = 0.0        # pretrain: share of the batch whose resolution examples (a description
                                         # and a phrase -> the object(s) it means) are also trained, all of them
    rehearse_fraction: float = 0.0       # cot: share of the batch also trained on its chain's two halves in the
                                         # base's pretraining prompts (caption the reference; the text edit of
                                         # that caption), so joining them in the chain does not unlearn them
    identity_queries: bool = True        # pretrain: also align each image's no-change query with its gallery <emb>
    align_size: int = 0                  # pretrain: align only the batch's first N images (0: all),
                                         # so a batch of many text edits does not process as many images
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "auto"] = "no"   # auto: bf16 where the hardware computes it natively
    gradient_checkpointing: bool = False
    compile_layers: bool = False         # torch.compile each decoder layer (GPU: faster, less memory)
    checkpoint_every: int = 50
    log_every: int = 10

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, not {self.stage!r}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be at least 1")
        if self.mixed_precision not in ("no", "bf16", "auto"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'auto', not {self.mixed_precision!r}")


@dataclasses.dataclass(frozen=True)
class TrainExample:
    """One training pair. ``reference`` None means a text-only query (pretrain);
    ``edit`` (pretrain) is a text edit of the description: (edit prompt text, answer); ``resolve``
    (pretrain) its reference resolutions: (resolve prompt text, answer) each."""

    query_id: str
    reference: Path | None
    text: str
    target: Path
    cot: str | None = None
    negatives: tuple[Path, ...] = ()
    edit: tuple[str, str] | None = None
    resolve: tuple[tuple[str, str], ...] = ()   # pretrain: resolutions of the description, (prompt text, answer)


@dataclasses.dataclass
class TrainResult:
    history: list[dict]
    steps: int
    seconds: float
    resumed_from: int
    plot: Path | None = None


class TrainStep(torch.nn.Module):
    """The objective of ``cfg.stage`` on one micro-batch (the module ``accelerate`` wraps)."""

    def __init__(self, model: CirCoTModel, cfg: TrainConfig):
        super().__init__()
        self.cirmodel, self.cfg = model, cfg
        self.objective = OBJECTIVES[cfg.stage]

    def forward(self, batch: Sequence[TrainExample], negatives: Sequence[Path]) -> dict[str, torch.Tensor]:
        return self.objective(self.cirmodel, batch, negatives, self.cfg)


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
    if cfg.reference_negatives:
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
    with writing(path, tmp):          # a full disk says so, and leaves no half-written checkpoint behind
        torch.save(
            {
                "params": _trainable_state(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "step": step,
            },
            tmp / "state.pt",
        )
        (tmp / "history.json").write_text(json.dumps(history))
        replace_dir(tmp, path)


def _hold_if_asked(checkpoint: Path) -> None:
    """Wait after a run's first checkpoint when ``HOLD_AFTER_CHECKPOINT_ENV`` names a file (a test's hook)."""
    flag = os.environ.get(HOLD_AFTER_CHECKPOINT_ENV)
    if not flag:
        return
    Path(flag).write_text(str(checkpoint))
    log.warning("holding after the checkpoint %s until %s is removed (%s)", checkpoint, flag, HOLD_AFTER_CHECKPOINT_ENV)
    deadline = time.monotonic() + 600
    while Path(flag).exists() and time.monotonic() < deadline:
        time.sleep(0.1)


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


def native_bf16() -> bool:
    """Whether this machine computes bfloat16 natively: a GPU that supports it, or a CPU with AVX-512
    BF16 or AMX. A CPU without them emulates it: bf16 autocast measured 100 times slower than float32 on
    an AVX2-only CPU (a 512 x 256 by 256 x 768 matmul), where it was 24 % faster on one with AVX-512 BF16."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def precision(mixed_precision: str) -> str:
    """The autocast a run uses: ``auto`` is bf16 where :func:`native_bf16`, else none; bf16 asked for
    on a CPU that emulates it is kept (the run asked) but warned about."""
    if mixed_precision == "auto":
        return "bf16" if native_bf16() else "no"
    if mixed_precision == "bf16" and not native_bf16():
        log.warning("bf16 autocast on a machine without native bf16 (see /proc/cpuinfo): expect steps many times "
                    "slower than float32; mixed_precision 'auto' or 'no' avoids it")
    return mixed_precision


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision(cfg.mixed_precision),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def _prepare_model(model: CirCoTModel, cfg: TrainConfig) -> None:
    """Gradient checkpointing and compiled layers as ``cfg`` asks; training mode."""
    if cfg.gradient_checkpointing:
        model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model.model, "enable_input_require_grads"):
            model.model.enable_input_require_grads()
    elif _checkpointing(unwrap(model.model)):   # on from an earlier stage
        unwrap(model.model).gradient_checkpointing_disable()
    if cfg.compile_layers:
        compile_decoder_layers(model.model)
    model.model.train()


def _checkpointing(model) -> bool:
    """Whether gradient checkpointing is on (transformers 5.24 renamed the flag; the GPU image has 5.17)."""
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(flag if flag is not None else getattr(model, "is_gradient_checkpointing", False))


def _progress_line(cfg: TrainConfig, totals: dict[str, float], done: int, rate: float) -> str:
    txt = f", txt {totals['txt']:.4f}" if "txt" in totals else ""
    return (f"{cfg.stage} step {done}/{cfg.steps}: loss {totals['loss']:.4f} (info {totals['info']:.4f}{txt}), "
            f"in-batch acc {totals['acc']:.3f}, {1 / rate:.2f} s/step, ETA {(cfg.steps - done) / rate:.0f}s")


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
    _prepare_model(model, cfg)
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

    t0 = last_log = time.monotonic()
    for step in range(start, cfg.steps):
        totals: dict[str, float] = {}     # the step's losses, averaged over its micro-batches
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
        done = step + 1
        history.append({"step": done, "lr": scheduler.get_last_lr()[0], **{k: round(v, 6) for k, v in totals.items()}})
        now = time.monotonic()
        if done % cfg.log_every == 0 or done == cfg.steps or now - last_log > 30:
            last_log = now
            say(_progress_line(cfg, totals, done, (done - start) / (now - t0)))
        if accelerator.is_main_process and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            _save_checkpoint(ckpt, step_module, optimizer, scheduler, done, history)
            if done - start <= cfg.checkpoint_every:
                _hold_if_asked(ckpt)
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
