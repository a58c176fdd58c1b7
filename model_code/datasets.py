"""Dataset hooks: what generic code (training, evaluation) may need from one benchmark, by name.

Generic code never imports a benchmark's package; it asks ``hooks(dataset)`` and uses what the
benchmark registered, or does without. A benchmark package fills the registry in when imported
(``register``); the packages to import are listed in ``PLUGINS`` (the one place that names them).

- ``pretraining``: the embedded base's pretraining corpus (a module or object with ``EDIT_OPS``,
  ``make_samples(cfg, folder, exclude=, progress=)``, ``excluded_scenes(root)`` and
  ``matches(texts, truths)``; see ``model_code.model.pretrain``).
- ``annotator(raw_root)`` → an ``Annotator`` (``model_code.annotation.judge``) that writes true chains
  from the benchmark's own ground truth (the oracle teacher of a synthetic benchmark).
- ``reasoning_correctness(root, split, queries, reasoning)`` → ``{metric: value}``: whether the
  generated conclusions state what the target images show (the evaluation's reasoning metrics).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

PLUGINS = ("model_code.synthetic.hooks",)


@dataclasses.dataclass(frozen=True)
class DatasetHooks:
    reasoning_correctness: Callable | None = None
    pretraining: object | None = None
    annotator: Callable | None = None


_REGISTRY: dict[str, DatasetHooks] = {}
_loaded = False


def register(dataset: str, dataset_hooks: DatasetHooks) -> None:
    _REGISTRY[dataset] = dataset_hooks


def hooks(dataset: str) -> DatasetHooks:
    """The hooks ``dataset`` registered (none set when it registered nothing)."""
    global _loaded
    if not _loaded:
        for module in PLUGINS:
            importlib.import_module(module)
        _loaded = True
    return _REGISTRY.get(dataset, DatasetHooks())
