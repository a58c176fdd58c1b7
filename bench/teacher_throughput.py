"""Throughput of the local teacher annotator (model_code.annotators.LocalTeacher) on a randomly
initialised Qwen2-VL-family model of a named shape; no weights are needed.

    PYTHONPATH=. python bench/teacher_throughput.py --shape qwen2-vl-2b --batch-sizes 8 32   # a GPU
    PYTHONPATH=. python bench/teacher_throughput.py --shape tiny --requests 8 --batch-sizes 4 # CPU check

Each request is one reference and one target image (rendered cir-shapes scenes, resized by the
processor to the shape's image size) plus the versioned teacher prompt, decoded greedily for
``--max-new-tokens`` (a random model rarely stops early). Prints tokens/s and annotations/s per
batch size, after one warm-up batch; annotations are judged as in the pipeline (and rejected:
random weights write nonsense).
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
from model_code.annotation.judge import AnnotationRequest
from model_code.annotation.teachers import LocalTeacher
from model_code.backbone import SHAPES, build_random_backbone, resolve_device  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen2-vl-2b", choices=sorted(SHAPES))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    p.add_argument("--requests", type=int, default=64, help="timed requests per batch size")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--device", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    corpus = ["make the red circle blue and move it to the left", "a small green star in the top left corner"] * 200
    start = time.perf_counter()
    model, processor = build_random_backbone(args.shape, corpus, vocab_size=2048, device=device, dtype=dtype)
    model.eval()
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    print(f"# {args.shape}: {params / 1e9:.3f}B parameters, {dtype}, {device}, "
          f"attention {model.config._attn_implementation}, built in {build_s:.0f}s")
    if device.startswith("cuda"):
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    import transformers

    print(f"# transformers {transformers.__version__}")

    rng = random.Random(0)
    tmp = Path(tempfile.mkdtemp())
    requests = []
    for i in range(max(args.requests, max(args.batch_sizes)) + max(args.batch_sizes)):
        ref, tgt = tmp / f"r{i}.png", tmp / f"t{i}.png"
        random_image(rng, 128).save(ref)
        random_image(rng, 128).save(tgt)
        requests.append(AnnotationRequest(f"q{i}", ref, tgt, "make the red circle blue and remove the star"))

    rows = []
    for bs in args.batch_sizes:
        teacher = LocalTeacher("random-" + args.shape, model=model, processor=processor, batch_size=bs,
                               max_new_tokens=args.max_new_tokens)
        teacher.annotate(requests[:bs])  # warm-up
        teacher.stats.__init__()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        wall = time.perf_counter()
        n = (args.requests // bs) * bs or bs
        annotated = teacher.annotate(requests[bs: bs + n])
        wall = time.perf_counter() - wall
        s = teacher.stats
        row = {"shape": args.shape, "batch_size": bs, "requests": n, "new_tokens": s.new_tokens,
               "generate_s": round(s.seconds, 2), "wall_s": round(wall, 2),
               "tokens_per_s": round(s.new_tokens / wall, 1), "annotations_per_s": round(n / wall, 3),
               "rejected": sum(not a.ok for a in annotated)}
        if device.startswith("cuda"):
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print_table(rows, [("batch", "batch_size"), ("tokens/s", "tokens_per_s"), ("annotations/s", "annotations_per_s"),
                       ("peak GiB", "peak_gib")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
