"""The command line of the pipeline: ``circot`` (the console script the project installs), or
equivalently ``python -m orchestration``.

``circot run --dataset synthetic`` runs the pipeline in this process, recorded in the Dagster
instance of ``$DAGSTER_HOME`` (so the runs show in ``dagster dev``), and prints what each run
produced: the data job for the dataset partition (raw data, triplets, annotations), the training job
(base model, CIR-CoT model), then the evaluation job (evaluation, promotion gate, promoted model),
ending with the evaluation table.

``circot run --dataset cirr`` does the same for CIRR: its data, its own model trained on its train
split, its evaluation; ``--dataset circo`` (no train split) evaluates the model of
``CIRCOT_ZERO_SHOT_SOURCE`` zero-shot. ``circot benchmarks`` lists the benchmarks and what each needs;
``circot models`` lists the promoted models in the BentoML store (``--verify``: each checked by content);
``circot rollback`` puts the previous production model back and delivers it (``circot deliver``: the
production model's delivery again; docs/deployment.md).

For a CPU try of a real benchmark without a teacher or a base model: ``circot chains-from-text``
writes placeholder chains for the file teacher (``CIRCOT_TEACHER=file``), and ``circot micro-model``
a micro Qwen2-VL checkpoint to train on (``CIRCOT_BASE_MODEL_PATH``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from model_code import registry
from model_code.annotation.chains_file import chains_from_text, write_chains_file
from model_code.backbone import MICRO_MANIFEST, build_micro_checkpoint, texts_from_files
from model_code.benchmarks import BENCHMARKS, benchmark, model_source, zero_shot_note
from model_code.data import DataError, read_dataset
from model_code.settings import PipelineSettings, environment_errors, load

SHOWN = (
    "data_version",
    "dagster/row_count",
    "images",
    "ok",
    "rejected",
    "model_version",
    "steps",
    "align_loss",
    "cot_loss",
    "val_in_batch_accuracy",
    "val_in_batch_accuracy_align",
    "val_in_batch_accuracy_cot",
    "wall_time_s",
    "split",
    "queries",
    "cot_queries_per_s",
    "no_cot_queries_per_s",
    "tag",
    "export_mib",
    "target",
    "stage",
    "changed",
    "previous_production",
)


def instance():
    """The Dagster instance of ``$DAGSTER_HOME`` (what ``dagster dev`` shows), else an ephemeral one."""
    import dagster as dg

    return dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()


def run_job(job_name: str, partition: str | None = None, definitions=None, run_config: dict | None = None,
            dagster_instance=None, asset_selection=None, verbose: bool = False) -> bool:
    """Execute one job; print its materialisations and check verdicts; True when all went well.
    Jobs that follow one another must share ``dagster_instance``: each reads its inputs from the
    materialisations the instance recorded. Dagster's log lines: INFO and above on the console, every
    event in the run's log file in ``$DAGSTER_HOME`` (``verbose``: DEBUG on the console too;
    orchestration/run_log.py)."""
    if definitions is None:
        from orchestration.definitions import defs as definitions
    job = definitions.resolve_job_def(job_name)
    dagster_instance = dagster_instance or instance()
    from orchestration.operations import fail_dead_runs, process_tags

    for run_id in fail_dead_runs(dagster_instance):
        print(f"run {run_id}: its process is gone (killed or crashed); marked failed")
    from orchestration.run_log import log_file, logger_config

    home = os.environ.get("DAGSTER_HOME") if not dagster_instance.is_ephemeral else None
    run_config = {**(run_config or {}), "loggers": logger_config(verbose, home)}
    result = job.execute_in_process(partition_key=partition, instance=dagster_instance, raise_on_error=False,
                                    run_config=run_config, tags=process_tags(), asset_selection=asset_selection)
    label = f"{job_name} [{partition}]" if partition else job_name
    where = f"; every event: {log_file(home, result.run_id)}" if home else ""
    print(f"\n== {label}: {'succeeded' if result.success else 'FAILED'} (run {result.run_id}{where})")
    checks_ok = True
    tables = []
    for event in result.all_events:
        if event.event_type_value == "ASSET_MATERIALIZATION":
            mat = event.event_specific_data.materialization
            meta = mat.metadata
            path = meta.get("path")
            extra = ", ".join(f"{k}={meta[k].value}" for k in SHOWN if k in meta)
            print(f"  asset {mat.asset_key.to_user_string():<16} -> {path.value if path else '-'}  {extra}")
            if "table" in meta:
                tables.append(meta["table"].value)
            if "example" in meta:
                tables.append("An example query through the gallery index:\n" + meta["example"].value.strip("`\n"))
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            ev = event.event_specific_data
            checks_ok &= ev.passed
            print(f"  check {ev.asset_key.to_user_string()}:{ev.check_name:<14} {'passed' if ev.passed else 'FAILED'}"
                  f"  {ev.description or ''}")
            verdict = ev.metadata.get("verdict")
            if verdict is not None:  # the promotion gate explains itself, rule by rule
                print("\n".join("      " + line for line in verdict.value.splitlines()))
        elif event.is_step_failure:
            print(f"  step {event.step_key} failed: {event.event_specific_data.error.message.strip()}")
    for table in tables:
        print("\n" + table)
    return result.success and checks_ok


def run(dataset: str, definitions=None, *, annotations_only: bool = False, train: bool | None = None,
        evaluate: bool | None = None, dagster_instance=None, verbose: bool = False) -> int:
    """The dataset's data job, then (a benchmark with a train split) its training job, then its
    evaluation job with the model trained for it: its own, or zero-shot the configured source's (a
    benchmark without a train split is not annotated: its chains would train nothing)."""
    errors = environment_errors()   # before the definitions load: they read the environment too
    if errors:
        print("The configuration cannot be used:\n" + "\n".join(f"- {e}" for e in errors))
        return 2
    spec = benchmark(dataset)
    train = spec.trains and not annotations_only if train is None else train
    if train and not spec.trains:
        print(f"{spec.title} has no train split: there is no model to train on it (it is evaluated zero-shot with the "
              f"model of CIRCOT_ZERO_SHOT_SOURCE)")
        return 2
    if definitions is None:
        from orchestration.definitions import defs as definitions
    if train:   # before any work: a profile whose base cannot read this dataset's texts
        refusal = definitions.resources["training"].refusal(spec.name)
        if refusal:
            print(f"cir_cot_model[{spec.name}] cannot be trained with this configuration:\n{refusal}")
            return 2
    import dagster as dg

    from orchestration.definitions import EVALUATION_JOB, PIPELINE_JOB, TRAINING_JOB
    dagster_instance = dagster_instance or instance()
    config = {"ops": {"triplets": {"config": {"require_images": False}}}} if annotations_only else None
    from orchestration.operations import pipeline_selection

    if not run_job(PIPELINE_JOB, spec.name, definitions, config, dagster_instance, pipeline_selection(spec.name),
                   verbose=verbose):
        return 1
    if train and not run_job(TRAINING_JOB, spec.name, definitions, None, dagster_instance, verbose=verbose):
        return 1
    from assets.common import ZERO_SHOT_SOURCE  # the source the definitions' asset graph maps CIRCO to

    source = model_source(spec, ZERO_SHOT_SOURCE)
    trained = dagster_instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("cir_cot_model"), asset_partitions=[source.name]), limit=1).records
    if evaluate is None:  # default: evaluate when there is a model trained for this dataset
        evaluate = not annotations_only and bool(trained)
        if not evaluate and not annotations_only:
            if source.name != spec.name:
                print(f"\n{spec.title} is evaluated zero-shot with the model trained on {source.name} "
                      f"(CIRCOT_ZERO_SHOT_SOURCE), and there is none yet: run `make run DATASET={source.name}` "
                      f"first.")
                return 1
            print(f"\nno model trained on {spec.name} yet: nothing to evaluate")
    if evaluate:
        ok = run_job(EVALUATION_JOB, spec.name, definitions, None, dagster_instance, verbose=verbose)

        prod = registry.production(spec.name)
        if not ok:
            print("\nThe model was not promoted (see the promotion gate's verdict above); the store is unchanged.")
        print(f"production model of {spec.name}: {prod['tag'] if prod else 'none'}"
              + (f" ({prod['labels'].get(f'headline_{spec.name}')}, evaluated on "
                 f"{prod['labels'].get(f'evaluated_on_{spec.name}')}"
                 f"{zero_shot_note(spec.name, prod['labels'].get('trained_on'))})" if prod else ""))
        return 0 if ok else 1
    return 0


def show_benchmarks() -> int:
    """The benchmarks the pipeline knows, from their specs: what each needs and how it is scored."""
    settings = load(PipelineSettings)[0]
    roots = settings.dataset_roots()
    for spec in BENCHMARKS.values():
        if spec.configured:
            where = f"{spec.root_env}={roots.get(spec.name, '(unset)')}: {spec.root_layout}"
        else:
            where = f"generated by the DVC stage {spec.dvc_stage!r} into {spec.dvc_out}/"
        trains = (f"trained on its {spec.train_split!r} split" if spec.trains
                  else f"evaluated zero-shot with the model of {model_source(spec, settings.zero_shot_source).name}")
        print(f"{spec.name} ({spec.title})\n  data: {where}\n  splits: {', '.join(spec.splits)}; scored: "
              f"{spec.scored_split}; metrics: {', '.join(spec.metric_names())}; headline {spec.headline}\n"
              f"  {trains}")
    return 0


def show_models(verify: bool = False) -> int:
    """The stored models, their stages per dataset and their health: each file's size against the
    manifest saved with the model (fast), or with ``verify`` its content (every file's md5 and the version
    recomputed from the weights, timed). With ``verify`` the exit status is 1 when an entry is damaged
    or unreadable."""
    rows = registry.list_models(verify=verify)
    broken = registry.broken_entries()
    print(f"BentoML model store: {registry.store_path()}")
    for tag, why in broken:
        print(f"{tag:<32} BROKEN (skipped): {why}")
    if not rows:
        print(f"no {registry.MODEL_NAME} model in the BentoML store at {registry.store_path()}")
    for r in rows:
        labels = r["labels"]
        for dataset, stage in sorted(r["stages"].items()):
            print(f"{r['tag']:<32} {dataset:<10} {stage:<12} {labels.get(f'promoted_at_{dataset}', ''):<28} "
                  f"{labels.get(f'headline_{dataset}', '')} on {labels.get(f'evaluated_on_{dataset}', '?')}"
                  f"{zero_shot_note(dataset, labels.get(f'zero_shot_from_{dataset}'))}")
        if r["health"] != "ok":
            print(f"{r['tag']:<32} DAMAGED: {r['health']} (promote a good copy of it again to repair it)")
        elif verify:
            print(f"{r['tag']:<32} OK: every file's md5 and the version recomputed from the weights are as saved "
                  f"({r['checked_s']:.2f} s)")
    damaged = [r for r in rows if r["health"] != "ok"]
    return 1 if verify and (damaged or broken) else 0


def rollback(dataset: str, store_only: bool = False, definitions=None, dagster_instance=None) -> int:
    """Make the previous production model of ``dataset`` production again in the store, then (unless
    ``store_only``) deliver it (:func:`deliver`): its Bento built, exported and delivered as a promotion
    delivers one (applied to the cluster where CIRCOT_DEPLOY=kubernetes)."""
    try:
        moved = registry.rollback(dataset)
    except LookupError as e:
        print(f"rollback: {e}")
        return 1
    print(f"rollback: production of {dataset} is now {moved['to']} (was {moved['from']})")
    if store_only:
        print("rollback: not delivered (--store-only): a running deployment still serves the model it had")
        return 0
    if deliver(dataset, definitions, dagster_instance):
        print(f"rollback: the store says {moved['to']}, but its delivery failed (above); run it again with "
              f"`circot deliver --dataset {dataset}` once fixed")
        return 1
    return 0


def deliver(dataset: str, definitions=None, dagster_instance=None) -> int:
    """The delivery job for ``dataset``'s production model (its Bento built, exported, delivered)."""
    from orchestration.definitions import DELIVERY_JOB

    if registry.production(dataset) is None:
        print(f"deliver: no production model of {dataset}")
        return 1
    return 0 if run_job(DELIVERY_JOB, dataset, definitions, None, dagster_instance or instance()) else 1


