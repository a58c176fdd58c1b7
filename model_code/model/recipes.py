"""Whole training runs and their hyperparameters.

- Profiles (:data:`PROFILES`): ``embedded`` (the default: CPU, the pretrained base shipped in git,
  fine-tuned in full, on cir-shapes only), ``gpu`` (a Qwen2-VL-2B-class checkpoint in bf16, LoRA, sized
  for real benchmarks' chains on one 80 GB GPU), ``micro`` (LoRA on a micro checkpoint on a CPU: a
  real benchmark's path tried in minutes) and ``smoke`` (the embedded recipe in a few small steps on a
  checkpoint given as the base: the test suite's). :func:`training_refusal` says before any work
  when a profile cannot train on a benchmark (the embedded base reads only its own corpus's words).
  A profile is frozen; :meth:`TrainingProfile.with_overrides` makes a changed copy, and a profile
  travels as JSON (:meth:`TrainingProfile.save` / :meth:`TrainingProfile.load`).
- The base: :func:`register_embedded` (the shipped base) or :func:`register_checkpoint` (a local
  checkpoint folder).
- :func:`train_cir_cot`: stage 1 (``align``) then stage 2 (``cot``) on the base, with LoRA or, where the
  profile says so (``lora=False``: the embedded base), every parameter.
- ``python -m model_code.model.recipes``: the same outside Dagster, e.g. under ``accelerate launch``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging as _logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import pydantic
import torch
from dagster_pipes import open_dagster_pipes

from model_code.annotation.store import read_annotations
from model_code.backbone import checkpoint_version, limit_pixels, load_backbone
from model_code.chain import CoT
from model_code.common import atomic_write_json
from model_code.data import read_tables
from model_code.data.tables import TablesRecord, image_paths
from model_code.model.cir_cot import CirCoTModel
from model_code.model.loss import rank
from model_code.model.train import TrainConfig, TrainExample, evaluate_in_batch, plot_history, train
from model_code.records import Record

# ---------------------------------------------------------------------------------------------
# training examples from the pipeline's tables


def pair_examples(triplets, images, root: str | os.PathLike, split: str = "train",
                  annotations=None) -> list[TrainExample]:
    """Training pairs of ``split``: reference, modification, first target, hard negatives and, when
    ``annotations`` (the accepted rows of the annotations table) has one, the rendered chain of thought."""

    root = Path(root)
    rows = triplets[triplets["split"] == split]
    path = image_paths(images, root)
    cots = {}
    if annotations is not None:
        ok = annotations[annotations["status"] == "ok"]
        cots = {
            q: CoT(c, r, k).render()
            for q, c, r, k in zip(ok["query_id"], ok["caption"], ok["reasoning"], ok["conclusion"])
        }
    out = []
    for q, s, ref, text, targets, negs in zip(
        rows["query_id"],
        rows["split"],
        rows["reference_id"],
        rows["modification"],
        rows["target_ids"],
        rows["hard_negative_ids"],
    ):
        if not len(targets):
            continue
        out.append(TrainExample(q, path[(s, ref)], text, path[(s, targets[0])], cots.get(q),
                                tuple(path[(s, n)] for n in negs if (s, n) in path)))
    return out


# ---------------------------------------------------------------------------------------------
# profiles: the hyperparameters of a whole training run


@dataclasses.dataclass(frozen=True)
class BaseSpec:
    """Where the base model comes from and how it is loaded: the pretrained base shipped in git
    (``embedded``) or a local checkpoint folder (``checkpoint``)."""

    kind: Literal["embedded", "checkpoint"] = "embedded"
    checkpoint_path: str | None = None
    dtype: str = "auto"
    device: str | None = None
    attn_implementation: str | None = None

    def __post_init__(self):
        if self.kind not in ("embedded", "checkpoint"):
            raise ValueError(f"base kind must be 'embedded' or 'checkpoint', not {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class TrainingProfile:
    """The hyperparameters of a whole training run: the base, then the two stages."""

    base: BaseSpec
    align: TrainConfig
    cot: TrainConfig
    lora_r: int = 16
    lora_alpha: int = 32
    eval_batches: int = 4
    lora: bool = True             # False: every parameter of the base is fine-tuned (where that measures better)
    max_pixels: int | None = None          # the most pixels of an image the model sees (None: the base's processor)
    max_chain_tokens: int | None = None    # chains longer than this (tokens) are left out of the cot stage, counted

    def __post_init__(self):
        if (self.align.stage, self.cot.stage) != ("align", "cot"):
            raise ValueError(f"a profile's stages are align then cot, not {self.align.stage}, {self.cot.stage}")

    def with_overrides(self, *, base: Mapping | None = None, align: Mapping | None = None,
                       cot: Mapping | None = None, **fields) -> TrainingProfile:
        """This profile with some values changed, e.g. ``with_overrides(align={"steps": 3}, lora=False)``:
        a new profile, checked as any profile is (the one it came from is left as it was)."""
        parts = {name: _replace(getattr(self, name), values, name)
                 for name, values in (("base", base), ("align", align), ("cot", cot)) if values}
        return _replace(self, {**fields, **parts}, "profile")

    def with_settings(self, settings: Sequence[str]) -> TrainingProfile:
        """:meth:`with_overrides` from ``[PART.]FIELD=VALUE`` strings (PART: base, align or cot; none:
        the profile's own field), e.g. ``cot.lr=5e-4``, ``lora=false``; each value is read as the
        type of the value it replaces."""
        overrides: dict = {}
        for item in settings:
            key, sep, text = item.partition("=")
            part, _, name = key.strip().rpartition(".")
            if not sep or part not in ("", "base", "align", "cot"):
                raise ValueError(f"{item!r}: give [base.|align.|cot.]FIELD=VALUE")
            holder = getattr(self, part) if part else self
            if name not in {f.name for f in dataclasses.fields(holder)}:
                raise ValueError(f"{item!r}: {type(holder).__name__} has no field {name!r}")
            declared = {f.name: f.type for f in dataclasses.fields(holder)}[name]
            value = _typed(text.strip(), getattr(holder, name), item, str(declared))
            (overrides.setdefault(part, {}) if part else overrides)[name] = value
        return self.with_overrides(**overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> TrainingProfile:
        return cls(**{**d, "base": BaseSpec(**d["base"]), "align": TrainConfig(**d["align"]),
                      "cot": TrainConfig(**d["cot"])})

    def save(self, path: str | os.PathLike) -> Path:
        """The profile as JSON (what a launched training process is handed: ``--profile-json``)."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainingProfile:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _replace(obj, values: Mapping, where: str):
    known = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: no field {', '.join(unknown)} (fields: {', '.join(sorted(known))})")
    return dataclasses.replace(obj, **values)


_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


def _typed(text: str, current, item: str, annotation: str = ""):
    """``text`` as a value of ``current``'s type; where ``current`` is None, of the field's declared
    type (``annotation``, e.g. ``int | None``); "none" unsets an optional field."""
    kind = type(current) if current is not None else _TYPES.get(annotation.split("|")[0].strip(), str)
    if text.lower() == "none" and (current is None or "None" in annotation):   # an optional field unset
        return None
    if kind is bool:
        if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise ValueError(f"{item!r}: {text!r} is not true or false")
        return text.lower() in ("1", "true", "yes")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{item!r}: {text!r} is not a {kind.__name__}") from None


PROFILES = {
    # CPU: the pretrained base shipped in model_code/model/embedded_base (`make pretrain`), fine-tuned
    # in full (every parameter; its 4.8 M are few): stage 1 short, stage 2 with the InfoNCE weighted
    # down (lambda_info 0.1) so the chain's text is learned. Both stages and the evaluation in about
    # 9 minutes on 2 cores. Against the earlier LoRA recipe (r=16, lr 2e-3, 70 + 100 steps, lambda 1):
    # CIR-CoT R@10 0.456 -> 0.568, conclusions 3.2 % -> 7 % exact
    # (bench/finetune_embedded.py; docs/training.md, "Fine-tuning the pretrained base")
    "embedded": TrainingProfile(
        base=BaseSpec(kind="embedded"),
        lora=False,
        align=TrainConfig(stage="align", steps=40, batch_size=48, lr=3e-4, warmup_steps=5, hard_negatives=1,
                          checkpoint_every=20, log_every=10),
        cot=TrainConfig(stage="cot", steps=140, batch_size=24, lr=3e-4, warmup_steps=5, hard_negatives=1,
                        lambda_info=0.1, checkpoint_every=20, log_every=10),
        eval_batches=3,
    ),
    # one 80 GB GPU, a Qwen2-VL-2B-class checkpoint in bf16, real benchmarks' teacher chains. LoRA rank 64
    # and learning rate 2e-5 as ReCALL's recipe for Qwen2-VL-2B; images at most 448 x 448 pixels (256
    # image tokens), chains up to 256 tokens (a caption, reasoning and conclusion of tens of words each).
    # Memory from the step measured on an H100 (docs/experiments/2026-11-26-gpu-training.md: 16 queries
    # with 448 px images and 155 chain tokens, r=16, layers compiled: 34.5 GiB, with gradient
    # checkpointing 13.2 GiB): the cot stage at 16 x 2 without checkpointing; the align stage's 64
    # queries and 64 targets, about three times the cot step's tokens, with checkpointing.
    "gpu": TrainingProfile(
        base=BaseSpec(kind="checkpoint", dtype="bfloat16", attn_implementation="sdpa"),
        lora_r=64, lora_alpha=128, max_pixels=448 * 448, max_chain_tokens=256,
        align=TrainConfig(stage="align", steps=2000, batch_size=64, lr=2e-5, warmup_steps=100,
                          mixed_precision="bf16", gradient_checkpointing=True, compile_layers=True,
                          checkpoint_every=200, log_every=20),
        cot=TrainConfig(stage="cot", steps=3000, batch_size=16, grad_accum=2, lr=2e-5, warmup_steps=100,
                        mixed_precision="bf16", compile_layers=True, checkpoint_every=200, log_every=20),
        eval_batches=8,
    ),
    # a CPU try of a real benchmark: LoRA (PEFT) on a micro checkpoint (`circot micro-model`), a few
    # dozen steps a stage; the path of the gpu profile in minutes, its figures meaningless
    "micro": TrainingProfile(
        base=BaseSpec(kind="checkpoint"),
        lora_r=16, lora_alpha=32, max_chain_tokens=192,
        align=TrainConfig(stage="align", steps=30, batch_size=16, lr=1e-3, warmup_steps=3, checkpoint_every=10,
                          log_every=10),
        cot=TrainConfig(stage="cot", steps=30, batch_size=8, lr=1e-3, warmup_steps=3, checkpoint_every=10,
                        log_every=10),
        eval_batches=2,
    ),
}
# the test suite's: the embedded recipe in a few small steps, on the checkpoint given as the base
# (CIRCOT_BASE_MODEL_PATH; the tests' micro model): the default recipe's code path in seconds
PROFILES["smoke"] = PROFILES["embedded"].with_overrides(
    base={"kind": "checkpoint"},
    align={"steps": 3, "batch_size": 8, "warmup_steps": 1, "checkpoint_every": 2},
    cot={"steps": 3, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2},
    eval_batches=1,
)


# ---------------------------------------------------------------------------------------------
# whole runs: the base model, then the two stages


class BaseModelRecord(Record):
    """What the ``base_model`` stage hands on: a checkpoint folder and its content version."""

    path: str
    kind: Literal["checkpoint", "embedded"]
    version: str
    parameters: dict = pydantic.Field(default_factory=dict)
    training: dict | None = None   # embedded: what its pretraining recorded (steps, seconds, perception, command)


class StageSummary(Record):
    steps: int
    seconds: float
    examples: int
    first: dict
    last: dict
    val: dict | None = None         # in-batch metrics on the validation pairs
    chains_too_long: int = 0        # training chains left out for being longer than the profile's max_chain_tokens


class TrainedModel(Record):
    """What the ``cir_cot_model`` stage hands on: the saved model, its version and how it was made."""

    path: str                       # a folder written by CirCoTModel.save
    version: str
    base: str                       # the base model folder
    base_version: str
    parameters: dict
    stages: dict                    # stage name -> StageSummary as a dict
    plot: str | None = None
    data: dict = pydantic.Field(default_factory=dict)  # dataset -> {raw, annotations, teacher, prompt_version}
    dataset: str = ""               # the benchmark it was trained on (its cir_cot_model partition)

    def stage(self, name: str) -> StageSummary:
        return StageSummary.from_dict(self.stages[name])


def register_checkpoint(path: str | os.PathLike) -> BaseModelRecord:
    """A local checkpoint folder as the base model: checked, versioned by its content."""

    path = Path(path)
    return BaseModelRecord(path=str(path.resolve()), kind="checkpoint", version=checkpoint_version(path))


EMBEDDED_BASE = Path(__file__).resolve().parent / "embedded_base"   # written by `make pretrain` + publish


def register_embedded(path: str | os.PathLike = EMBEDDED_BASE) -> BaseModelRecord:
    """The pretrained base shipped with the project (``model_code/model/embedded_base``): checked
    against the version its pretraining recorded, so a damaged or half-copied checkpoint is refused."""

    path = Path(path)
    record_file = path / "PRETRAINING.json"
    if not record_file.is_file():
        raise FileNotFoundError(f"no pretrained embedded base at {path} (PRETRAINING.json missing): "
                                "run `make pretrain` and publish it")
    recorded = json.loads(record_file.read_text())
    version = checkpoint_version(path)
    if version != recorded["version"]:
        raise FileNotFoundError(f"the embedded base at {path} has version {version}, its pretraining recorded "
                                f"{recorded['version']}: the checkpoint was changed or damaged (git checkout it)")
    return BaseModelRecord(path=str(path), kind="embedded", version=version,
                           training={**{k: recorded.get(k) for k in ("steps", "seconds", "perception", "command")},
                                     "corpus": recorded.get("config", {}).get("corpus")})


def embedded_corpus(path: str | os.PathLike = EMBEDDED_BASE) -> tuple[str | None, int]:
    """(the benchmark whose words the embedded base was pretrained on, its vocabulary size)."""
    path = Path(path)
    recorded = json.loads((path / "PRETRAINING.json").read_text())
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    return recorded.get("config", {}).get("corpus"), len(tokenizer["model"]["vocab"])


def training_refusal(profile: TrainingProfile, profile_name: str, spec) -> str | None:
    """Why ``profile`` cannot train on the benchmark ``spec`` (a message naming the settings to use),
    or None. A base pretrained by the project on one benchmark's corpus (the embedded base, or any
    folder with its ``PRETRAINING.json``, e.g. the embedded base given as a checkpoint) reads only that
    corpus's words; any other checkpoint (a Qwen2-VL, a micro model) reads what its tokenizer reads."""
    path = EMBEDDED_BASE if profile.base.kind == "embedded" else (
        Path(profile.base.checkpoint_path) if profile.base.checkpoint_path else None)
    if path is None or not (path / "PRETRAINING.json").is_file():
        return None
    corpus, vocabulary = embedded_corpus(path)
    if corpus is None or corpus == spec.name:
        return None
    return (f"The {profile_name!r} profile fine-tunes the base at {path}, pretrained on the {corpus} benchmark "
            f"alone: its {vocabulary}-piece vocabulary holds that benchmark's words and cannot read "
            f"{spec.title}'s texts. Train on {spec.name} with a Qwen2-VL-family checkpoint: on a GPU "
            f"CIRCOT_PROFILE=gpu CIRCOT_BASE_MODEL_PATH=/models/Qwen2-VL-2B-Instruct; on a CPU a micro model "
            f"(circot micro-model --out DIR --texts <{spec.title}'s annotation files>) with CIRCOT_PROFILE=micro "
            f"CIRCOT_BASE_MODEL_PATH=DIR (docs/training.md).")


def train_cir_cot(base: BaseModelRecord, train_pairs: Sequence[TrainExample], val_pairs: Sequence[TrainExample],
                  profile: TrainingProfile, out_dir: str | os.PathLike, *,
                  progress: Callable[[str], None] | None = None) -> TrainedModel:
    """The base model tuned (LoRA, or every parameter when ``profile.lora`` is off): stage 1 (``align``,
    no CoT), then stage 2 (``cot``, the joint loss on
    the pairs that have an accepted chain of thought). Saves the model to ``out_dir/model``.
    Each stage resumes from its checkpoint."""
    from model_code.model.cir_cot import add_cir_tokens, apply_lora, parameter_counts

    out_dir = Path(out_dir)
    spec = profile.base
    torch.manual_seed(profile.align.seed)
    model, processor = load_backbone(base.path, dtype=spec.dtype, device=spec.device,
                                     attn_implementation=spec.attn_implementation)
    if profile.max_pixels:
        limit_pixels(processor, profile.max_pixels)
    model.train()
    if profile.lora:
        model = apply_lora(model, processor, r=profile.lora_r, alpha=profile.lora_alpha)
    else:
        add_cir_tokens(model, processor)
        model.requires_grad_(True)
    m = CirCoTModel(model, processor, base_path=base.path, base_version=base.version)
    stages, histories = {}, {}
    too_long = {}
    for cfg in (profile.align, profile.cot):
        pairs = [p for p in train_pairs if p.cot] if cfg.stage == "cot" else list(train_pairs)
        val = [p for p in val_pairs if p.cot] if cfg.stage == "cot" else list(val_pairs)
        if cfg.stage == "cot" and profile.max_chain_tokens:
            pairs, too_long["train"] = _within(pairs, processor.tokenizer, profile.max_chain_tokens)
            val, too_long["val"] = _within(val, processor.tokenizer, profile.max_chain_tokens)
            if too_long["train"] and progress:
                progress(f"cot: {too_long['train']} of {too_long['train'] + len(pairs)} training chains are longer "
                         f"than {profile.max_chain_tokens} tokens (max_chain_tokens) and are left out")
        if not pairs:
            raise ValueError(f"stage {cfg.stage}: no training pair has an accepted chain of thought"
                             + (f" of at most {profile.max_chain_tokens} tokens" if too_long.get("train") else ""))
        result = train(m, pairs, cfg, out_dir / cfg.stage, progress=progress)
        histories[cfg.stage] = result.history
        stages[cfg.stage] = StageSummary(
            steps=result.steps,
            seconds=round(result.seconds, 1),
            examples=len(pairs),
            first=result.history[0],
            last=result.history[-1],
            val=evaluate_in_batch(m, val, cfg, profile.eval_batches) if val else None,
            chains_too_long=too_long.get("train", 0) if cfg.stage == "cot" else 0,
        ).to_dict()
    trained = TrainedModel(path=str(out_dir / "model"), version="", base=base.path, base_version=base.version,
                           parameters=parameter_counts(model), stages=stages)
    if rank() == 0:  # under `accelerate launch` one process writes the results
        trained.version = m.save(out_dir / "model")
        trained.plot = str(plot_stages(histories, out_dir / "training.png"))
        trained.write(out_dir / "summary.json")
    _barrier()
    return trained


def _within(pairs: Sequence[TrainExample], tokenizer, limit: int) -> tuple[list[TrainExample], int]:
    """The pairs whose chain is at most ``limit`` tokens, and how many were longer."""
    lengths = [len(ids) for ids in tokenizer([p.cot for p in pairs], add_special_tokens=False)["input_ids"]] \
        if pairs else []
    kept = [p for p, n in zip(pairs, lengths) if n <= limit]
    return kept, len(pairs) - len(kept)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def plot_stages(histories: dict[str, list[dict]], path: str | os.PathLike) -> Path:
    """Both stages on one time axis."""
    offset, merged = 0, []
    for history in histories.values():
        merged += [{**h, "step": h["step"] + offset} for h in history]
        offset += len(history)
    keys = set.intersection(*(set(h) for h in merged)) | {"txt"}
    merged = [{k: h.get(k, float("nan")) for k in keys} for h in merged]
    return plot_history(merged, path, title=" then ".join(histories))


def launch_command(tables: Sequence[str], annotations: Sequence[str], base: str, profile_file: str, out: str, *,
                   train_split: str = "train", val_split: str | None = "val", processes: int = 1, pipes: bool = True,
                   python: str | None = None) -> list[str]:
    """The command line that trains in ``processes`` processes (torchrun; ``accelerate`` reads its
    environment), e.g. launched by Dagster Pipes: what ``cir_cot_model`` runs outside its own process.
    ``profile_file``: the whole profile, overrides applied (:meth:`TrainingProfile.save`)."""

    cmd = [python or sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(processes), "-m", "model_code.model.recipes", "--base", base, "--profile-json", profile_file,
           "--out", out]
    for t, a in zip(tables, annotations, strict=True):
        cmd += ["--tables", t, "--annotations", a]
    cmd += ["--train-split", train_split] + (["--val-split", val_split] if val_split else [])
    return cmd + (["--pipes"] if pipes else [])


def main(argv: list[str] | None = None) -> int:
    """Train the CIR-CoT model outside Dagster, e.g. across GPUs:

        accelerate launch --num_processes 8 -m model_code.model.recipes --tables artifacts/triplets/synthetic \\
            --annotations artifacts/cot_annotations/synthetic/annotations.parquet --val-split val \\
            --base /models/Qwen2-VL-2B-Instruct --profile gpu --out artifacts/cir_cot_model/runs/manual

    Every process runs this; in-batch negatives are gathered across them; process 0 writes the model.
    ``--tables``/``--annotations`` may be repeated: the pairs are trained on together (the pipeline trains
    each dataset's model on its own pair). With ``--pipes``
    (a launch by Dagster Pipes), process 0 sends its progress and the result to the asset that
    launched it.
    """


    p = argparse.ArgumentParser(prog="python -m model_code.model.recipes", description=main.__doc__.split("\n\n")[0])
    p.add_argument("--tables", required=True, action="append",
                   help="a triplets folder written by the pipeline (triplets/images parquet, meta.json)")
    p.add_argument("--annotations", required=True, action="append",
                   help="an annotations.parquet written by the pipeline (one per --tables)")
    p.add_argument("--base", required=True, help="the base model folder (a checkpoint)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--profile", choices=sorted(PROFILES), help="a named profile (default: gpu)")
    which.add_argument("--profile-json", metavar="FILE",
                       help="a whole profile as JSON (what cir_cot_model hands the processes it launches)")
    p.add_argument("--set", action="append", default=[], metavar="[PART.]FIELD=VALUE",
                   help="change one value of the profile, e.g. --set align.steps=3 --set cot.lr=5e-4 (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--train-split", default="train", help="the split trained on (default: train)")
    p.add_argument("--val-split", default=None,
                   help="the split of the validation in-batch accuracy, e.g. val (default: none)")
    p.add_argument("--pipes", action="store_true", help="report to the Dagster asset that launched this (Pipes)")
    args = p.parse_args(argv)
    if len(args.tables) != len(args.annotations):
        p.error("give one --annotations per --tables")
    _logging.basicConfig(level=_logging.INFO, format="%(asctime)s %(message)s")

    profile = TrainingProfile.load(args.profile_json) if args.profile_json else PROFILES[args.profile or "gpu"]
    try:
        profile = profile.with_settings(args.set)
    except ValueError as e:
        p.error(f"--set: {e}")
    train_pairs, val_pairs = [], []
    for tables, annotation_file in zip(args.tables, args.annotations):
        root = TablesRecord.load(tables).root
        bench, ann = read_tables(tables), read_annotations(annotation_file)
        train_pairs += pair_examples(bench.triplets, bench.images, root, args.train_split, ann)
        if args.val_split:
            val_pairs += pair_examples(bench.triplets, bench.images, root, args.val_split, ann)
    with contextlib.ExitStack() as stack:
        pipes = None
        if args.pipes and rank() == 0:   # torchrun gives every process the Pipes environment; one reports

            pipes = stack.enter_context(open_dagster_pipes())
        progress = pipes.log.info if pipes else None
        trained = train_cir_cot(register_checkpoint(args.base), train_pairs, val_pairs, profile, args.out,
                                progress=progress)
        if pipes:
            align, cot = trained.stage("align"), trained.stage("cot")
            pipes.report_asset_materialization(data_version=trained.version, metadata={
                "model_version": trained.version, "summary": str(Path(args.out) / "summary.json"),
                "launched_processes": int(os.environ.get("WORLD_SIZE", "1")),
                "align_loss": f"{align.first['loss']:.3f} -> {align.last['loss']:.3f}",
                "cot_loss": f"{cot.first['loss']:.3f} -> {cot.last['loss']:.3f}",
                "wall_time_s": round(align.seconds + cot.seconds, 1)})
    if rank() == 0:
        print(json.dumps({"path": trained.path, "version": trained.version}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
