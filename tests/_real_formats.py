"""Folders in the official layouts of CIRR, FashionIQ and CIRCO, built from their real annotation files
with stand-in images rendered under the benchmarks' own file names (the real images are not
redistributable): what the tests, and a person trying the real-benchmark path on a CPU, run the
pipeline on.

    python -m tests._real_formats cirr --annotations ../shared/benchmarks/cirr --out /tmp/cirr --train 300 --val 100

- CIRR: its published file holds the val split only, so the first ``train`` pairs become a train
  split, the next ``val`` pairs the val split and the next ``test1`` pairs a hidden test1 split (targets
  removed, as the authors withhold them); each split's image file lists the images its pairs name.
- FashionIQ: the dress files of train and val are cut into three parts, written as the dress, shirt and
  toptee categories (the benchmark's three galleries).
- CIRCO: the first ``val`` queries of its val file, the next ``test`` as a hidden test split, and their
  images (reference and every ground truth) plus ``distractors`` more, as the COCO unlabeled gallery.

The images are flat colours with a shape, one per image name (the same name, the same picture): the
figures a model reaches on them mean nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, ImageDraw

from model_code.benchmarks import benchmark


def render(name: str, path: Path, size: int = 64) -> Path:
    """A picture for the image ``name``: a background and a shape whose colours and place follow from
    the name's hash."""
    h = hashlib.md5(name.encode()).digest()
    image = Image.new("RGB", (size, size), (h[0], h[1], h[2]))
    draw = ImageDraw.Draw(image)
    x, y, r = 8 + h[3] % (size - 24), 8 + h[4] % (size - 24), 6 + h[5] % 10
    box = (x, y, x + 2 * r, y + 2 * r)
    (draw.ellipse if h[6] % 2 else draw.rectangle)(box, fill=(255 - h[0], h[7], 255 - h[2]))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _write(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=1))


def _named_cirr(entries: Iterable[dict]) -> list[str]:
    names: dict[str, None] = {}
    for e in entries:
        for name in [e["reference"], e.get("target_hard"), *e["img_set"]["members"]]:
            if name:
                names[name] = None
    return list(names)


def cirr(annotations: Path, out: Path, *, train: int = 24, val: int = 16, test1: int = 6) -> Path:
    entries = json.loads((annotations / "captions" / "cap.rc2.val.json").read_text())
    if train + val + test1 > len(entries):
        raise ValueError(f"CIRR's file has {len(entries)} pairs: fewer than {train} + {val} + {test1}")
    hidden = [{k: v for k, v in e.items() if k not in ("target_hard", "target_soft")}
              for e in entries[train + val: train + val + test1]]
    for split, folder, part in (("train", "train", entries[:train]), ("val", "dev", entries[train: train + val]),
                                ("test1", "test1", hidden)):
        if not part:
            continue
        _write(out / "captions" / f"cap.rc2.{split}.json", part)
        paths = {name: f"./{folder}/{name}.png" for name in _named_cirr(part)}
        _write(out / "image_splits" / f"split.rc2.{split}.json", paths)
        for name, rel in paths.items():
            render(name, out / rel)
    return out


def fashioniq(annotations: Path, out: Path, *, train: int = 12, val: int = 8) -> Path:
    """Each category's train and val parts cut from the dress files (``train`` / ``val`` triplets per category)."""
    for split, n in (("train", train), ("val", val)):
        entries = json.loads((annotations / "captions" / f"cap.dress.{split}.json").read_text())
        if 3 * n > len(entries):
            raise ValueError(f"FashionIQ's dress {split} file has {len(entries)} triplets: fewer than 3 x {n}")
        for k, category in enumerate(benchmark("fashioniq").categories):
            part = entries[k * n: (k + 1) * n]
            _write(out / "captions" / f"cap.{category}.{split}.json", part)
            asins = list(dict.fromkeys(a for e in part for a in (e["candidate"], e["target"])))
            _write(out / "image_splits" / f"split.{category}.{split}.json", asins)
            for asin in asins:
                render(asin, out / "images" / f"{asin}.png")
    return out