def _fail(command: str, message: str) -> int:
    print(f"{command}: {message}", file=sys.stderr)
    return 2


def chains_from_text_command(dataset: str, root: str, out: str, splits: list[str] | None = None) -> int:
    """Write placeholder chains (``chains_from_text``) for a benchmark's queries: those of ``splits``,
    default every query whose targets are known (the hidden test splits have none)."""
    command = "chains-from-text"
    if dataset not in BENCHMARKS:
        return _fail(command, f"unknown dataset {dataset!r}; known: {', '.join(BENCHMARKS)}")
    if not Path(root).expanduser().is_dir():
        return _fail(command, f"the dataset root {root} does not exist (or is not a folder)")
    try:
        triplets = read_dataset(dataset, Path(root).expanduser(), splits, require_images=False).triplets
    except DataError as e:
        return _fail(command, str(e))
    if splits is None:
        triplets = triplets[[len(t) > 0 for t in triplets["target_ids"]]]
    if triplets.empty:
        return _fail(command, f"{dataset} under {root}: no query to write a chain for")
    try:
        path = write_chains_file(chains_from_text(triplets), out)
    except OSError as e:
        return _fail(command, f"cannot write {out}: {e.strerror or e}")
    counts = ", ".join(f"{s} {n}" for s, n in triplets["split"].value_counts(sort=False).items())
    print(f"wrote {len(triplets)} chains ({dataset}: {counts}) to {path}\n"
          f"They are placeholders made from the query texts alone, with no knowledge of the images: a model "
          f"trained on them learns the format, and its figures mean nothing.\n"
          f"Use them: CIRCOT_TEACHER=file CIRCOT_TEACHER_CHAINS={path}")
    return 0


