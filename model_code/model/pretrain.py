"""Pretraining of the embedded base model (docs/architecture.md §5): general skills on cir-shapes scenes of its own.

The embedded base is a pretrained checkpoint like any other. This job makes it, once, for hours
on a CPU (minutes on a GPU), resumable across sittings; the pipeline only fine-tunes it. It never
sees the benchmark: its scenes come from a generator seeded apart from the benchmark's, and any
scene equal to an image of a benchmark split (``--exclude``) is dropped. It teaches, in the prompts
the fine-tune uses:

- captioning: image -> ``<caption>`` the full scene description ``</caption>`` (perception);
- alignment: a description's ``<emb>`` against its image's gallery ``<emb>``, and the no-CoT query of
  the image with "keep it as it is" against the same (one embedding space for every prompt);
- text edits: a description and an edit -> ``<conclusion>`` the edited description ``</conclusion>``
  (language ability; no image, no triplet).

Perception is measured in generated text from the first chunk: every ``eval_every`` steps the model
captions held-out scenes greedily and the captions are read back into objects with the scene-graph
parser the evaluation uses (``caption_exact``, ``caption_object_f1``), the held-out edits likewise
(``edit_exact``), and descriptions retrieve their images among the held-out ones (``text_to_image_R@1``).
Each evaluation is a line of ``metrics.jsonl`` beside the checkpoint and a log line.

    python -m model_code.model.pretrain --out artifacts/pretrain/tiny84 [--steps N] [--minutes M]

(``make pretrain``). Interrupt it at any time; the same command resumes from the last checkpoint.

A later phase continues a model (``--init``) on what it lacks: the shipped base was continued on text
edits answered as the chain answers them (``--edit-answer chain``: the oracle's reasoning, then the
conclusion), several per scene (``--edits-per-scene``) with few images per step (``--align-size``);
``--publish --earlier ...`` records every phase in ``PRETRAINING.json``. ``bench/pretrain_budget.py``
fits such a run to a time budget (how the GPU phases were sized). What a run leaves (its record, its
metrics, the exported and the published model) is ``model_code/model/pretrain_output.py``'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch

from model_code.backbone import (
    build_random_backbone,
    checkpoint_version,
    grow_layers,
    load_backbone,
    save_backbone,
)
from model_code.benchmarks import benchmark
from model_code.chain import parse
from model_code.common import atomic_write_json
from model_code.model.cir_cot import edit_answer
from model_code.model.pretrain_output import (
    PretrainRecord,
    export_checkpoint,
    plot_perception,
    publish,
    read_metrics,
    save_bf16,
)
from model_code.model.train import TrainConfig, TrainExample, train

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class PretrainConfig(TrainConfig):
    """A pretraining run: the ``pretrain`` stage's ``TrainConfig`` (with the defaults pretraining
    uses) and what only pretraining has: the corpus, the model it starts from, the evaluation points
    and the curriculum."""

    # TrainConfig's fields, at pretraining's defaults
    stage: Literal["pretrain"] = "pretrain"
    steps: int = 2400
    lr: float = 1e-3
    warmup_steps: int = 50
    caption_fraction: float = 0.5
    edit_fraction: float = 0.5
    hard_negatives: int = 0
    mixed_precision: Literal["no", "bf16", "auto"] = "auto"   # bf16 where native (train.native_bf16)
    checkpoint_every: int = 25
    # pretraining's own
    corpus: str = "synthetic"       # the dataset whose ``pretraining`` hook makes the corpus (model_code.datasets)
    shape: str = "tiny84"
    vocab_size: int = 1024
    scenes: int = 20000             # training scenes (each with one text edit)
    heldout: int = 200              # scenes kept apart for the perception metrics
    eval_every: int = 100
    # text edits: "conclusion" answers with the edited description alone; "chain" with the oracle's
    # reasoning (which object each phrase means, one edit at a time) and then that conclusion, in the
    # chain's tags: the step the fine-tuned chain takes between its caption and its conclusion
    edit_answer: str = "conclusion"
    edits_per_scene: int = 1        # text edits drawn per scene (text is cheap; images are rendered once)
    resolves_per_scene: int = 4     # resolution examples drawn per sample (trained with resolve_fraction > 0)
    grow_layers: int = 0            # with init: the language model's depth after each layer is repeated (0: as is)
    init: str = ""                  # a checkpoint folder to continue from (its tokenizer too); "" = random
    # curriculum: train on modifications of at most `start_edits` edits until the held-out single
    # edits are right `advance_at` of the time, then on every count (0: no curriculum)
    start_edits: int = 0
    advance_at: float = 0.8
    advance_by_step: int = 0        # and from this step on whatever they score (0: only on the score)
    # modifications holding one of these ops (the weakest, measured) are drawn `oversample` times as often
    oversample_ops: tuple[str, ...] = ()
    oversample: int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.stage != "pretrain":
            raise ValueError(f"a pretraining's stage is 'pretrain', not {self.stage!r}")
        if self.edit_answer not in ("conclusion", "chain"):
            raise ValueError(f"edit_answer must be 'conclusion' or 'chain', not {self.edit_answer!r}")
        if self.edits_per_scene < 1:
            raise ValueError("edits_per_scene must be at least 1")
        if self.start_edits not in (0, 1, 2, 3):
            raise ValueError(f"start_edits must be 0 (no curriculum) or 1-3, not {self.start_edits!r}")
        if not 0 < self.advance_at <= 1:
            raise ValueError(f"advance_at must be in (0, 1], not {self.advance_at!r}")
        if self.resolves_per_scene < 0 or not 0 <= self.resolve_fraction <= 1:
            raise ValueError("resolves_per_scene must be at least 0 and resolve_fraction in [0, 1]")
        if self.grow_layers and not self.init:
            raise ValueError("grow_layers deepens a model it continues: give init too")
        if self.oversample < 1:
            raise ValueError("oversample must be at least 1")
        object.__setattr__(self, "oversample_ops", tuple(self.oversample_ops))
        ops = _corpus(self.corpus).EDIT_OPS
        unknown = set(self.oversample_ops) - set(ops)
        if unknown:
            raise ValueError(f"oversample_ops: unknown ops {sorted(unknown)} (known: {', '.join(ops)})")

    @classmethod
    def from_saved(cls, saved: dict) -> PretrainConfig:
        """The configuration a run folder's ``config.json`` holds, written by this version or an earlier
        one (whose keys were pretraining's own and the stage fields it set; the rest take their defaults)."""
        return cls(**{k: tuple(v) if k == "oversample_ops" else v for k, v in saved.items()})

    def train_config(self) -> TrainConfig:
        """The ``pretrain`` stage as the training loop takes it: every evaluation point is a
        checkpoint, so stopping there loses nothing."""
        stage = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{**stage, "checkpoint_every": math.gcd(self.checkpoint_every, self.eval_every)})


