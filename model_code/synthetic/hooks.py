"""What cir-shapes lends generic code (``HOOKS``, which its spec names; ``model_code.datasets``): the
pretraining corpus of the embedded base, the oracle annotator, and the correctness of a generated
conclusion read back into objects."""

from __future__ import annotations

import json
import os
from pathlib import Path

from model_code.datasets import DatasetHooks
from model_code.synthetic import pretraining, scenes
from model_code.synthetic.oracle import OracleAnnotator, object_match, scene_from_text


def reasoning_correctness(root: str | os.PathLike, split: str, queries, reasoning: dict[str, dict]) -> dict[str, float]:
    """Whether each generated conclusion states the target's objects: every object's size, colour,
    shape and place (``conclusion_exact``), and the F1 of the stated objects against the target's
    (``conclusion_object_f1``); a chain that did not parse states nothing."""
    graphs = json.loads((Path(root) / "scene_graphs" / f"{split}.json").read_text())
    exact = 0
    f1s = []
    for qid, targets in zip(queries["query_id"], queries["target_ids"]):
        r = reasoning.get(qid) or {}
        cot = r.get("cot")
        truth = {scenes.scene_key((o,))[0] for o in scenes.scene_from_json(graphs[targets[0]])}
        same, f1 = object_match(scene_from_text(cot.conclusion) if cot is not None else set(), truth)
        exact += same
        f1s.append(f1)
    n = max(len(queries), 1)
    return {"conclusion_exact": exact / n, "conclusion_object_f1": sum(f1s) / n}


HOOKS = DatasetHooks(reasoning_correctness=reasoning_correctness, pretraining=pretraining, annotator=OracleAnnotator)