def micro_model_command(out: str, texts: list[str], vocab_size: int = 2000, seed: int = 0) -> int:
    """Write a micro Qwen2-VL checkpoint whose tokenizer is trained on the texts of ``texts`` (JSON or
    JSON Lines files) and the model's prompts."""
    from model_code.model.cir_cot import PROMPTS

    command = "micro-model"
    try:
        corpus = texts_from_files(texts) + list(PROMPTS.values())
        folder = build_micro_checkpoint(corpus, out, vocab_size=vocab_size, seed=seed)
    except ValueError as e:
        return _fail(command, str(e))
    except OSError as e:
        return _fail(command, f"cannot write {out}: {e.strerror or e}")
    built = json.loads((folder / MICRO_MANIFEST).read_text())
    print(f"wrote a micro Qwen2-VL checkpoint to {folder}: {built['parameters']:,} parameters (random), a "
          f"vocabulary of {built['vocab_size']:,} tokens trained on {built['texts']:,} texts\n"
          f"Use it as the base model: CIRCOT_BASE_MODEL_PATH={folder}")
    return 0


INSTANCE_CONFIG = "telemetry:\n  enabled: false\n"


def project_homes() -> None:
    """Where the project keeps its Dagster instance and BentoML store, as ``make`` sets them
    (``.dagster`` and ``.bentoml`` in the current folder), unless the environment says otherwise:
    the command line outside ``make`` reads and writes the same ones. The instance's ``dagster.yaml``,
    when missing or empty, turns telemetry off (as the Makefile writes it)."""

    os.environ.setdefault("BENTOML_HOME", str(Path.cwd() / ".bentoml"))
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")   # the runs print their own progress lines
    if not os.environ.get("DAGSTER_HOME"):
        os.environ["DAGSTER_HOME"] = str(Path.cwd() / ".dagster")
    home = Path(os.environ["DAGSTER_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.is_file() or not config.read_text().strip():   # a user's own settings are kept
        config.write_text(INSTANCE_CONFIG)


def main(argv: list[str] | None = None, prog: str = "circot") -> int:
    p = argparse.ArgumentParser(prog=prog, description="The CIR-CoT pipeline: run it, list its models, roll one "
                                                       "back; prepare a CPU try of a real benchmark.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser("run", help="materialise the data pipeline for one dataset partition, then train")
    r.add_argument("--dataset", default="synthetic", choices=list(BENCHMARKS))
    r.add_argument("--annotations-only", action="store_true",
                   help="read a real benchmark's annotations without its images (they are not checked)")
    r.add_argument("--train", dest="train", action="store_true", default=None,
                   help="run the training job afterwards (the default for a benchmark with a train split)")
    r.add_argument("--no-train", dest="train", action="store_false", help="skip the training job")
    r.add_argument("--no-evaluate", dest="evaluate", action="store_false", default=None,
                   help="skip the evaluation job (evaluation, promotion gate, promoted model)")
    r.add_argument("-v", "--verbose", action="store_true",
                   help="print every Dagster event (DEBUG: step starts, resource inits, hooks); without it they go "
                        "to the run's log file in $DAGSTER_HOME/run_logs/")
    sub.add_parser("benchmarks", help="list the benchmarks: where their files go, their splits, metrics and models")
    md = sub.add_parser("models", help="list the cir-cot models in the BentoML store and their stages")
    md.add_argument("--verify", action="store_true",
                    help="check every entry by content (each file's md5, the version recomputed from the weights; "
                         "reads every byte) instead of by size; exit status 1 when one is damaged")
    rb = sub.add_parser("rollback", help="make a dataset's previous production model its production model again, "
                                         "and deliver it (its Bento, export and manifests; applied where configured)")
    rb.add_argument("--dataset", default="synthetic", choices=list(BENCHMARKS))
    rb.add_argument("--store-only", action="store_true", help="change the model store only; deliver nothing")
    dl = sub.add_parser("deliver", help="build and deliver the production model's Bento again (the deliver job: "
                                        "export, Kubernetes manifests, applied where CIRCOT_DEPLOY=kubernetes)")
    dl.add_argument("--dataset", default="synthetic", choices=list(BENCHMARKS))
    ct = sub.add_parser("chains-from-text", help="write placeholder chains made from a benchmark's query texts (for "
                                                 "the file teacher; no images, no model: a CPU try)")
    ct.add_argument("--dataset", required=True, help=f"the benchmark: {', '.join(BENCHMARKS)}")
    ct.add_argument("--root", required=True, help="the benchmark's folder (only its annotation files are read)")
    ct.add_argument("--out", required=True, help="the JSON Lines file of chains to write")
    ct.add_argument("--splits", nargs="+", default=None,
                    help="the splits to read (default: every query whose targets are known)")
    mm = sub.add_parser("micro-model", help="write a micro Qwen2-VL checkpoint (random weights, a tokenizer trained "
                                            "on the given texts) as the base model of a CPU try")
    mm.add_argument("--out", required=True, help="the checkpoint folder to write")
    mm.add_argument("--texts", required=True, nargs="+", metavar="FILE",
                    help="JSON or JSON Lines files (e.g. a benchmark's annotation files): every string with a space "
                         "in them trains the tokenizer")
    mm.add_argument("--vocab-size", type=int, default=2000, help="the most tokens of the vocabulary (default 2000)")
    mm.add_argument("--seed", type=int, default=0, help="the seed of the random weights (default 0)")
    args = p.parse_args(argv)
    if args.command == "chains-from-text":
        return chains_from_text_command(args.dataset, args.root, args.out, args.splits)
    if args.command == "micro-model":
        return micro_model_command(args.out, args.texts, args.vocab_size, args.seed)
    project_homes()
    if args.command == "benchmarks":
        return show_benchmarks()
    if args.command == "models":
        return show_models(args.verify)
    if args.command == "rollback":
        return rollback(args.dataset, store_only=args.store_only)
    if args.command == "deliver":
        return deliver(args.dataset)
    return run(args.dataset, annotations_only=args.annotations_only, train=args.train, evaluate=args.evaluate,
               verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main(prog="python -m orchestration"))
