"""The promoted models in the BentoML model store (DESIGN.md §7): model ``cir-cot``.

Each promoted model is one store entry tagged ``cir-cot:<model version>`` holding the saved model
folder (``CirCoTModel.save``) plus, for an adapter, its base model's files, so the entry is
self-contained. Labels carry the stage (``production``, ``candidate``, ``archived`` for a model
that production moved past, ``rolled_back`` for one an operator rolled back), the data / annotation / model versions and the headline
metrics; the metadata holds the full evaluation metrics and the gate verdict.

Exactly one entry is ``production`` at a time. Promoting a new model archives the previous
production model (it stays in the store); :func:`rollback` restores the most recently archived
one and marks the current one ``rolled_back``; promoting a model that is already production
changes nothing, and a rolled-back model is not promoted again unless forced.

The store is ``$BENTOML_HOME/models`` (default ``~/bentoml``). This module is what the pipeline
(the ``promoted_model`` asset) and the service share; it imports no orchestrator.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path

MODEL_NAME = "cir-cot"
STAGES = ("production", "candidate", "archived", "rolled_back")


def _bentoml():
    import bentoml

    return bentoml


def _entries() -> list:
    bentoml = _bentoml()
    try:
        return list(bentoml.models.list(MODEL_NAME))
    except bentoml.exceptions.NotFound:  # the store has no cir-cot model yet
        return []


def _set_labels(model, **changes: str) -> None:
    """Rewrite a stored model's labels. BentoML keeps them in the entry's model.yaml and has no
    public call to change them after saving; this rebuilds the (immutable) info with the new labels
    and writes it back. Tested in tests/test_evaluate.py against the pinned BentoML."""
    info = model.info
    model._info = type(info)(tag=info.tag, module=info.module, labels={**info.labels, **changes}, options=info._options,
                             metadata=info.metadata, context=info.context, signatures=info.signatures,
                             api_version=info.api_version, creation_time=info.creation_time)
    model.flush()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _promoted_at(model) -> str:
    return model.info.labels.get("promoted_at", "")


def list_models() -> list[dict]:
    """Every stored ``cir-cot`` entry, newest promotion first: tag, stage, labels, path."""
    out = [{"tag": str(m.tag), "version": m.tag.version, "stage": m.info.labels.get("stage"),
            "labels": dict(m.info.labels), "path": m.path} for m in _entries()]
    return sorted(out, key=lambda d: d["labels"].get("promoted_at", ""), reverse=True)


def production() -> dict | None:
    """The production entry (tag, labels, metadata, path), or None."""
    prod = [m for m in _entries() if m.info.labels.get("stage") == "production"]
    if not prod:
        return None
    m = max(prod, key=_promoted_at)
    return {"tag": str(m.tag), "version": m.tag.version, "labels": dict(m.info.labels),
            "metadata": dict(m.info.metadata), "path": m.path}


def production_metrics(dataset: str, split: str) -> dict | None:
    """``{"version", "metrics"}`` of the production model on ``dataset``/``split`` (the gate's
    regression baseline), or None."""
    prod = production()
    if prod is None:
        return None
    evaluations = prod["metadata"].get("evaluations", {})
    metrics = evaluations.get(f"{dataset}/{split}")
    return {"version": prod["version"], "metrics": metrics or {}}


def promote(model_dir: str | os.PathLike, *, version: str, labels: dict[str, str], metadata: dict | None = None,
            stage: str = "production", force: bool = False) -> dict:
    """Save the model folder into the store as ``cir-cot:<version>`` with ``labels`` and ``stage``.
    Promoting to production archives the previous production entry. Idempotent: an entry that
    already exists is not copied again, only its stage updated if it differs; an entry an
    operator rolled back stays so unless ``force``. Returns ``{"tag", "stage", "changed",
    "previous", "reason"}``."""
    if stage not in ("production", "candidate"):
        raise ValueError(f"stage must be 'production' or 'candidate', not {stage!r}")
    bentoml = _bentoml()
    model_dir = Path(model_dir)
    if not (model_dir / "circot.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a saved CIR-CoT model (no circot.json)")
    tag = f"{MODEL_NAME}:{version}"
    now = _now()
    previous = production()
    try:
        existing = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        existing = None
    unchanged = {"tag": tag, "changed": False, "previous": previous["tag"] if previous else None}
    if existing is not None and existing.info.labels.get("stage") == stage:
        return {**unchanged, "stage": stage, "reason": f"{tag} is already {stage}"}
    if existing is not None and existing.info.labels.get("stage") == "rolled_back" and not force:
        return {**unchanged, "stage": "rolled_back",
                "reason": f"{tag} was rolled back by an operator; promote it with force to make it {stage} again"}
    if existing is None:
        all_labels = {**{k: str(v) for k, v in labels.items()}, "stage": stage, "promoted_at": now}
        with bentoml.models.create(tag, labels=all_labels, metadata=metadata or {}) as entry:
            _copy_model(model_dir, Path(entry.path))
    else:
        _set_labels(existing, stage=stage, promoted_at=now)
    if stage == "production" and previous is not None and previous["tag"] != tag:
        _set_labels(bentoml.models.get(previous["tag"]), stage="archived")
    return {"tag": tag, "stage": stage, "changed": True, "previous": previous["tag"] if previous else None,
            "reason": f"{tag} is now {stage}"}


def _copy_model(model_dir: Path, dest: Path) -> None:
    """The model folder, and for an adapter its base model (as ``base/``), so that the entry loads
    without the pipeline's artifacts."""
    shutil.copytree(model_dir, dest / "model", dirs_exist_ok=True)
    meta = json.loads((model_dir / "circot.json").read_text())
    if meta.get("weights") == "adapter" and meta.get("base_model"):
        base = Path(meta["base_model"])
        if base.is_dir():
            shutil.copytree(base, dest / "base", dirs_exist_ok=True)
            meta["base_model"] = "../base"  # relative to the model folder: resolved by load_promoted
            (dest / "model" / "circot.json").write_text(json.dumps(meta, indent=1))


def rollback() -> dict:
    """Make the most recently archived entry production again; the current one becomes ``rolled_back``.
    Returns ``{"from", "to"}``; raises when there is nothing to roll back to."""
    prod = production()
    archived = sorted((m for m in _entries() if m.info.labels.get("stage") == "archived"), key=_promoted_at,
                      reverse=True)
    if not archived:
        raise LookupError(f"no archived {MODEL_NAME} model to roll back to")
    target = archived[0]
    now = _now()
    if prod is not None:
        _set_labels(_bentoml().models.get(prod["tag"]), stage="rolled_back", rolled_back_at=now)
    _set_labels(target, stage="production", promoted_at=now)
    return {"from": prod["tag"] if prod else None, "to": str(target.tag)}


def model_path(tag: str | None = None) -> Path:
    """The model folder of ``tag`` (default: the production entry), for ``CirCoTModel.load``."""
    if tag is None:
        prod = production()
        if prod is None:
            raise LookupError(f"no {MODEL_NAME} model is in production in the BentoML store")
        tag = prod["tag"]
    return Path(_bentoml().models.get(tag).path) / "model"


def load_promoted(tag: str | None = None, **kwargs):
    """Load a stored model (default: production) as a ``CirCoTModel``."""
    from model_code.model.cir_cot import CirCoTModel

    return CirCoTModel.load(model_path(tag), **kwargs)