@dataclasses.dataclass
class PretrainSample:
    image: Path
    scene: tuple
    description: str
    edit_text: str        # the edit prompt's text: the description and the modification
    edited: tuple         # the scene after the edit
    conclusion: str       # its description, as a chain's conclusion words it
    cot: str              # the oracle chain of this (scene, edit): tokenizer corpus only
    ops: tuple[str, ...] = ()   # the modification's edits, one name of the corpus's EDIT_OPS each
    resolutions: tuple[tuple[str, str], ...] = ()   # (resolve prompt text, answer): which object a phrase means


def _corpus(name: str):
    """The pretraining corpus a dataset lends (its spec's hooks: ``pretraining``)."""

    corpus = benchmark(name).hooks.pretraining
    if corpus is None:
        raise ValueError(f"dataset {name!r} registers no pretraining corpus")
    return corpus


def make_samples(cfg: PretrainConfig, folder: str | os.PathLike, *, exclude: set = frozenset(),
                 progress: Callable[[str], None] | None = None) -> list[PretrainSample]:
    """``cfg.scenes + cfg.heldout`` scenes of ``cfg.corpus`` (the held-out ones last), each as
    ``cfg.edits_per_scene`` consecutive samples, none of them in ``exclude`` (see the corpus's
    ``make_samples``: on cir-shapes, ``model_code.synthetic.pretraining``)."""
    return _corpus(cfg.corpus).make_samples(cfg, folder, exclude=exclude, progress=progress)


