"""What batching can gain at most: the model alone, embedding gallery images one at a time and in batches.

    BENTOML_HOME=$PWD/.bentoml .venv/bin/python bench/encoder_throughput.py      # the production model
    .venv/bin/python bench/encoder_throughput.py --model <a saved model folder> --batch-sizes 1 8 32

Loads the production model of ``--dataset`` (or ``--model``), then for each batch size embeds the same
images for ``--seconds`` and prints images/s and the gain over batch 1: the ceiling of what the
service's adaptive batching can add to ``/embed_image`` on this machine, before any per-request overhead
(compare with ``bench/load_service.py``).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="synthetic", help="serve-side: whose production model")
    p.add_argument("--model", help="a saved model folder instead of the production model")
    p.add_argument("--images", default="data/raw/synthetic/images/test", help="a folder of PNG images")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=6.0)
    return p


def gains(rates: dict[int, float]) -> dict[int, float]:
    """Each batch size's images/s over batch 1's (the smallest size measured)."""
    base = rates[min(rates)]
    return {size: rate / base for size, rate in rates.items()}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from PIL import Image

    from model_code import registry
    from model_code.model.cir_cot import CirCoTModel

    model = (CirCoTModel.load(args.model, device="cpu") if args.model
             else registry.load_promoted(dataset=args.dataset, device="cpu"))
    paths = sorted(Path(args.images).glob("*.png"))[: max(args.batch_sizes)]
    images = [Image.open(p).convert("RGB") for p in paths]
    rates = {}
    for size in args.batch_sizes:
        model.embed_images(images[:size], batch_size=size)   # warm up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            model.embed_images(images[:size], batch_size=size)
            done += size
        rates[size] = done / (time.perf_counter() - start)
    for size, gain in gains(rates).items():
        print(f"batch {size:>3}: {rates[size]:7.1f} images/s  ({gain:.2f}x batch {min(rates)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
