"""Fine-tune a base checkpoint the way the embedded profile does, then evaluate it on cir-shapes:
the measurement behind the embedded profile's recipe (docs/experiments/2026-11-27-embedded-recipe.md).

    .venv/bin/python bench/finetune_embedded.py --base artifacts/pretrain/tiny84/model \\
        [--align-steps 100] [--cot-steps 150] [--full] [--seed 1] [--queries 500] [--out /tmp/ft] \\
        [--set cot.lambda_info=0.1 --set cot.lr=5e-4 ...] [--reasoning-out chains.jsonl]
    .venv/bin/python bench/finetune_embedded.py --model /tmp/ft/run/model     # evaluate only

Reads the benchmark at ``--data`` (default ``data/raw/synthetic``, what ``make run`` generates) and
writes the oracle's chains of thought itself (the annotations ``make run`` accepts for cir-shapes),
so it needs nothing but the data and the base. Prints the stage summaries, the wall time, the
evaluation table (the first ``--queries`` test queries against the whole 2,000-image test gallery)
and, on all 500, the gate's verdict as ``make run`` would give it.
"""

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def oracle_annotations(root: Path):
    """The accepted-annotations table the pipeline would hold for cir-shapes (oracle teacher)."""
    import pandas as pd

    from model_code.synthetic import generate, scenes
    from model_code.synthetic.oracle import oracle_cot

    rows = []
    for split in generate.SPLITS:
        graphs = json.loads((root / "scene_graphs" / f"{split}.json").read_text())
        for q in json.loads((root / "captions" / f"cap.{split}.json").read_text()):
            cot = oracle_cot(q["query_id"], scenes.scene_from_json(graphs[q["reference"]]), q["edits"])
            rows.append({"query_id": q["query_id"], "status": "ok", "caption": cot.caption,
                         "reasoning": cot.reasoning, "conclusion": cot.conclusion})
    return pd.DataFrame(rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    base = p.add_mutually_exclusive_group(required=True)
    base.add_argument("--base", help="a base checkpoint folder")
    base.add_argument("--model", help="no training: evaluate this saved model (an earlier run's <out>/run/model)")
    p.add_argument("--data", default="data/raw/synthetic")
    p.add_argument("--profile", default="embedded")
    p.add_argument("--align-steps", type=int)
    p.add_argument("--cot-steps", type=int)
    p.add_argument("--full", action="store_true", help="fine-tune every parameter instead of LoRA")
    p.add_argument("--lr", type=float, help="both stages' learning rate")
    p.add_argument("--seed", type=int, help="both stages' seed (LoRA initialisation, batches)")
    p.add_argument("--set", action="append", default=[], metavar="[PART.]FIELD=VALUE",
                   help="any value of the profile, e.g. --set cot.lr=5e-4 --set align.steps=40 --set lora=true "
                        "(repeatable)")
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--methods", nargs="+", default=["cot", "no_cot", "image_only"])
    p.add_argument("--out", default=None)
    p.add_argument("--reasoning-out", help="write every cot query's generated text and parse here (JSON lines)")
    return p


def configure(profile, args: argparse.Namespace):
    """``profile`` with the command line's settings applied (a new profile: profiles are frozen):
    ``--align-steps``, ``--cot-steps``, ``--lr``, ``--seed``, ``--full``, then each ``--set``
    (``[base.|align.|cot.]FIELD=VALUE``). A setting naming no field raises ValueError."""
    stage = {k: v for k, v in (("lr", args.lr), ("seed", args.seed)) if v is not None}
    profile = profile.with_overrides(
        align={**stage, **({"steps": args.align_steps} if args.align_steps else {})},
        cot={**stage, **({"steps": args.cot_steps} if args.cot_steps else {})},
        **({"lora": False} if args.full else {}))
    try:
        return profile.with_settings(args.set)
    except ValueError as e:
        raise ValueError(f"--set: {e}") from None


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from model_code.data import read_dataset
    from model_code.evaluation.evaluate import evaluate
    from model_code.evaluation.report import markdown_table
    from model_code.model.cir_cot import CirCoTModel
    from model_code.model.recipes import PROFILES, pair_examples, register_checkpoint, train_cir_cot

    root = Path(args.data).resolve()
    out = Path(args.out or tempfile.mkdtemp(prefix="finetune-"))
    try:
        profile = configure(PROFILES[args.profile], args)
    except ValueError as e:
        p.error(str(e))
    bench = read_dataset("synthetic", root)
    stages, train_s = {}, 0.0
    if args.base:
        ann = oracle_annotations(root)
        t0 = time.monotonic()
        trained = train_cir_cot(register_checkpoint(args.base),
                                pair_examples(bench.triplets, bench.images, root, "train", ann),
                                pair_examples(bench.triplets, bench.images, root, "val", ann), profile, out / "run")
        train_s, stages = time.monotonic() - t0, trained.stages
    model = CirCoTModel.load(trained.path if args.base else args.model, device="cpu")
    t0 = time.monotonic()
    ev = evaluate(model, bench, root, "synthetic", "test", methods=args.methods, limit=args.queries)
    eval_s = time.monotonic() - t0
    for name, s in stages.items():
        print(f"# {name}: {s['steps']} steps, {s['seconds']:.0f}s, loss {s['first']['loss']:.3f} -> "
              f"{s['last']['loss']:.3f}, val {json.dumps(s['val'])}")
    print(f"# lora={profile.lora} training {train_s:.0f}s, evaluation {eval_s:.0f}s ({args.queries} queries)")
    print(markdown_table(ev))
    print(json.dumps(ev.metrics, indent=1))
    if args.queries >= 500:   # the gate's verdict, as make run would give it (no production model yet)
        from model_code.benchmarks import benchmark
        from model_code.evaluation.gate import GateConfig, gate

        verdict = gate(ev.metrics, ev.headline, GateConfig(floors=dict(benchmark("synthetic").gate_floors)),
                       per_query=ev.per_query, strata=ev.strata)
        print(f"# gate: {'PASS' if verdict.passed else 'REFUSE'}")
        for c in verdict.checks:
            print(f"- {'PASS' if c.passed else 'FAIL'} {c.name}: {c.detail}")
    if args.reasoning_out:
        with open(args.reasoning_out, "w") as f:
            for row in ev.queries.to_dict("records"):
                r = ev.reasoning.get(row["query_id"], {})
                f.write(json.dumps({"query_id": row["query_id"], "reference_id": row["reference_id"],
                                    "modification": row["modification"],
                                    "text": r.get("text"), "error": r.get("error")}, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