def excluded_scenes(cfg: PretrainConfig, root: str | os.PathLike | None) -> set:
    """What of the benchmark at ``root`` the corpus must never hold (nothing when ``root`` is None)."""
    return _corpus(cfg.corpus).excluded_scenes(root) if root is not None else set()


def curriculum_pool(samples: Sequence[PretrainSample], examples: Sequence[TrainExample], cfg: PretrainConfig,
                    max_edits: int) -> list[TrainExample]:
    """The training examples of the curriculum's current level: the modifications of at most
    ``max_edits`` edits, those holding an op of ``cfg.oversample_ops`` repeated ``cfg.oversample`` times."""
    weak = set(cfg.oversample_ops)
    pool = []
    for s, ex in zip(samples, examples):
        if len(s.ops) <= max_edits:
            pool += [ex] * (cfg.oversample if weak & set(s.ops) else 1)
    return pool


def edit_target(s: PretrainSample, answer: str = "conclusion") -> str:
    """The answer a text edit is trained to write: the edited description in ``<conclusion>`` tags,
    after the oracle's ``<reasoning>`` when ``answer`` is "chain" (the chain's own conclusion then)."""
    if answer == "chain":

        c = parse(s.cot)
        return edit_answer(c.reasoning, c.conclusion)
    return edit_answer(None, s.conclusion)


def examples(samples: Sequence[PretrainSample], answer: str = "conclusion") -> list[TrainExample]:
    return [TrainExample(f"{s.image.stem}-{k}", None, s.description, s.image,
                         edit=(s.edit_text, edit_target(s, answer)), resolve=s.resolutions)
            for k, s in enumerate(samples)]


# ---------------------------------------------------------------------------------------------
# perception, measured in generated text


def _matches(texts: Sequence[str], truths: Sequence[tuple], corpus: str = "synthetic") -> list[tuple[bool, float]]:
    return _corpus(corpus).matches(texts, truths)


def _scores(texts: Sequence[str], truths: Sequence[tuple]) -> tuple[float, float]:
    hits = _matches(texts, truths)
    n = max(len(hits), 1)
    return sum(same for same, _ in hits) / n, sum(f1 for _, f1 in hits) / n


def _by(keys: Sequence, hits: Sequence[tuple[bool, float]], prefix: str) -> dict[str, float]:
    """Exactness per key (e.g. ``edit_exact[edits=2]``), and the count behind it (``n[...]``)."""
    out = {}
    for key in sorted(set(keys)):
        mine = [same for k, (same, _) in zip(keys, hits) if k == key]
        out[f"{prefix}[{key}]"] = round(sum(mine) / len(mine), 4)
        out[f"n[{key}]"] = len(mine)
    return out


