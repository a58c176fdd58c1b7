"""``python -m orchestration run --dataset synthetic``: run the pipeline in this process, recorded
in the Dagster instance of ``$DAGSTER_HOME`` (so the runs show in ``dagster dev``), and print what
each run produced: first the data job for the dataset partition (raw data, triplets, annotations),
then the training job (base model, CIR-CoT model)."""

from __future__ import annotations

import argparse
import os
import sys

SHOWN = ("data_version", "dagster/row_count", "images", "ok", "rejected", "model_version", "steps", "align_loss",
         "cot_loss", "val_in_batch_accuracy", "val_in_batch_accuracy_align", "val_in_batch_accuracy_cot", "wall_time_s")


def run_job(job_name: str, partition: str | None = None, definitions=None, run_config: dict | None = None) -> bool:
    """Execute one job; print its materialisations and check verdicts; True when all went well."""
    import dagster as dg

    if definitions is None:
        from orchestration.definitions import defs as definitions
    job = definitions.resolve_job_def(job_name)
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    result = job.execute_in_process(partition_key=partition, instance=instance, raise_on_error=False,
                                    run_config=run_config)
    label = f"{job_name} [{partition}]" if partition else job_name
    print(f"\n== {label}: {'succeeded' if result.success else 'FAILED'} (run {result.run_id})")
    checks_ok = True
    for event in result.all_events:
        if event.event_type_value == "ASSET_MATERIALIZATION":
            mat = event.event_specific_data.materialization
            meta = mat.metadata
            path = meta.get("path")
            extra = ", ".join(f"{k}={meta[k].value}" for k in SHOWN if k in meta)
            print(f"  asset {mat.asset_key.to_user_string():<16} -> {path.value if path else '-'}  {extra}")
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            ev = event.event_specific_data
            checks_ok &= ev.passed
            print(f"  check {ev.asset_key.to_user_string()}:{ev.check_name:<14} {'passed' if ev.passed else 'FAILED'}"
                  f"  {ev.description or ''}")
        elif event.is_step_failure:
            print(f"  step {event.step_key} failed: {event.event_specific_data.error.message.strip()}")
    return result.success and checks_ok


def run(dataset: str, definitions=None, *, annotations_only: bool = False, train: bool | None = None) -> int:
    from orchestration.definitions import PIPELINE_JOB, TRAINING_JOB

    config = {"ops": {"triplets": {"config": {"require_images": False}}}} if annotations_only else None
    if not run_job(PIPELINE_JOB, dataset, definitions, config):
        return 1
    if train if train is not None else dataset == "synthetic":
        if not run_job(TRAINING_JOB, None, definitions):
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestration")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="materialise the data pipeline for one dataset partition, then train")
    r.add_argument("--dataset", default="synthetic", choices=["synthetic", "fashioniq", "cirr", "circo"])
    r.add_argument("--annotations-only", action="store_true",
                   help="read a real benchmark's annotations without its images (they are not checked)")
    r.add_argument("--train", dest="train", action="store_true", default=None,
                   help="run the training job afterwards (default for synthetic)")
    r.add_argument("--no-train", dest="train", action="store_false", help="stop after the data pipeline")
    args = p.parse_args(argv)
    return run(args.dataset, annotations_only=args.annotations_only, train=args.train)


if __name__ == "__main__":
    sys.exit(main())
