"""cir-shapes: a procedurally generated composed-image-retrieval benchmark.

Scenes of 1-4 coloured shapes on a 3x3 grid; a query is a reference scene plus a modification text of
1-3 atomic edits; the target is the reference with the edits applied. Some edits can only be resolved
by looking at the reference ("make the leftmost object the colour of the largest one", "remove every
object that is not round"); each triplet records whether it has one. The gallery of the evaluation
splits holds the references, the targets and hard distractors one attribute away from a target.

Everything is a pure function of the parameters and the seed: the same call writes byte-identical
files. Layout of the output folder (read back by ``model_code.data.read_benchmark("synthetic", ...)``):

    meta.json                          parameters, seed, counts, format version
    images/<split>/<image_id>.png      rendered scenes
    scene_graphs/<split>.json          image_id -> {"objects": [...], "role": ..., ...}
    captions/cap.<split>.json          [{query_id, reference, target, modification, edits, ...}]
    image_splits/split.<split>.json    image_id -> relative image path

CLI: ``python -m model_code.synthetic.generate --out DIR --seed N`` (see ``--help`` for the size options).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, Field

from model_code.common import Progress, replace_dir
from model_code.synthetic.edits import perturb, sample_modification
from model_code.synthetic.scenes import Scene, random_scene, render_scene, scene_from_json, scene_key, scene_to_json

log = logging.getLogger(__name__)

FORMAT_VERSION = "cir-shapes/1"
SPLITS = ("train", "val", "test")

# ---------------------------------------------------------------------------------------------
# Parameters


class SplitSize(BaseModel):
    """How one split is generated: ``references`` reference scenes, each with
    ``modifications_per_reference`` queries, each target with ``distractors_per_target`` hard
    distractors (scenes one attribute away from it) in the gallery."""

    references: int = Field(ge=0)
    modifications_per_reference: int = Field(default=1, ge=1)
    distractors_per_target: int = Field(default=2, ge=0)


class SyntheticParams(BaseModel):
    """Parameters of the benchmark; the ``synthetic`` section of ``params.yaml``."""

    seed: int = 0
    image_size: int = Field(default=128, ge=32, le=1024)
    max_edits: int = Field(default=3, ge=1, le=3)
    train: SplitSize = SplitSize(references=5000, modifications_per_reference=4, distractors_per_target=1)
    val: SplitSize = SplitSize(references=500, modifications_per_reference=1, distractors_per_target=2)
    test: SplitSize = SplitSize(references=500, modifications_per_reference=1, distractors_per_target=2)

    def split(self, name: str) -> SplitSize:
        return getattr(self, name)


# ---------------------------------------------------------------------------------------------
# Generation


@dataclasses.dataclass
class SplitData:
    images: dict[str, dict]     # image_id -> scene graph (+ role)
    queries: list[dict]


def _edit_count_weights(max_edits: int) -> list[float]:
    return [0.4, 0.35, 0.25][:max_edits]


def generate_split(params: SyntheticParams, split: str, used: set) -> SplitData:
    """Scenes and queries of one split. ``used`` holds the scene keys of every image generated so
    far in the benchmark; every image is a distinct scene, across splits too."""
    size = params.split(split)
    rng = random.Random(f"cir-shapes/{params.seed}/{split}")
    oid = iter(range(10**9))
    next_oid = lambda: next(oid)  # noqa: E731
    images: dict[str, dict] = {}
    queries: list[dict] = []

    def new_image(scene: Scene, role: str, **extra) -> str:
        image_id = f"{split}_{len(images):06d}"
        images[image_id] = {**scene_to_json(scene), "role": role, **extra}
        used.add(scene_key(scene))
        return image_id

    weights = _edit_count_weights(params.max_edits)
    for _ in range(size.references):
        while True:
            ref = random_scene(rng, next_oid)
            if scene_key(ref) not in used:
                break
        ref_id = new_image(ref, "reference")
        siblings: list[str] = []
        made = 0
        attempts = 0
        while made < size.modifications_per_reference and attempts < 200:
            attempts += 1
            n_edits = rng.choices(range(1, params.max_edits + 1), weights)[0]
            sample = sample_modification(rng, ref, n_edits, next_oid)
            if sample is None:
                continue
            target, edits, text = sample
            if scene_key(target) in used:
                continue
            target_id = new_image(target, "target", reference=ref_id)
            # Hard distractors: alternate between perturbing what the edits changed and what they
            # kept, so that neither the reference alone nor the text alone singles out the target.
            ref_keys = {scene_key((o,)) for o in ref}
            changed = [o for o in target if scene_key((o,)) not in ref_keys]
            kept = [o for o in target if scene_key((o,)) in ref_keys]
            distractors = []
            for k in range(size.distractors_per_target):
                pool = (changed if k % 2 == 0 else kept) or changed or kept
                for _ in range(50):
                    d = perturb(rng, target, pool)
                    if scene_key(d) not in used:
                        distractors.append(new_image(d, "distractor", target=target_id))
                        break
            queries.append({
                "query_id": f"{split}-{len(queries):06d}",
                "reference": ref_id,
                "target": target_id,
                "modification": text,
                "edits": edits,
                "n_edits": len(edits),
                "reference_dependent": any(e["reference_dependent"] for e in edits),
                "hard_negatives": distractors,
            })
            siblings.append(target_id)
            made += 1
        if made < size.modifications_per_reference:
            raise GenerationError(f"{split}: reference {ref_id} allowed only {made} distinct modifications in "
                                  f"{attempts} attempts, not the {size.modifications_per_reference} asked for "
                                  f"(modifications_per_reference): ask for fewer")
        # other targets made from the same reference are natural hard negatives too
        for q in queries[len(queries) - made:]:
            q["hard_negatives"] = q["hard_negatives"] + [s for s in siblings if s != q["target"]]
    return SplitData(images, queries)


def _dump_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")


GENERATING = ".cir-shapes-generating"  # marks a folder this generator is writing (removed when done)


class OutputFolderError(ValueError):
    """``--out`` names something the generator must not replace."""


class GenerationError(ValueError):
    """The parameters ask for what the scenes cannot give (e.g. more modifications than a reference allows)."""


def output_folder(out: str | os.PathLike) -> Path:
    """``out`` resolved, once checked to be safe to replace: a new folder, an empty one, or a previous
    output of this generator (its ``meta.json`` says ``"format": "cir-shapes/..."``). Refuses the
    current folder or one above it, a file, and any other non-empty folder, before touching anything."""
    path = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if path == cwd or path in cwd.parents or path == Path(path.anchor):
        raise OutputFolderError(f"--out {out!r} is {path}, the current folder or one above it: "
                                "name a folder of its own")
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"--out {out!r} is a file ({path}), not a folder")
    if path.is_dir() and any(path.iterdir()):
        meta = path / "meta.json"
        try:
            meta = json.loads(meta.read_text())
            ours = meta.get("format", "").startswith("cir-shapes/")
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise OutputFolderError(f"--out {out!r} ({path}) is a non-empty folder that is not a cir-shapes benchmark "
                                    f"(no meta.json of this generator): refusing to replace it")
        foreign = foreign_files(path, meta)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise OutputFolderError(f"--out {out!r} ({path}) holds files this generator did not write ({shown}): "
                                    f"refusing to replace it; move them out, or name another folder")
    return path


# what an output holds when its meta.json lists no files (written before the list was kept)
_LAYOUT = re.compile(r"meta\.json|images/\w+/[\w-]+\.png|scene_graphs/\w+\.json|captions/cap\.\w+\.json"
                     r"|image_splits/split\.\w+\.json")


def foreign_files(path: Path, meta: dict) -> list[str]:
    """The files under ``path`` that the run which wrote ``meta`` did not record as its own (its
    ``files``), relative and sorted; for an output that recorded none, those outside its layout."""
    recorded = set(meta.get("files") or ())
    found = (f.relative_to(path).as_posix() for f in sorted(path.rglob("*")) if not f.is_dir())
    return [rel for rel in found
            if rel != "meta.json" and not (rel in recorded if recorded else _LAYOUT.fullmatch(rel))]


def generate(params: SyntheticParams, out: str | os.PathLike) -> dict:
    """Generate the whole benchmark into ``out`` (replaced atomically: an interrupted run leaves
    the previous contents, or nothing, never a half-written benchmark). ``out`` must be new, empty
    or a previous output (:func:`output_folder`). Returns the counts."""
    out = output_folder(out)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # an earlier run of ours that was interrupted
        if (stale / GENERATING).is_file():
            shutil.rmtree(stale)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    tmp.mkdir(parents=True)
    (tmp / GENERATING).touch()
    used: set = set()
    try:
        splits = {s: generate_split(params, s, used) for s in SPLITS}
    except GenerationError:
        shutil.rmtree(tmp)
        raise
    total = sum(len(d.images) for d in splits.values())
    progress = Progress(total, "rendering cir-shapes images", say=log.info)
    counts: dict[str, dict[str, int]] = {}
    for name in ("images", "scene_graphs", "captions", "image_splits"):
        (tmp / name).mkdir(parents=True)
    for split, data in splits.items():
        img_dir = tmp / "images" / split
        img_dir.mkdir(parents=True)
        paths = {}
        for image_id, graph in data.images.items():
            rel = f"images/{split}/{image_id}.png"
            render_scene(scene_from_json(graph), params.image_size).save(tmp / rel, format="PNG", optimize=False)
            paths[image_id] = rel
            progress.step()
        _dump_json(data.images, tmp / "scene_graphs" / f"{split}.json")
        _dump_json(data.queries, tmp / "captions" / f"cap.{split}.json")
        _dump_json(paths, tmp / "image_splits" / f"split.{split}.json")
        counts[split] = {"images": len(data.images), "queries": len(data.queries),
                         "reference_dependent": sum(q["reference_dependent"] for q in data.queries)}
    files = sorted(f.relative_to(tmp).as_posix() for f in tmp.rglob("*") if f.is_file() and f.name != GENERATING)
    _dump_json({"format": FORMAT_VERSION, "params": params.model_dump(), "counts": counts, "files": files},
               tmp / "meta.json")
    (tmp / GENERATING).unlink()
    replace_dir(tmp, out)
    return counts


def load_params(path: str | os.PathLike | None) -> SyntheticParams:
    """The ``synthetic`` section of a params.yaml (DVC's parameter file), or the defaults."""
    if path is None:
        return SyntheticParams()

    data = yaml.safe_load(Path(path).read_text()) or {}
    return SyntheticParams.model_validate(data.get("synthetic", {}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_code.synthetic.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (replaced)")
    p.add_argument("--params", help="params.yaml whose 'synthetic' section gives the defaults")
    p.add_argument("--seed", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--max-edits", type=int)
    for split in SPLITS:
        p.add_argument(f"--{split}-references", type=int, help=f"reference scenes in {split}")
        p.add_argument(f"--{split}-mods", type=int, help=f"modifications per reference in {split}")
        p.add_argument(f"--{split}-distractors", type=int, help=f"hard distractors per target in {split}")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    data = load_params(args.params).model_dump()
    for key in ("seed", "image_size", "max_edits"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    for split in SPLITS:
        for flag, field in (("references", "references"), ("mods", "modifications_per_reference"),
                            ("distractors", "distractors_per_target")):
            if getattr(args, f"{split}_{flag}") is not None:
                data[split][field] = getattr(args, f"{split}_{flag}")
    params = SyntheticParams.model_validate(data)
    start = time.monotonic()
    try:
        counts = generate(params, args.out)
    except (OutputFolderError, GenerationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("wrote %s in %.1fs: %s", args.out, time.monotonic() - start, json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