def perception(m, heldout: Sequence[PretrainSample], *, max_new_tokens: int = 96,
               edit_answer: str = "conclusion", corpus: str = "synthetic") -> dict:
    """Caption exactness / object F1, text-edit exactness and description -> image R@1 on ``heldout``
    (one sample per scene); captions by object count (``caption_exact[objects=N]``), edits by number
    of edits (``edit_exact[edits=N]``) and single edits by op (``edit_exact[op=...]``). An edit is
    scored on its ``<conclusion>`` (the reasoning before it, when ``edit_answer`` is "chain", states
    objects too)."""
    from model_code.model.decoding import generate_until

    t0 = time.monotonic()
    images = [s.image for s in heldout]
    captions = generate_until(m, [m.prompt("describe")] * len(heldout), images, "</caption>", max_new_tokens)
    caption_hits = _matches(captions, [s.scene for s in heldout], corpus)
    edited = generate_until(m, [m.prompt("edit", s.edit_text, image=False) for s in heldout], None, "</conclusion>",
                       max_new_tokens * (4 if edit_answer == "chain" else 1))
    resolution = {}
    if edit_answer == "chain" and hasattr(_corpus(corpus), "resolution_scores"):
        # which object each phrase means, by the kind of phrase, and where wrong edits first go wrong
        resolution = _corpus(corpus).resolution_scores(edited, [edit_target(s, "chain") for s in heldout])
    edited = [t.rsplit("<conclusion>", 1)[-1] if edit_answer == "chain" else t for t in edited]
    edit_hits = _matches(edited, [s.edited for s in heldout], corpus)
    q = m.embed_texts([s.description for s in heldout])
    g = m.embed_images(images)
    r1 = float((q @ g.T).argmax(dim=1).eq(torch.arange(len(heldout))).float().mean())
    n = max(len(heldout), 1)
    single = [(s.ops[0], hit) for s, hit in zip(heldout, edit_hits) if len(s.ops) == 1]
    return {"caption_exact": round(sum(h for h, _ in caption_hits) / n, 4),
            "caption_object_f1": round(sum(f for _, f in caption_hits) / n, 4),
            "edit_exact": round(sum(h for h, _ in edit_hits) / n, 4),
            "edit_object_f1": round(sum(f for _, f in edit_hits) / n, 4),
            "text_to_image_R@1": round(r1, 4), "eval_seconds": round(time.monotonic() - t0, 1),
            **_by([f"objects={len(s.scene)}" for s in heldout], caption_hits, "caption_exact"),
            **_by([f"edits={len(s.ops)}" for s in heldout], edit_hits, "edit_exact"),
            **_by([f"op={op}" for op, _ in single], [hit for _, hit in single], "edit_exact"), **resolution,
            "example_caption": captions[0][:300], "truth": heldout[0].description}


# ---------------------------------------------------------------------------------------------
# the job


