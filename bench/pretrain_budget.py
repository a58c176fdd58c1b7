"""Pretrain (or continue pretraining) the embedded base within a wall-clock budget.

A cosine schedule needs its step count up front, and the step time depends on the machine (2 CPU
cores: ~3.4 s for a batch of 64 text edits; a GPU: far less). So this first times a few steps of the
same configuration on a small scene set, then runs ``model_code.model.pretrain`` with as many steps
as fit in ``--seconds`` (rounded down to whole evaluation intervals) and packs what it made:

    python bench/pretrain_budget.py --seconds 330 --out /tmp/pre --pack $OUT -- \
        --init model_code/model/embedded_base --edit-answer chain --edits-per-scene 8 ...

Everything after ``--`` is passed to ``python -m model_code.model.pretrain`` (probe and run alike).
``--pack DIR`` writes ``DIR/model.tgz`` (the finished checkpoint), ``metrics.jsonl``, ``base.json``
and ``perception.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import tarfile
import time
from pathlib import Path

# what the probe changes of the configuration (besides its own folder and step count): a small scene set
PROBE = {"scenes": 400, "heldout": 8, "warmup_steps": 1}


def _main_args(extra: list[str], **override) -> list[str]:
    args = list(extra)
    for key, value in override.items():
        flag = "--" + key.replace("_", "-")
        if flag in args:
            i = args.index(flag)
            del args[i:i + 2]
        args += [flag, str(value)]
    return args


def probe_seconds_per_step(extra: list[str], out: Path, steps: int = 20) -> float:
    """Seconds per optimizer step of the configuration, measured on a small scene set (the later
    steps only: the first ones pay for warm-up)."""
    from model_code.model import pretrain

    shutil.rmtree(out, ignore_errors=True)
    lines: list[str] = []
    handler = logging.Handler()
    time_of: dict[int, float] = {}

    def emit(record):
        lines.append(record.getMessage())
        time_of[id(lines[-1])] = record.created

    handler.emit = emit
    logging.getLogger().addHandler(handler)
    try:
        pretrain.main(_main_args(extra, out=out, steps=steps, eval_every=steps, **PROBE))
    finally:
        logging.getLogger().removeHandler(handler)
    history = json.loads((out / "train" / "checkpoint" / "history.json").read_text())
    assert len(history) == steps, history
    # the logged rate is an average from the first step; the time between the last two log lines is not
    marks = [(int(m.group(1)), time_of[id(line)]) for line in lines
             if (m := re.search(r"pretrain step ([0-9]+)/[0-9]+: loss", line))]
    if len(marks) < 2:
        raise RuntimeError("the probe logged too few steps to time")
    (s0, t0), (s1, t1) = marks[-2], marks[-1]
    return (t1 - t0) / (s1 - s0)


def parser() -> argparse.ArgumentParser:
    """This script's own options (those before ``--``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, required=True, help="training time to fill (evaluations excluded)")
    p.add_argument("--out", required=True)
    p.add_argument("--eval-every", type=int, default=0, help="default: a quarter of the run")
    p.add_argument("--max-steps", type=int, default=100000)
    p.add_argument("--pack", help="a folder to write model.tgz, metrics.jsonl, base.json, perception.png into")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    args = parser().parse_args(own)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    from model_code.model import pretrain

    t0 = time.monotonic()
    rate = probe_seconds_per_step(extra, Path(args.out + ".probe"))
    steps = min(args.max_steps, int(args.seconds / rate))
    every = args.eval_every or max(25, steps // 4)
    steps = max(every, steps // every * every)
    logging.info("probe: %.3f s/step (%.0f s with set-up): %d steps in %.0f s, evaluations every %d",
                 rate, time.monotonic() - t0, steps, args.seconds, every)
    rc = pretrain.main(_main_args(extra, out=args.out, steps=steps, eval_every=every))
    if args.pack:
        pack = Path(args.pack)
        pack.mkdir(parents=True, exist_ok=True)
        out = Path(args.out)
        with tarfile.open(pack / "model.tgz", "w:gz") as tar:
            tar.add(out / "model", arcname="model")
        for name in ("metrics.jsonl", "base.json", "perception.png", "config.json"):
            if (out / name).is_file():
                shutil.copy(out / name, pack / name)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
