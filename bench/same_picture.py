"""The reference found by its picture: how often an upload that is a gallery image saved or sized
otherwise is excluded, and how often a distinct gallery image is (``model_code.index.SamePicture``).

    .venv/bin/python bench/same_picture.py [--gallery data/raw/synthetic/images/test] [--limit 2000]

For every gallery image (the first ``--limit`` files, sorted): the image itself as the upload must
match only itself (a match with another image is a false exclusion), and each of its variants (PNG
at another compression level, JPEG at quality 95 and 75, resized by -4 and +6 pixels, doubled,
halved) must match it (a miss keeps the reference in the ranking). Prints the rates, the closest
full-resolution distance between distinct candidates and the farthest of a variant (the margin
around ``FINE_SAME``), and the time per upload. Reads the gallery; writes nothing.
"""

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def variants(im: Image.Image) -> dict[str, Image.Image]:
    """The same picture as users may upload it."""

    def saved(fmt: str, **kw) -> Image.Image:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, fmt, **kw)
        return Image.open(io.BytesIO(buf.getvalue()))

    w, h = im.size
    return {"png level 1": saved("PNG", compress_level=1), "jpeg 95": saved("JPEG", quality=95),
            "jpeg 75": saved("JPEG", quality=75), "resized -4 px": im.resize((w - 4, h - 4), Image.BICUBIC),
            "resized +6 px": im.resize((w + 6, h + 6), Image.BICUBIC),
            "doubled": im.resize((2 * w, 2 * h), Image.LANCZOS), "halved": im.resize((w // 2, h // 2), Image.LANCZOS)}


def main(argv: list[str] | None = None) -> int:
    from model_code.index import COARSE_SAME, SamePicture, _file_fingerprint, picture_distance

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gallery", default="data/raw/synthetic/images/test", help="a folder of gallery images")
    p.add_argument("--limit", type=int, default=2000)
    args = p.parse_args(argv)
    files = sorted(Path(args.gallery).glob("*.png"))[:args.limit]
    if not files:
        raise SystemExit(f"no images under {args.gallery}: run `make run` (or python -m model_code.synthetic) first")
    ids = [f.stem for f in files]
    matcher = SamePicture(ids, [_file_fingerprint(f) for f in files], dict(zip(ids, files)))
    false, misses, seconds, n = 0, {}, [], 0
    for f in files:
        with Image.open(f) as im:
            im.load()
        t0 = time.perf_counter()
        got = matcher.matches(im)
        seconds.append(time.perf_counter() - t0)
        false += len(set(got) - {f.stem})
        for name, v in variants(im).items():
            misses[name] = misses.get(name, 0) + (f.stem not in matcher.matches(v))
        n += 1
    # the margin: full-resolution distances of distinct candidates and of variants
    distinct, same = [], {}
    for f in files[:300]:
        with Image.open(f) as im:
            im.load()
        mine = np.frombuffer(_file_fingerprint(f), dtype=np.uint8).astype(np.int16)
        coarse = np.abs(matcher.prints.astype(np.int16) - mine).mean(axis=1)
        for j in np.flatnonzero(coarse < COARSE_SAME):
            if ids[j] != f.stem:
                with Image.open(files[j]) as other:
                    distinct.append(picture_distance(other, im))
        for name, v in variants(im).items():
            same.setdefault(name, []).append(picture_distance(v, im))
    print(f"{n} gallery images ({args.gallery})")
    print(f"distinct images excluded: {false} of {n * (n - 1)} pairs")
    for name, miss in misses.items():
        print(f"{name}: excluded {n - miss} of {n}")
    print(f"picture distance: distinct candidates {min(distinct) if distinct else '-'} at the closest "
          f"({len(distinct)} pairs); the farthest variant of each kind: "
          + ", ".join(f"{name} {max(d)}" for name, d in same.items()))
    print(f"time per upload: p50 {1000 * np.median(seconds):.2f} ms, p95 {1000 * np.percentile(seconds, 95):.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
