"""What a pretraining run of the embedded base leaves and hands on (``model_code/model/pretrain.py``
makes them): its record (``base.json``), its evaluation rows (``metrics.jsonl``) and their plot, the
finished model as a bf16 checkpoint folder, the model exported mid-run, and the publication of a
finished model as the embedded base (``PRETRAINING.json``: the phases behind it, each with its
configuration and curve). Folders written by earlier versions load as they are: the configuration is
kept as the JSON the run wrote.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from model_code.backbone import load_backbone
from model_code.common import atomic_write_json, replace_dir
from model_code.model_card import write_base_card


@dataclasses.dataclass
class PretrainRecord:
    """What a finished pretraining leaves in ``<out>/base.json`` (and the shipped checkpoint's README).
    A dataclass with the records' ``to_dict`` / ``from_dict`` / ``write`` / ``read``, not a pydantic
    ``model_code.records.Record``: the pretraining runs on machines without pydantic (the GPU image)."""

    path: str
    version: str
    config: dict
    steps: int
    seconds: float
    perception: dict
    history_last: dict

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PretrainRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})   # keys of a newer writer ignored

    def write(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def read(cls, path: str | os.PathLike) -> PretrainRecord:
        return cls.from_dict(json.loads(Path(path).read_text()))


def save_bf16(model, processor, path: str | os.PathLike) -> Path:
    """The checkpoint folder with bf16 weights (half the bytes; loaded back as float32 on a CPU)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp, state_dict={k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()})
    processor.save_pretrained(tmp)
    replace_dir(tmp, path)
    return path


def export_checkpoint(out_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """The model as of ``out_dir``'s last training checkpoint, as a checkpoint folder at ``dest``
    (bf16): to fine-tune or inspect a pretraining that is still running."""

    out_dir = Path(out_dir)
    state = torch.load(out_dir / "train" / "checkpoint" / "state.pt", map_location="cpu", weights_only=False)
    model, processor = load_backbone(out_dir / "init", dtype="float32", device="cpu")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["params"].items():
            params[name.removeprefix("cirmodel.model.")].copy_(value)
    return save_bf16(model, processor, dest)


CURVE_KEYS = ("step", "cap", "edit", "info", "caption_exact", "caption_object_f1", "edit_exact", "edit_object_f1",
              "text_to_image_R@1", "device")


def read_metrics(folder: str | os.PathLike) -> list[dict]:
    """The evaluation rows of a pretraining's ``metrics.jsonl``."""
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _curve(rows: Sequence[dict]) -> list[dict]:
    return [{k: r[k] for k in CURVE_KEYS if k in r} for r in rows]


def _phases(source: str | os.PathLike) -> list[dict]:
    """The pretraining phases behind a model: a published base's ``PRETRAINING.json`` (its own earlier
    phases, then itself) or a run's folder (``config.json`` and ``metrics.jsonl``, e.g. one packed by
    ``bench/pretrain_budget.py`` on another machine)."""
    source = Path(source)
    if source.is_file() or (source / "PRETRAINING.json").is_file():
        meta = json.loads((source if source.is_file() else source / "PRETRAINING.json").read_text())
        return [*meta.get("earlier", []), {k: meta[k] for k in ("version", "command", "config", "steps", "curve")
                                           if k in meta}]
    config = json.loads((source / "config.json").read_text())
    rows = read_metrics(source)
    return [{"config": config, "steps": rows[-1]["step"] if rows else 0, "curve": _curve(rows)}]


def publish(out_dir: str | os.PathLike, dest: str | os.PathLike, command: str,
            earlier: Sequence[str | os.PathLike] = ()) -> Path:
    """Copy a finished pretraining's model to ``dest`` (the embedded base folder committed to git)
    with ``PRETRAINING.json``: its version, configuration, steps, perception figures, the command
    that made it and, for a pretraining that continued another model (``init``), the ``earlier``
    phases in order (see ``_phases``)."""
    out_dir, dest = Path(out_dir), Path(dest)
    record = PretrainRecord.read(out_dir / "base.json")
    rows = read_metrics(out_dir)
    phases = [phase for source in earlier for phase in _phases(source)]
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(record.path, tmp)
    atomic_write_json(tmp / "PRETRAINING.json", {
        "version": record.version, "command": command, "config": record.config, "steps": record.steps,
        "seconds": record.seconds, "perception": {k: v for k, v in record.perception.items()
                                                  if not k.startswith("example") and k != "truth"},
        "curve": _curve(rows), **({"earlier": phases} if phases else {})})
    write_base_card(tmp)   # README.md: the folder's model card, from that record
    replace_dir(tmp, dest)
    return dest


def plot_perception(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """The perception metrics and the caption loss against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for k in ("caption_exact", "caption_object_f1", "edit_exact", "text_to_image_R@1"):
        a1.plot(steps, [r[k] for r in rows], marker=".", label=k)
    a1.set_ylim(0, 1)
    a1.set_xlabel("step")
    a1.legend(fontsize=7)
    for k in ("cap", "edit", "info"):
        a2.plot(steps, [r.get(k, float("nan")) for r in rows], marker=".", label=k)
    a2.set_xlabel("step")
    a2.set_ylabel("loss")
    a2.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
