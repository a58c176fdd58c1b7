"""The promoted models in the BentoML model store (docs/architecture.md §7): model ``cir-cot``.

Each promoted model is one store entry tagged ``cir-cot:<model version>`` holding the saved model
folder (``CirCoTModel.save``, with its model card ``README.md``: model_code/model_card.py) plus, for
an adapter, its base model's files, so the entry is self-contained. A deployment serves one
dataset's model, so stages are per dataset: the label ``stage_<dataset>`` is ``production``,
``candidate``, ``archived`` (production moved past it) or ``rolled_back`` (an operator rolled it
back), with ``promoted_at_<dataset>``, ``evaluated_on_<dataset>`` and ``headline_<dataset>`` beside
it; the data / annotation / model versions are labels too, and the metadata holds each dataset's
evaluation metrics and gate verdict.

Per dataset exactly one entry is ``production`` at a time. Promoting a new model on a dataset
archives that dataset's previous production model (it stays in the store, and stays production on
the other datasets); :func:`rollback` restores the most recently archived one of the dataset and
marks the current one ``rolled_back``; promoting a model that is already production changes
nothing, and a rolled-back model is not promoted again unless forced.

The store is ``$BENTOML_HOME/models`` (default ``~/bentoml``). This module is what the pipeline
(the ``promoted_model`` asset) and the service share; it imports no orchestrator.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import time
from pathlib import Path

from model_code.common import atomic_path
from model_code.model_card import CARD_NAME

# bentoml, model_code.model.cir_cot (torch): imported where used (slow to import; the command line, the
# Dagster assets and the service load this module)

log = logging.getLogger(__name__)

MODEL_NAME = "cir-cot"
STAGES = ("production", "candidate", "archived", "rolled_back")


def _bentoml():
    import bentoml

    return bentoml


def lineage(trained, evaluation, verdict: dict) -> tuple[dict[str, str], dict]:
    """The labels and metadata a promoted entry carries: the model and base versions, the dataset it was
    trained on, where it was evaluated (zero-shot from which dataset, where the two differ) and its
    headline, the data, annotations and teacher of every training dataset, and
    (metadata) the metrics, the gate verdict and the training stages. ``trained`` is the
    ``TrainedModel`` record, ``evaluation`` the ``EvaluationRecord`` that evaluated it."""
    name, split = evaluation.dataset, evaluation.split
    cot = evaluation.metrics.get("cot", {})
    labels = {"model_version": trained.version, "base_version": trained.base_version,
              f"evaluated_on_{name}": f"{name}/{split}",
              f"headline_{name}": f"{evaluation.headline}={cot.get(evaluation.headline, float('nan')):.4f}"}
    for metric in ("R@1", "R@10", "Avg", "mAP@10"):
        if metric in cot:
            labels[f"cot_{metric}_{name}"] = f"{cot[metric]:.4f}"
    if trained.dataset:
        labels["trained_on"] = trained.dataset
    if evaluation.zero_shot_from:
        labels[f"zero_shot_from_{name}"] = evaluation.zero_shot_from
    for dataset, v in trained.data.items():
        labels[f"data_{dataset}"] = v["raw"]
        labels[f"annotations_{dataset}"] = v["annotations"]
        labels[f"teacher_{dataset}"] = f"{v['teacher']}/{v['prompt_version']}"
    metadata = {"evaluations": {f"{name}/{split}": cot}, "all_metrics": {name: evaluation.metrics},
                "gates": {name: verdict}, "training": trained.stages}
    return labels, metadata


def stage_label(dataset: str) -> str:
    return f"stage_{dataset}"


def store_path() -> Path:
    """Where BentoML keeps models: ``$BENTOML_HOME/models`` (BentoML's default home is ``~/bentoml``)."""
    return Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml").expanduser() / "models"


def broken_entries() -> list[tuple[str, str]]:
    """``(tag, why)`` of the ``cir-cot`` entries that cannot be read (e.g. a truncated model.yaml)."""
    return _scan()[1]


def _scan() -> tuple[list, list[tuple[str, str]]]:
    """The readable entries and the broken ones. ``bentoml.models.list`` fails as a whole on one
    unreadable entry, so each version folder is read on its own and a broken one reported and skipped."""
    bentoml = _bentoml()
    folder = store_path() / MODEL_NAME
    good, broken = [], []
    if not folder.is_dir():
        return good, broken
    for version in sorted(p.name for p in folder.iterdir() if p.is_dir()):
        tag = f"{MODEL_NAME}:{version}"
        try:
            good.append(bentoml.models.get(tag))
        except Exception as e:  # noqa: BLE001 - whatever BentoML raises on a damaged entry
            broken.append((tag, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
    for tag, why in broken:
        log.warning("model store %s: skipping %s, which cannot be read (%s)", store_path(), tag, why)
    return good, broken


def _entries() -> list:
    return _scan()[0]


def _rewrite_info(model, *, labels: dict[str, str] | None = None, metadata: dict | None = None) -> None:
    """Change a stored model's labels and metadata in place. BentoML 1.4 has no public call for it
    (``bentoml.models`` offers create/get/list/delete/import/export/push/pull only; the entry's
    ``model.yaml`` is written from its immutable ``ModelInfo``), so this, the one place that touches
    BentoML internals (``Model._info``, ``ModelInfo._options``), builds a new info with the changes and
    flushes it. Covered by the store tests against the pinned BentoML."""
    info = model.info
    model._info = type(info)(tag=info.tag, module=info.module, labels={**info.labels, **(labels or {})},
                             options=info._options, metadata={**info.metadata, **(metadata or {})},
                             context=info.context, signatures=info.signatures, api_version=info.api_version,
                             creation_time=info.creation_time)
    model.flush()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _promoted_at(model, dataset: str) -> str:
    return model.info.labels.get(f"promoted_at_{dataset}", "")


def _stages(labels: dict) -> dict[str, str]:
    return {k[len("stage_"):]: v for k, v in labels.items() if k.startswith("stage_")}


def health(entry_path: str | os.PathLike, *, hashes: bool = False) -> str:
    """"ok", or what is wrong with a stored entry's model folder (a file missing, or not as saved:
    its size, and when ``hashes`` its content: every file's md5 and the version recomputed from the
    weights, ``check_model_folder``)."""
    from model_code.model.cir_cot import ModelFolderError, check_model_folder

    try:
        check_model_folder(Path(entry_path) / "model", hashes=hashes)
    except ModelFolderError as e:
        return f"damaged: {e}"
    return "ok"


def list_models(*, verify: bool = False) -> list[dict]:
    """Every stored ``cir-cot`` entry, newest promotion first: tag, stages per dataset, labels, path,
    health (:func:`health`: the files' sizes, fast; with ``verify`` their content, which reads every
    byte) and the seconds that check took."""
    out, entries = [], _entries()
    if entries:
        import model_code.model.cir_cot  # noqa: F401 - torch's import (seconds) before the checks, not in their timings
    for m in entries:
        start = time.perf_counter()
        state = health(m.path, hashes=verify)
        out.append({"tag": str(m.tag), "version": m.tag.version, "stages": _stages(m.info.labels),
                    "labels": dict(m.info.labels), "path": m.path, "health": state,
                    "checked_s": time.perf_counter() - start})
    newest = lambda d: max((v for k, v in d["labels"].items() if k.startswith("promoted_at_")), default="")  # noqa: E731
    return sorted(out, key=newest, reverse=True)


def production(dataset: str) -> dict | None:
    """The production entry of ``dataset`` (tag, version, labels, metadata, path), or None."""
    prod = [m for m in _entries() if m.info.labels.get(stage_label(dataset)) == "production"]
    if not prod:
        return None
    m = max(prod, key=lambda e: _promoted_at(e, dataset))
    return {"tag": str(m.tag), "version": m.tag.version, "labels": dict(m.info.labels),
            "metadata": dict(m.info.metadata), "path": m.path}


def require_production(dataset: str) -> dict:
    """The production entry of ``dataset``, or a LookupError that says what to run (the service and
    the gallery index both start from it)."""
    prod = production(dataset)
    if prod is None:
        raise LookupError(f"no production model of {dataset} in the model store at {store_path()}: run "
                          "`make run` (or promote one with the evaluate_and_promote job) first")
    return prod


def production_metrics(dataset: str, split: str) -> dict | None:
    """``{"version", "metrics"}`` of ``dataset``'s production model on ``dataset``/``split`` (the
    gate's regression baseline), or None."""
    prod = production(dataset)
    if prod is None:
        return None
    metrics = prod["metadata"].get("evaluations", {}).get(f"{dataset}/{split}")
    return {"version": prod["version"], "metrics": metrics or {}}


def promote(model_dir: str | os.PathLike, *, version: str, dataset: str, labels: dict[str, str],
            metadata: dict | None = None, stage: str = "production", force: bool = False) -> dict:
    """Store the model folder as ``cir-cot:<version>`` (once) and make it ``stage`` for ``dataset``
    with ``labels``; ``metadata`` is merged into the entry's (its ``evaluations`` per dataset/split).
    Promoting to production archives ``dataset``'s previous production entry. Idempotent: a model
    already at that stage for that dataset changes nothing; one an operator rolled back stays so
    unless ``force``. Returns ``{"tag", "stage", "changed", "previous", "reason"}``."""
    if stage not in ("production", "candidate"):
        raise ValueError(f"stage must be 'production' or 'candidate', not {stage!r}")
    bentoml = _bentoml()
    model_dir = Path(model_dir)
    from model_code.model.cir_cot import ModelFolderError, check_model_folder

    # every file the model names is there and is what was saved, and its version (recomputed from its
    # weights, equal to the one its circot.json states) is the record's, before any label changes
    meta, _ = check_model_folder(model_dir, hashes=True)
    if meta.get("version") != version:
        raise ValueError(f"the model at {model_dir} is version {meta.get('version')}, not {version}: "
                         "promote it under its own version")
    tag = f"{MODEL_NAME}:{version}"
    key = stage_label(dataset)
    previous = production(dataset)
    try:
        existing = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        existing = None
    unchanged = {"tag": tag, "changed": False, "previous": previous["tag"] if previous else None}
    repaired = ""
    if existing is not None:
        try:
            check_model_folder(Path(existing.path) / "model", hashes=True)
        except ModelFolderError as e:   # a damaged entry is restored from this good copy, whatever its stage
            log.warning("model store: %s is damaged (%s); restoring it from %s", tag, e, model_dir)
            shutil.rmtree(Path(existing.path) / "model", ignore_errors=True)
            _copy_model(model_dir, Path(existing.path))
            repaired = f"{tag} was damaged ({e}) and is restored from {model_dir}; "
            unchanged = {**unchanged, "changed": True}
    if existing is not None:
        _copy_card(model_dir, Path(existing.path))
    current = existing.info.labels.get(key) if existing is not None else None
    if current == stage:
        return {**unchanged, "stage": stage, "reason": f"{repaired}{tag} is already {stage} for {dataset}"}
    if current == "production" and stage != "production" and not force:
        return {**unchanged, "stage": current,
                "reason": f"{tag} is the production model of {dataset}: making it {stage} would leave {dataset} "
                          f"without one (promote another model, roll back, or force)"}
    if current == "rolled_back" and not force:
        return {
            **unchanged,
            "stage": "rolled_back",
            "reason": f"{tag} was rolled back by an operator on {dataset}; "
            f"promote it with force to make it {stage} again",
        }
    new_labels = {**{k: str(v) for k, v in labels.items()}, key: stage, f"promoted_at_{dataset}": _now()}
    metadata = dict(metadata or {})
    if existing is None:
        with bentoml.models.create(tag, labels=new_labels, metadata=metadata) as entry:
            _copy_model(model_dir, Path(entry.path))
    else:
        merged = dict(existing.info.metadata)
        for k, v in metadata.items():  # per-dataset dicts (evaluations, gates) are merged, not replaced
            merged[k] = {**merged[k], **v} if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
        _rewrite_info(existing, labels=new_labels, metadata=merged)
    if stage == "production" and previous is not None and previous["tag"] != tag:
        _rewrite_info(bentoml.models.get(previous["tag"]), labels={key: "archived"})
    return {"tag": tag, "stage": stage, "changed": True, "previous": previous["tag"] if previous else None,
            "reason": f"{tag} is now {stage} for {dataset}"}


def _copy_model(model_dir: Path, dest: Path) -> None:
    """The model folder, and for an adapter its base model (as ``base/``), so that the entry loads
    without the pipeline's artifacts."""
    shutil.copytree(model_dir, dest / "model", dirs_exist_ok=True)
    meta = json.loads((model_dir / "circot.json").read_text())
    if meta.get("weights") == "adapter" and meta.get("base_model"):
        base = Path(meta["base_model"])
        if base.is_dir():
            shutil.copytree(base, dest / "base", dirs_exist_ok=True)
            meta["base_model"] = "../base"  # relative to the model folder: resolved by CirCoTModel.load
            (dest / "model" / "circot.json").write_text(json.dumps(meta, indent=1))


def _copy_card(model_dir: Path, entry: Path) -> None:
    """The model card (``README.md``, rewritten after each evaluation of the model) into a stored entry
    that already holds the model, so the entry's card lists every evaluation and verdict known. The
    card is outside the model's file manifest: this never makes an entry look damaged."""
    card = model_dir / CARD_NAME
    if card.is_file() and (entry / "model").is_dir():
        with atomic_path(entry / "model" / CARD_NAME) as tmp:
            shutil.copyfile(card, tmp)


def rollback(dataset: str) -> dict:
    """Make ``dataset``'s most recently archived entry its production model again; the current one
    becomes ``rolled_back``. Returns ``{"from", "to"}``; raises when there is nothing to roll back to."""
    key = stage_label(dataset)
    prod = production(dataset)
    archived = sorted((m for m in _entries() if m.info.labels.get(key) == "archived"),
                      key=lambda e: _promoted_at(e, dataset), reverse=True)
    if not archived:
        raise LookupError(f"no archived {MODEL_NAME} model of {dataset} to roll back to")
    target = archived[0]
    state = health(target.path)
    if state != "ok":
        raise LookupError(f"cannot roll {dataset} back to {target.tag}: it is {state} "
                          "(promote a good copy of it again to repair it)")
    now = _now()
    if prod is not None:
        _rewrite_info(_bentoml().models.get(prod["tag"]), labels={key: "rolled_back", f"rolled_back_at_{dataset}": now})
    _rewrite_info(target, labels={key: "production", f"promoted_at_{dataset}": now})
    return {"from": prod["tag"] if prod else None, "to": str(target.tag)}


def model_path(tag: str | None = None, *, dataset: str | None = None) -> Path:
    """The model folder of ``tag``, or of ``dataset``'s production entry, for ``CirCoTModel.load``."""
    if tag is None:
        if dataset is None:
            raise ValueError("give a tag or the dataset whose production model to load")
        prod = production(dataset)
        if prod is None:
            raise LookupError(f"no {MODEL_NAME} model is in production for {dataset} in the BentoML store")
        tag = prod["tag"]
    return Path(_bentoml().models.get(tag).path) / "model"


def load_promoted(tag: str | None = None, *, dataset: str | None = None, verify: bool = True, **kwargs):
    """Load a stored model (``tag``, or ``dataset``'s production model) as a ``CirCoTModel``, verified by
    content first unless ``verify`` is off (every file's md5 and the version recomputed from the
    weights: a file damaged in the store is a ``ModelFolderError`` naming it, never a model that
    serves wrong answers; what it costs: docs/evaluation.md)."""
    from model_code.model.cir_cot import CirCoTModel

    return CirCoTModel.load(model_path(tag, dataset=dataset), verify=verify, **kwargs)
