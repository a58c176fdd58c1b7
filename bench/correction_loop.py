"""The correction loop, simulated: the oracle plays a person who corrects the model's chains of train
queries and picks the target, as the page would record it; then the pipeline's feedback job, its
training job and its evaluation job run as after a real week of corrections. Prints the test
split's figures before and after (docs/feedback.md).

    .venv/bin/python bench/correction_loop.py --queries 300 [--k 50] [--dry-run]

Needs a finished ``make run`` (its Dagster instance, model and tables, and the model store it promotes
into: ``DAGSTER_HOME`` and ``BENTOML_HOME`` default to ``.dagster`` and ``.bentoml`` as under ``make``;
a promotion goes there as any). Writes what the service would
write into the artifacts root's feedback store (``<artifacts>/feedback/synthetic/``, under the token
``oracle-person``): for each of the first ``--queries`` train queries, the model's CoT answer, and where
its chain differs from the oracle's, a corrected search (each wrong section replaced by the oracle's)
and a pick of the target when the corrected ranking shows it within ``--k``. The rankings are over a
gallery of the train images those queries name (the service would serve the whole train split:
``CIRCOT_GALLERY_EXTRA_SPLITS=train``). Then runs the ``feedback`` job, the ``training`` job (the
model retrained on the benchmark and the accepted feedback, ``CIRCOT_FEEDBACK_WEIGHT``) and the
``evaluation`` job, and prints the evaluation before and after. ``--dry-run`` stops after writing the
feedback (the counts only).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOKEN = "oracle-person"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=300, help="the first train queries the oracle corrects")
    p.add_argument("--k", type=int, default=50, help="results shown: the person picks the target among them")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--dry-run", action="store_true", help="write the feedback, run no job")
    return p


def simulate(args) -> dict:
    """Write the oracle's corrections and picks into the feedback store; returns the counts."""
    import torch

    from assets.resources import ArtifactStore
    from bench.diagnose_embedded import _latest, _load
    from model_code.annotation.store import annotation_requests
    from model_code.chain import SECTIONS, CoT, changed_sections
    from model_code.feedback import FeedbackStore
    from model_code.model.cir_cot import CirCoTModel
    from model_code.retrieval import embed_with_chains, infer
    from model_code.settings import PipelineSettings, load
    from model_code.synthetic.oracle import OracleAnnotator

    root, bench, _ = _load(Path("artifacts"))
    record = _latest(Path("artifacts"))
    model = CirCoTModel.load(record["path"])
    train = bench.triplets[bench.triplets.split == "train"].iloc[: args.queries]
    im = bench.images.set_index("image_id")
    named = sorted({*train.reference_id, *(i for ids in train.target_ids for i in ids)})
    paths = {i: Path(root) / im.path[i] for i in named}
    started = time.time()
    gallery = model.embed_images([paths[i] for i in named], batch_size=64)
    oracle = {a.query_id: a for a in OracleAnnotator(root).annotate(
        annotation_requests(train, bench.images, root, ["train"]))}
    refs = [paths[r] for r in train.reference_id]
    texts = list(train.modification)
    chains, decoded = [], []
    for start in range(0, len(texts), 32):
        emb, part = infer(model, refs[start:start + 32], texts[start:start + 32], "cot")
        decoded += list(torch.as_tensor(emb))   # rows ranked against the gallery's tensor
        chains += part

    def ranked(emb, reference_id: str) -> tuple[list[str], list[float]]:   # the top k, the reference left out
        order = sorted((i for i in range(len(named)) if named[i] != reference_id),
                       key=lambda i: -float(gallery[i] @ emb))[: args.k]
        return [named[i] for i in order], [float(gallery[i] @ emb) for i in order]

    store = FeedbackStore(ArtifactStore(root=load(PipelineSettings)[0].artifacts).dir("feedback", args.dataset),
                          args.dataset)
    counts = {"queries": len(texts), "unparsed": 0, "already_right": 0, "corrected": 0, "picked": 0,
              "target_not_shown": 0}
    per_section = dict.fromkeys(SECTIONS, 0)
    for q, ref, text, chain, cot_emb in zip(train.itertuples(), refs, texts, chains, decoded):
        if chain["error"] is not None:
            counts["unparsed"] += 1
            continue
        truth = oracle[q.query_id]
        changed = changed_sections(chain, truth)
        if not changed:
            counts["already_right"] += 1
            continue
        person = {s: getattr(truth if s in changed else CoT(chain["caption"], chain["reasoning"],
                                                              chain["conclusion"]), s) for s in SECTIONS}
        emb = embed_with_chains(model, [ref], [text], [CoT(**person)])[0]
        shown, scores = ranked(emb, q.reference_id)
        data = ref.read_bytes()
        first_shown, first_scores = ranked(cot_emb, q.reference_id)   # what the model's own chain ranked
        asked = store.record_query(reference=data, suffix=ref.suffix, modification=text,
                                   model_version=record["version"], mode="cot", chain=chain, shown=first_shown,
                                   scores=first_scores, token=TOKEN)
        first = store.query(asked)
        answer = store.record_query(reference=data, suffix=ref.suffix, modification=text,
                                    model_version=record["version"], mode="corrected", chain=person,
                                    shown=shown, scores=scores, token=TOKEN, corrects=first)
        store.record_correction(first, answer, TOKEN, person, changed)
        counts["corrected"] += 1
        for s in changed:
            per_section[s] += 1
        target = q.target_ids[0]
        if target in shown:
            store.add(answer, TOKEN, chosen=target, rejected=shown[: shown.index(target)])
            counts["picked"] += 1
        else:
            counts["target_not_shown"] += 1
    counts["sections_changed"] = per_section
    counts["seconds"] = round(time.time() - started, 1)
    return counts


def main(argv: list[str] | None = None) -> int:
    import os

    from bench.diagnose_embedded import _record

    args = parser().parse_args(argv)
    repo = Path(__file__).resolve().parents[1]   # the instance and the model store of `make run`
    os.environ.setdefault("DAGSTER_HOME", str(repo / ".dagster"))
    os.environ.setdefault("BENTOML_HOME", str(repo / ".bentoml"))
    before = _record("evaluation", args.dataset)
    counts = simulate(args)
    print("the oracle's corrections:", counts, flush=True)
    if args.dry_run:
        return 0
    from orchestration.__main__ import instance, run_job
    from orchestration.definitions import EVALUATION_JOB, FEEDBACK_JOB, TRAINING_JOB

    os.environ.setdefault("CIRCOT_FEEDBACK_CAP_PER_TOKEN", str(max(100, args.queries)))
    dagster = instance()
    for job in (FEEDBACK_JOB, TRAINING_JOB, EVALUATION_JOB):
        if not run_job(job, args.dataset, dagster_instance=dagster):
            print(f"the {job} job did not succeed: stopping")
            return 1
    after = _record("evaluation", args.dataset)
    for label, record in (("before", before), ("after", after)):
        m = record.get("metrics", {})
        print(label, record.get("model_version"), {method: {k: round(v, 3) for k, v in m.get(method, {}).items()
                                                           if k.startswith("R@")} for method in m})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
