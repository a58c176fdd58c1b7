"""Dataset hooks: what generic code (training, evaluation, annotation) may need from one benchmark.

Generic code never imports a benchmark's package; it asks the benchmark's spec
(``BenchmarkSpec.hooks``, ``model_code.benchmarks``), whose ``hooks_at`` names the benchmark's
:class:`DatasetHooks`, and uses what is set or does without.

- ``pretraining``: the embedded base's pretraining corpus (a module or object with ``EDIT_OPS``,
  ``make_samples(cfg, folder, exclude=, progress=)``, ``excluded_scenes(root)`` and
  ``matches(texts, truths)``, and optionally ``resolution_scores(generated, oracle)``: which object
  each phrase means, scored per kind of phrase; see ``model_code.model.pretrain``).
- ``annotator(raw_root)`` → an ``Annotator`` (``model_code.annotation.judge``) that writes true chains
  from the benchmark's own ground truth (the oracle teacher of a synthetic benchmark).
- ``reasoning_correctness(root, split, queries, reasoning)`` → ``{metric: value}``: whether the
  generated conclusions state what the target images show (the evaluation's reasoning metrics).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class DatasetHooks:
    reasoning_correctness: Callable | None = None
    pretraining: object | None = None
    annotator: Callable | None = None
