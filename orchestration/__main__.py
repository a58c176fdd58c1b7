"""``python -m orchestration run --dataset synthetic``: run the pipeline job for one dataset
partition in this process, recorded in the Dagster instance of ``$DAGSTER_HOME`` (so the run shows
in ``dagster dev``), and print what it produced."""

from __future__ import annotations

import argparse
import os
import sys


def run(dataset: str, job_name: str = "cir_pipeline", definitions=None, *, annotations_only: bool = False) -> int:
    import dagster as dg

    if definitions is None:
        from orchestration.definitions import defs as definitions
    job = definitions.resolve_job_def(job_name)
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    run_config = {"ops": {"triplets": {"config": {"require_images": False}}}} if annotations_only else None
    result = job.execute_in_process(partition_key=dataset, instance=instance, raise_on_error=False,
                                    run_config=run_config)

    print(f"\n== {job_name} [{dataset}]: {'succeeded' if result.success else 'FAILED'} (run {result.run_id})")
    checks_ok = True
    for event in result.all_events:
        if event.event_type_value == "ASSET_MATERIALIZATION":
            mat = event.event_specific_data.materialization
            meta = mat.metadata
            path = meta.get("path")
            extra = ", ".join(f"{k}={meta[k].value}" for k in ("data_version", "dagster/row_count", "images", "ok", "rejected") if k in meta)
            print(f"  asset {mat.asset_key.to_user_string():<16} -> {path.value if path else '-'}  {extra}")
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            ev = event.event_specific_data
            checks_ok &= ev.passed
            print(f"  check {ev.asset_key.to_user_string()}:{ev.check_name:<14} {'passed' if ev.passed else 'FAILED'}"
                  f"  {ev.description or ''}")
        elif event.is_step_failure:
            print(f"  step {event.step_key} failed: {event.event_specific_data.error.message.strip()}")
    return 0 if result.success and checks_ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestration")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="materialise the pipeline for one dataset partition")
    r.add_argument("--dataset", default="synthetic", choices=["synthetic", "fashioniq", "cirr", "circo"])
    r.add_argument("--job", default="cir_pipeline")
    r.add_argument("--annotations-only", action="store_true",
                   help="read a real benchmark's annotations without its images (they are not checked)")
    args = p.parse_args(argv)
    return run(args.dataset, args.job, annotations_only=args.annotations_only)


if __name__ == "__main__":
    sys.exit(main())
