"""Decoding throughput of CIR-CoT's reasoning step (``CirCoTModel.generate_cots``' generate call) on a
randomly initialised Qwen2-VL-family model of a named shape; no weights are needed.

    PYTHONPATH=. python bench/gpu_decode.py --shape qwen2-vl-2b --batch-size 32 --max-new-tokens 128   # a GPU
    PYTHONPATH=. python bench/gpu_decode.py --shape tiny --batch-size 4 --max-new-tokens 16 --modes dynamic static
                                                                                                  # the CPU

Each query is a rendered reference image plus the query prompt; every row decodes exactly
``--max-new-tokens`` tokens (``min_new_tokens``: a random model would otherwise stop at random).
Modes: ``dynamic`` (the transformers default cache), ``static`` (static KV cache, no compilation),
``static+compile`` (static cache with ``torch.compile`` of the decoding step, as
``generate_cots`` uses on a GPU). The first call of each mode is the warm-up and, for compiled
modes, the compilation: reported separately from the timed runs.
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench._common import print_table, random_image  # noqa: E402
from model_code.backbone import SHAPES, build_random_backbone, resolve_device  # noqa: E402
from model_code.model.cir_cot import CirCoTModel, add_cir_tokens  # noqa: E402

MODES = ("dynamic", "static", "static+compile")


def mode_kwargs(mode: str) -> dict:
    """What ``generate`` is given for a mode: the cache, and whether compilation is off."""
    extra = {}
    if mode != "dynamic":
        extra["cache_implementation"] = "static"
    if mode == "static":
        extra["disable_compile"] = True
    return extra


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen2-vl-2b", choices=sorted(SHAPES))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed generate calls per mode, after the warm-up")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--device", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    corpus = ["make the red circle blue and move it to the left", "a small green star in the top left corner"] * 200
    model, processor = build_random_backbone(args.shape, corpus, vocab_size=2048, device=device, dtype=dtype)
    add_cir_tokens(model, processor)
    m = CirCoTModel(model.eval(), processor)
    print(f"# {args.shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters, {dtype}, {device}, "
          f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""))

    rng = random.Random(0)
    tmp = Path(tempfile.mkdtemp())
    images = []
    for i in range(args.batch_size):
        images.append(tmp / f"r{i}.png")
        random_image(rng, 128).save(images[-1])
    prompts = [m.prompt("query", "make the red circle blue and remove the star")] * args.batch_size
    inputs = {k: v.to(device) for k, v in m.encode(prompts, [""] * args.batch_size, images).items()}
    tok = m.tokenizer

    rows = []
    for mode in args.modes:
        extra = mode_kwargs(mode)

        def generate(extra=extra):   # bound to this iteration's mode
            _sync(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                     do_sample=False, pad_token_id=tok.pad_token_id, **extra)
            _sync(device)
            return time.perf_counter() - t0, out.shape[1] - inputs["input_ids"].shape[1]

        try:
            warm_s, _ = generate()
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            runs = [generate() for _ in range(args.repeats)]
        except Exception as e:  # a mode this torch / transformers cannot run: report it, go on
            rows.append({"mode": mode, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            print(json.dumps(rows[-1]), flush=True)
            continue
        seconds = sum(s for s, _ in runs)
        new_tokens = sum(n for _, n in runs) * args.batch_size
        row = {"mode": mode, "batch_size": args.batch_size, "new_tokens_per_row": runs[0][1],
               "warmup_s": round(warm_s, 1), "tokens_per_s": round(new_tokens / seconds, 1),
               "queries_per_s": round(args.batch_size * len(runs) / seconds, 2)}
        if device.startswith("cuda"):
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print_table(rows, [("mode", "mode"), ("tokens/s", "tokens_per_s"), ("queries/s", "queries_per_s"),
                       ("warm-up / compile s", "warmup_s"), ("peak GiB", "peak_gib")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