def circo(annotations: Path, out: Path, *, val: int = 12, test: int = 4, distractors: int = 20) -> Path:
    """The first ``val`` queries as val, the next ``test`` as a hidden test split (ground truths removed,
    as the authors withhold them), their images and ``distractors`` more as the gallery."""
    entries = json.loads((annotations / "annotations" / "val.json").read_text())
    if val + test > len(entries):
        raise ValueError(f"CIRCO's file has {len(entries)} queries: fewer than {val} + {test}")
    hidden = [{k: v for k, v in e.items() if k not in ("target_img_id", "gt_img_ids")}
              for e in entries[val: val + test]]
    entries = entries[:val]
    _write(out / "annotations" / "val.json", entries)
    if hidden:
        _write(out / "annotations" / "test.json", hidden)
    ids = list(dict.fromkeys([i for e in entries for i in (e["reference_img_id"], *e["gt_img_ids"])]
                             + [e["reference_img_id"] for e in hidden]))
    ids += [900_000_000 + k for k in range(distractors)]
    for image_id in ids:
        render(str(image_id), out / "COCO2017_unlabeled" / "unlabeled2017" / f"{image_id:012d}.jpg")
    return out


BUILDERS = {"cirr": cirr, "fashioniq": fashioniq, "circo": circo}

_SUBJECTS = ("dog", "bottle", "dress", "shirt", "girl", "car", "bird", "table", "lamp", "umbrella")
_CHANGES = ("make it red", "show two of them", "remove the background", "add a person beside it",
            "make it longer and darker", "turn it to face left", "put it on grass", "without the straps")


def _text(k: int) -> str:
    return f"{_CHANGES[k % len(_CHANGES)]} and keep the {_SUBJECTS[(k // len(_CHANGES)) % len(_SUBJECTS)]}"


def made_up_annotations(benchmark_name: str, out: Path, n: int = 60) -> Path:
    """A folder laid out like the benchmark's published annotation files (the fields and nesting of
    each entry as its authors publish them) with ``n`` made-up entries: what the builders above read
    where the real files are not at hand. Nothing of the real files is in it."""
    if benchmark_name == "cirr":
        entries, paths = [], {}
        for k in range(n):
            names = [f"dev-{k}-{j}-img{j % 2}" for j in range(6)]
            entries.append({"pairid": 10_000 + k, "reference": names[0], "target_hard": names[1],
                            "target_soft": {names[1]: 1.0}, "caption": _text(k),
                            "img_set": {"id": k, "members": names, "reference_rank": 0, "target_rank": 1}})
            paths.update({name: f"./dev/{name}.png" for name in names})
        _write(out / "captions" / "cap.rc2.val.json", entries)
        _write(out / "image_splits" / "split.rc2.val.json", paths)
    elif benchmark_name == "fashioniq":
        for split in ("train", "val"):
            entries = [{"candidate": f"B{split[0].upper()}{k:08d}", "target": f"B{split[0].upper()}{k + 1:08d}",
                        "captions": [_text(k), _text(k + 3)]} for k in range(n)]
            _write(out / "captions" / f"cap.dress.{split}.json", entries)
            _write(out / "image_splits" / f"split.dress.{split}.json",
                   sorted({a for e in entries for a in (e["candidate"], e["target"])}))
    else:
        entries = [{"reference_img_id": 1000 + k, "target_img_id": 5000 + k, "relative_caption": _text(k),
                    "shared_concept": f"a {_SUBJECTS[k % len(_SUBJECTS)]}",
                    "gt_img_ids": [5000 + k, 6000 + k], "id": k, "semantic_aspects": ["addition"]}
                   for k in range(n)]
        _write(out / "annotations" / "val.json", entries)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests._real_formats", description=__doc__.split("\n\n")[0])
    p.add_argument("benchmark", choices=sorted(BUILDERS))
    p.add_argument("--annotations", required=True, type=Path,
                   help="the folder of the benchmark's published annotation files (as the benchmark ships them)")
    p.add_argument("--out", required=True, type=Path, help="the folder to write (the benchmark's root)")
    p.add_argument("--train", type=int, help="train queries (CIRR: pairs; FashionIQ: triplets per category)")
    p.add_argument("--val", type=int, help="val queries (FashionIQ: per category)")
    p.add_argument("--test1", type=int, help="CIRR: hidden test1 pairs")
    p.add_argument("--test", type=int, help="CIRCO: hidden test queries")
    args = p.parse_args(argv)
    given = {"train": args.train, "val": args.val, "test1": args.test1, "test": args.test}
    accepted = set(inspect.signature(BUILDERS[args.benchmark]).parameters) - {"annotations", "out"}
    wrong = sorted(k for k, v in given.items() if v is not None and k not in accepted)
    if wrong:
        p.error(f"{args.benchmark} takes {', '.join('--' + a for a in sorted(accepted))}, not "
                f"{', '.join('--' + w for w in wrong)}")
    sizes = {k: v for k, v in given.items() if v is not None}
    out = BUILDERS[args.benchmark](args.annotations, args.out, **sizes)
    print(f"{args.benchmark}: a root in its official layout with stand-in images at {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