def pretrain(cfg: PretrainConfig, out_dir: str | os.PathLike, *, exclude_root: str | os.PathLike | None = None,
             minutes: float | None = None, progress: Callable[[str], None] | None = None) -> PretrainRecord | None:
    """Pretrain (or resume pretraining) the embedded base into ``out_dir``. With ``minutes``, stop
    at the first evaluation point after that much time (resume later with the same call); returns
    None then, else the record of the finished model (``out_dir/model``, a checkpoint folder)."""
    from model_code.model.cir_cot import PROMPTS, CirCoTModel, add_cir_tokens

    say = progress or log.info
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "base.json").is_file():
        return PretrainRecord.read(out_dir / "base.json")
    config_file = out_dir / "config.json"
    if config_file.is_file():
        saved = PretrainConfig.from_saved(json.loads(config_file.read_text()))
        free = ("steps", "eval_every", "checkpoint_every")  # may change on a resume (steps: the rest of the schedule)
        if dataclasses.replace(saved, **{k: getattr(cfg, k) for k in free}) != cfg:
            raise ValueError(f"{out_dir} holds a pretraining with another configuration ({saved}); "
                             "give a new --out or the same settings")
    atomic_write_json(config_file, dataclasses.asdict(cfg))
    samples = make_samples(cfg, out_dir / "scenes", exclude=excluded_scenes(cfg, exclude_root), progress=say)
    k = cfg.edits_per_scene
    train_samples, heldout = samples[:cfg.scenes * k], samples[cfg.scenes * k::k]
    init = out_dir / "init"   # the initial weights and the tokenizer, saved once so a resume rebuilds nothing
    torch.manual_seed(cfg.seed)
    if not (init / "config.json").is_file():
        if cfg.init:
            model, processor = load_backbone(cfg.init, dtype="float32", device="cpu")
            if cfg.grow_layers:
                grow_layers(model, cfg.grow_layers)
        else:
            corpus = [s.description for s in samples] + [s.edit_text for s in samples]
            corpus += [s.conclusion for s in samples] + [s.cot for s in samples] + list(PROMPTS.values()) * 50
            model, processor = build_random_backbone(cfg.shape, corpus, vocab_size=cfg.vocab_size, seed=cfg.seed)
        add_cir_tokens(model, processor)
        save_backbone(model, processor, init.with_name("init.tmp"))
        os.replace(init.with_name("init.tmp"), init)
    model, processor = load_backbone(init, dtype="float32", device="cpu" if not torch.cuda.is_available() else None)
    model.train()
    m = CirCoTModel(model, processor)
    tcfg = cfg.train_config()
    metrics_file = out_dir / "metrics.jsonl"
    done = _checkpoint_step(out_dir / "train")
    t0 = time.monotonic()
    result = None
    train_examples = examples(train_samples, cfg.edit_answer)
    rows = read_metrics(out_dir) if metrics_file.is_file() else []
    level = rows[-1].get("max_edits", 3) if rows else (cfg.start_edits or 3)
    while done < cfg.steps:
        stop = min(cfg.steps, (done // cfg.eval_every + 1) * cfg.eval_every)
        pool = curriculum_pool(train_samples, train_examples, cfg, level)
        result = train(m, pool, tcfg, out_dir / "train", progress=say, stop_after=stop)
        done = result.history[-1]["step"] if result.history else stop
        p = perception(m, heldout, edit_answer=cfg.edit_answer, corpus=cfg.corpus)
        trained_on = level
        if level < 3 and (p.get("edit_exact[edits=1]", 0.0) >= cfg.advance_at
                          or 0 < cfg.advance_by_step <= done):
            level = 3   # single edits are right often enough (or the curriculum's time is up): every count
        row = {"step": done, **{k: result.history[-1][k] for k in result.history[-1] if k != "step"},
               "train_seconds": round(result.seconds, 1), "device": m.device.type, "trained_max_edits": trained_on,
               "max_edits": level, **p}
        with open(metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        resolved = (f"; resolution {p['resolution_acc']:.3f} (" + ", ".join(
            f"{k[len('resolution_acc[kind='):-1]} {v:.2f}" for k, v in p.items() if k.startswith("resolution_acc["))
            + ")") if "resolution_acc" in p else ""
        say(f"pretrain step {done}/{cfg.steps}: caption exact {p['caption_exact']:.3f}, object F1 "
            f"{p['caption_object_f1']:.3f}; edit exact {p['edit_exact']:.3f} (single "
            f"{p.get('edit_exact[edits=1]', float('nan')):.3f}){resolved}; "
            f"text->image R@1 {p['text_to_image_R@1']:.3f} "
            f"(eval {p['eval_seconds']:.0f}s); curriculum: up to {level} edits")
        if minutes is not None and time.monotonic() - t0 > minutes * 60 and done < cfg.steps:
            say(f"pretrain: stopping after {minutes} minutes at step {done}; the same command resumes")
            return None
    model_dir = save_bf16(model, processor, out_dir / "model")
    rows = read_metrics(out_dir)
    plot_perception(rows, out_dir / "perception.png")
    history = json.loads((out_dir / "train" / "checkpoint" / "history.json").read_text())
    record = PretrainRecord(path=str(model_dir), version=checkpoint_version(model_dir),
                            config=dataclasses.asdict(cfg), steps=cfg.steps,
                            seconds=round(sum(r.get("train_seconds", 0) for r in rows), 1),
                            perception=rows[-1] if rows else {}, history_last=history[-1])
    record.write(out_dir / "base.json")
    return record


def _checkpoint_step(train_dir: Path) -> int:
    history = train_dir / "checkpoint" / "history.json"
    return len(json.loads(history.read_text())) if history.is_file() else 0


def main(argv: list[str] | None = None) -> int:

    p = argparse.ArgumentParser(prog="python -m model_code.model.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="artifacts/pretrain/tiny84", help="the run's folder (resumed when present)")
    p.add_argument("--steps", type=int, help="total optimizer steps (default: the config's)")
    p.add_argument("--minutes", type=float, help="stop at the first evaluation after this many minutes")
    p.add_argument("--exclude", default="data/raw/synthetic",
                   help="a cir-shapes benchmark folder whose scenes are never used ('' to skip)")
    p.add_argument("--scenes", type=int)
    p.add_argument("--heldout", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--caption-fraction", type=float)
    p.add_argument("--edit-fraction", type=float)
    p.add_argument("--edit-answer", choices=("conclusion", "chain"),
                   help="what a text edit writes: the edited description, or the reasoning and then it")
    p.add_argument("--edits-per-scene", type=int)
    p.add_argument("--align-size", type=int, help="images aligned per step (default: the whole batch)")
    p.add_argument("--start-edits", type=int, choices=(0, 1, 2, 3),
                   help="curriculum: modifications of at most this many edits until single edits are right "
                        "--advance-at of the time on held-out scenes, then every count (0: no curriculum)")
    p.add_argument("--advance-at", type=float, help="the held-out single-edit exactness that ends the curriculum")
    p.add_argument("--advance-by-step", type=int, help="end the curriculum at this step whatever the score")
    p.add_argument("--oversample-ops", nargs="*", metavar="OP",
                   help="modifications holding one of these ops are drawn --oversample times as often "
                        f"({', '.join(_corpus('synthetic').EDIT_OPS)})")
    p.add_argument("--oversample", type=int)
    p.add_argument("--mixed-precision", choices=("auto", "no", "bf16"),
                   help="autocast: auto (default) is bf16 where the GPU or CPU computes it natively, else float32")
    p.add_argument("--resolve-fraction", type=float,
                   help="share of the batch also trained on reference resolution: a description and a phrase -> "
                        "the object(s) it means, short sequences (0: none)")
    p.add_argument("--resolves-per-scene", type=int, help="resolution examples per sample (default 4)")
    p.add_argument("--grow-layers", type=int,
                   help="with --init: deepen the language model to this many layers, each layer followed by "
                        "copies that start adding nothing (e.g. 8 from the shipped 4)")
    p.add_argument("--init", help="continue from this checkpoint folder (e.g. the embedded base) instead of "
                                  "random weights")
    p.add_argument("--publish", metavar="DEST", nargs="?", const="model_code/model/embedded_base",
                   help="copy the finished model to DEST (default: the embedded base folder committed to git)")
    p.add_argument("--earlier", action="append", default=[], metavar="SOURCE",
                   help="with --publish: an earlier phase of this model (a published base folder or a run's "
                        "folder with config.json and metrics.jsonl), oldest first; repeat for several")
    p.add_argument("--command", help="with --publish: the command(s) that made the model, as recorded")
    p.add_argument("--export", metavar="DEST",
                   help="only write the model as of the last checkpoint to DEST (a checkpoint folder) and exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.export:
        print(export_checkpoint(args.out, args.export))
        return 0
    if args.publish:
        if not (Path(args.out) / "base.json").is_file():
            p.error(f"{args.out} holds no finished pretraining (base.json): run it to the end first")
        command = args.command or f"make pretrain  # python -m model_code.model.pretrain --out {args.out}"
        print(publish(args.out, args.publish, command, args.earlier))
        return 0
    names = ("steps", "scenes", "heldout", "batch_size", "eval_every", "lr", "warmup_steps", "caption_fraction",
             "edit_fraction", "edit_answer", "edits_per_scene", "align_size", "init", "start_edits", "advance_at",
             "advance_by_step", "oversample_ops", "oversample", "resolve_fraction", "resolves_per_scene", "grow_layers",
             "mixed_precision")
    cfg = PretrainConfig(**{n: getattr(args, n) for n in names if getattr(args, n) is not None})  # validated
    exclude = args.exclude or None
    if exclude and not Path(exclude).is_dir():
        p.error(f"--exclude {exclude}: no such folder (run `make run` once, or give --exclude '')")
    record = pretrain(cfg, args.out, exclude_root=exclude, minutes=args.minutes)
    if record is not None:
        print(json.dumps(record.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
