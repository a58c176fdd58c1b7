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
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from pydantic import BaseModel, Field

from model_code.common import Progress

log = logging.getLogger(__name__)

FORMAT_VERSION = "cir-shapes/1"
SPLITS = ("train", "val", "test")

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond")
COLORS = {
    "red": (215, 38, 38),
    "orange": (245, 139, 20),
    "yellow": (232, 205, 24),
    "green": (40, 165, 62),
    "blue": (38, 88, 220),
    "purple": (142, 58, 190),
}
SIZES = ("small", "large")
GRID = 3
MAX_OBJECTS = 4
BACKGROUND = (245, 245, 240)

SHAPE_PLURAL = {s: s + "es" if s.endswith("x") else s + "s" for s in SHAPES}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
OBJECT_WORDS = ("object", "shape")
CELL_NAMES = {
    (0, 0): ("top left corner", "upper left corner"),
    (0, 1): ("top centre", "top middle"),
    (0, 2): ("top right corner", "upper right corner"),
    (1, 0): ("middle left", "centre left"),
    (1, 1): ("centre", "middle"),
    (1, 2): ("middle right", "centre right"),
    (2, 0): ("bottom left corner", "lower left corner"),
    (2, 1): ("bottom centre", "bottom middle"),
    (2, 2): ("bottom right corner", "lower right corner"),
}
DIRECTIONS = {"left": (0, -1, "to the left"), "right": (0, 1, "to the right"),
              "up": (-1, 0, "up"), "down": (1, 0, "down")}


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
# Scenes


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    row: int
    col: int
    oid: int = dataclasses.field(default=-1, compare=False)  # identity across edits, not content

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)

    def attr(self, name: str):
        return self.cell if name == "position" else getattr(self, name)

    def with_(self, **changes) -> Obj:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size, "row": self.row, "col": self.col}


Scene = tuple[Obj, ...]  # sorted by cell; at most one object per cell


def make_scene(objs: Iterable[Obj]) -> Scene:
    objs = tuple(sorted(objs, key=lambda o: o.cell))
    cells = [o.cell for o in objs]
    if len(set(cells)) != len(cells):
        raise ValueError(f"two objects in one cell: {cells}")
    return objs


def scene_key(scene: Scene) -> tuple:
    return tuple((o.shape, o.color, o.size, o.row, o.col) for o in scene)


def scene_to_json(scene: Scene) -> dict:
    return {"objects": [o.to_json() for o in scene]}


def scene_from_json(data: dict) -> Scene:
    return make_scene(Obj(o["shape"], o["color"], o["size"], o["row"], o["col"], oid=i)
                      for i, o in enumerate(data["objects"]))


def describe_scene(scene: Scene) -> str:
    """Plain-language description of a whole scene, used by captions and conclusions."""
    parts = [f"a {o.size} {o.color} {o.shape} in the {CELL_NAMES[o.cell][0]}" for o in scene]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _empty_cells(scene: Scene) -> list[tuple[int, int]]:
    used = {o.cell for o in scene}
    return [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in used]


def random_scene(rng: random.Random, next_oid: Callable[[], int]) -> Scene:
    n = rng.randint(1, MAX_OBJECTS)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
    return make_scene(Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES), r, c, next_oid())
                      for r, c in cells)


# ---------------------------------------------------------------------------------------------
# Rendering (a pure function of the scene graph)


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    import math

    if shape == "triangle":
        return [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in (-90, 30, 150)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "hexagon":
        return [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in range(0, 360, 60)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = math.radians(-90 + 36 * k)
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    return None


def render_scene(scene: Scene, size: int = 128):
    """Render a scene graph to a PIL RGB image of ``size`` x ``size`` pixels."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = size / GRID
    for o in scene:
        cx, cy = (o.col + 0.5) * cell, (o.row + 0.5) * cell
        r = cell * (0.44 if o.size == "large" else 0.25)
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            q = r * 0.85
            draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
        else:
            draw.polygon(_shape_points(o.shape, cx, cy, r), fill=fill)
    return img


# ---------------------------------------------------------------------------------------------
# Referring expressions: ways to name one object of a scene


@dataclasses.dataclass(frozen=True)
class Ref:
    """A way to pick out objects: ``kind`` with its ``values``. ``relational`` references
    (leftmost, largest, ...) can only be resolved by looking at the scene."""

    kind: str
    values: tuple = ()

    @property
    def relational(self) -> bool:
        return self.kind == "extreme"

    @property
    def attrs(self) -> frozenset[str]:
        """Attributes of the referred object that the phrase states."""
        return frozenset({"color_shape": {"color", "shape"}, "size_shape": {"size", "shape"},
                          "shape": {"shape"}, "color": {"color"}, "cell": {"position"},
                          "extreme": {"size"} if self.values[:1] in (("largest",), ("smallest",)) else set(),
                          "only": set()}[self.kind])

    def matches(self, scene: Scene) -> list[Obj]:
        k, v = self.kind, self.values
        if k == "color_shape":
            return [o for o in scene if (o.color, o.shape) == v]
        if k == "size_shape":
            return [o for o in scene if (o.size, o.shape) == v]
        if k == "shape":
            return [o for o in scene if o.shape == v[0]]
        if k == "color":
            return [o for o in scene if o.color == v[0]]
        if k == "cell":
            return [o for o in scene if o.cell == v]
        if k == "only":
            return list(scene) if len(scene) == 1 else []
        if k == "extreme":
            if len(scene) < 2:
                return []
            which = v[0]
            if which in ("largest", "smallest"):
                want = "large" if which == "largest" else "small"
                return [o for o in scene if o.size == want]
            key = {"leftmost": lambda o: o.col, "rightmost": lambda o: -o.col,
                   "topmost": lambda o: o.row, "lowest": lambda o: -o.row}[which]
            best = min(key(o) for o in scene)
            return [o for o in scene if key(o) == best]
        raise ValueError(k)

    def text(self, rng: random.Random) -> str:
        k, v = self.kind, self.values
        word = rng.choice(OBJECT_WORDS)
        if k == "color_shape":
            return f"the {v[0]} {v[1]}"
        if k == "size_shape":
            return f"the {rng.choice(SIZE_WORDS[v[0]])} {v[1]}"
        if k == "shape":
            return f"the {v[0]}"
        if k == "color":
            return f"the {v[0]} {word}"
        if k == "cell":
            return f"the {word} {rng.choice(('in', 'at'))} the {rng.choice(CELL_NAMES[v])}"
        if k == "only":
            return f"the {word}"
        if k == "extreme":
            return {"leftmost": f"the leftmost {word}", "rightmost": f"the rightmost {word}",
                    "topmost": rng.choice((f"the topmost {word}", f"the highest {word}")),
                    "lowest": rng.choice((f"the lowest {word}", f"the bottom-most {word}")),
                    "largest": rng.choice((f"the largest {word}", f"the biggest {word}")),
                    "smallest": f"the smallest {word}"}[v[0]]
        raise ValueError(k)


def _candidate_refs(obj: Obj) -> list[Ref]:
    return [Ref("color_shape", (obj.color, obj.shape)), Ref("size_shape", (obj.size, obj.shape)),
            Ref("shape", (obj.shape,)), Ref("color", (obj.color,)), Ref("cell", obj.cell), Ref("only"),
            *(Ref("extreme", (w,)) for w in ("leftmost", "rightmost", "topmost", "lowest", "largest", "smallest"))]


def choose_ref(rng: random.Random, obj: Obj, scene: Scene, reference: Scene,
               avoid: frozenset[str] = frozenset()) -> Ref | None:
    """A reference phrase that picks out exactly ``obj`` in ``scene`` and, if it picks anything in
    the original reference scene, picks the same object there (so phrasing stays unambiguous when
    edits are chained). Phrases stating an attribute in ``avoid`` are not used."""
    ok = []
    for ref in _candidate_refs(obj):
        if ref.attrs & avoid:
            continue
        hit = ref.matches(scene)
        if len(hit) != 1 or hit[0].oid != obj.oid:
            continue
        in_ref = ref.matches(reference)
        if in_ref and (len(in_ref) != 1 or in_ref[0].oid != obj.oid):
            continue
        ok.append(ref)
    if not ok:
        return None
    relational = [r for r in ok if r.relational]
    plain = [r for r in ok if not r.relational]
    if relational and (not plain or rng.random() < 0.2):
        return rng.choice(relational)
    return rng.choice(plain)


# ---------------------------------------------------------------------------------------------
# Edits: structured (machine-applicable, object addressed by its cell) plus their phrasing


def _find(scene: Scene, cell) -> Obj:
    cell = tuple(cell)
    for o in scene:
        if o.cell == cell:
            return o
    raise ValueError(f"no object in cell {cell}")


def _predicate(attr: str, value, negate: bool) -> Callable[[Obj], bool]:
    return lambda o: (getattr(o, attr) == value) != negate


def apply_edit(scene: Scene, edit: dict) -> Scene:
    """Apply one structured edit (as stored in ``captions/cap.<split>.json``) to a scene."""
    op = edit["op"]
    if op == "set":
        o = _find(scene, edit["cell"])
        return make_scene([x if x is not o else o.with_(**{edit["attr"]: edit["value"]}) for x in scene])
    if op == "copy":
        o, src = _find(scene, edit["cell"]), _find(scene, edit["source"])
        return make_scene([x if x is not o else o.with_(**{edit["attr"]: getattr(src, edit["attr"])}) for x in scene])
    if op == "move":
        o = _find(scene, edit["cell"])
        r, c = edit["to"]
        return make_scene([x if x is not o else o.with_(row=r, col=c) for x in scene])
    if op == "add":
        d = edit["object"]
        return make_scene([*scene, Obj(d["shape"], d["color"], d["size"], d["row"], d["col"], oid=edit.get("oid", -1))])
    if op == "remove":
        o = _find(scene, edit["cell"])
        return make_scene([x for x in scene if x is not o])
    if op == "swap":
        a, b = _find(scene, edit["cells"][0]), _find(scene, edit["cells"][1])
        if edit["attr"] == "position":
            na, nb = a.with_(row=b.row, col=b.col), b.with_(row=a.row, col=a.col)
        else:
            na, nb = a.with_(**{edit["attr"]: getattr(b, edit["attr"])}), b.with_(**{edit["attr"]: getattr(a, edit["attr"])})
        return make_scene([na if x is a else nb if x is b else x for x in scene])
    if op == "remove_where":
        pred = _predicate(edit["where"], edit["value"], edit["negate"])
        return make_scene([x for x in scene if not pred(x)])
    if op == "set_where":
        pred = _predicate(edit["where"], edit["value"], False)
        return make_scene([x.with_(**{edit["attr"]: edit["to"]}) if pred(x) else x for x in scene])
    raise ValueError(f"unknown edit op {op!r}")


def apply_edits(scene: Scene, edits: Sequence[dict]) -> Scene:
    for e in edits:
        scene = apply_edit(scene, e)
    return scene


def _class_phrase(attr: str, value, rng: random.Random) -> str:
    """'circles', 'red objects', 'small shapes'."""
    if attr == "shape":
        return SHAPE_PLURAL[value]
    word = rng.choice(OBJECT_WORDS) + "s"
    return f"{value} {word}" if attr == "color" else f"{rng.choice(SIZE_WORDS[value])} {word}"


def not_phrase(attr: str, value) -> str:
    """'round', 'red', 'small', 'a square'."""
    if attr == "shape":
        return "round" if value == "circle" else f"a {value}"
    return value


class _EditMaker:
    """Samples one applicable edit for the current scene. Each ``_op`` returns (edit dict, text,
    reference_dependent) or None when the scene does not allow it."""

    def __init__(self, rng: random.Random, reference: Scene, next_oid: Callable[[], int]):
        self.rng, self.reference, self.next_oid = rng, reference, next_oid

    WEIGHTS = {"color": 16, "shape": 12, "size": 8, "move": 12, "add": 10, "remove": 8, "swap": 8,
               "copy": 10, "remove_where": 8, "set_where": 8}

    def sample(self, scene: Scene):
        ops = list(self.WEIGHTS)
        weights = [self.WEIGHTS[o] for o in ops]
        for _ in range(50):
            op = self.rng.choices(ops, weights)[0]
            made = getattr(self, "_" + op)(scene)
            if made is not None:
                return made
        return None

    def _ref(self, obj, scene, avoid=frozenset()):
        return choose_ref(self.rng, obj, scene, self.reference, avoid)

    def _set(self, scene, attr, values, templates):
        rng = self.rng
        o = rng.choice(scene)
        value = rng.choice([v for v in values if v != getattr(o, attr)])
        ref = self._ref(o, scene)
        if ref is None:
            return None
        x = ref.text(rng)
        text = rng.choice(templates(value)).format(X=x, v=value)
        return ({"op": "set", "cell": list(o.cell), "attr": attr, "value": value, "refers": [x]},
                text, ref.relational)

    def _color(self, scene):
        return self._set(scene, "color", list(COLORS), lambda v: [
            "make {X} {v}", "change the colour of {X} to {v}", "paint {X} {v}", "turn {X} {v}",
            "{X} should be {v}", "recolour {X} {v}", "colour {X} {v} instead"])

    def _shape(self, scene):
        return self._set(scene, "shape", list(SHAPES), lambda v: [
            "turn {X} into a {v}", "change {X} into a {v}", "make {X} a {v}", "{X} should become a {v}",
            "replace {X} with a {v} of the same colour and size", "reshape {X} into a {v}"])

    def _size(self, scene):
        return self._set(scene, "size", list(SIZES), lambda v: [
            "make {X} bigger", "enlarge {X}", "make {X} larger", "{X} should be big", "grow {X}"]
            if v == "large" else ["make {X} smaller", "shrink {X}", "make {X} small", "{X} should be tiny",
                                  "reduce the size of {X}"])

    def _move(self, scene):
        rng = self.rng
        o = rng.choice(scene)
        empty = _empty_cells(scene)
        ref = self._ref(o, scene)
        if not empty or ref is None:
            return None
        x = ref.text(rng)
        relative = [(d, (o.row + dr, o.col + dc), words) for d, (dr, dc, words) in DIRECTIONS.items()
                    if (o.row + dr, o.col + dc) in empty]
        if relative and rng.random() < 0.4:
            _, to, words = rng.choice(relative)
            text = rng.choice(["move {X} one cell {d}", "shift {X} one step {d}", "nudge {X} {d}"]).format(X=x, d=words)
            dependent = True  # where it lands depends on where it was
        else:
            to = rng.choice(empty)
            text = rng.choice(["move {X} to the {c}", "put {X} in the {c}", "place {X} at the {c}",
                               "shift {X} to the {c}"]).format(X=x, c=rng.choice(CELL_NAMES[to]))
            dependent = ref.relational
        return ({"op": "move", "cell": list(o.cell), "to": list(to), "refers": [x]}, text, dependent)

    def _add(self, scene):
        rng = self.rng
        empty = _empty_cells(scene)
        if len(scene) >= MAX_OBJECTS or not empty:
            return None
        r, c = rng.choice(empty)
        obj = Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES), r, c)
        desc = f"{rng.choice(SIZE_WORDS[obj.size])} {obj.color} {obj.shape}"
        text = rng.choice(["add a {o} in the {c}", "put a {o} at the {c}", "place a {o} in the {c}",
                           "insert a {o} at the {c}", "there should also be a {o} in the {c}"]
                          ).format(o=desc, c=rng.choice(CELL_NAMES[(r, c)]))
        return ({"op": "add", "object": obj.to_json(), "oid": self.next_oid(), "refers": []}, text, False)

    def _remove(self, scene):
        rng = self.rng
        if len(scene) < 2:
            return None
        o = rng.choice(scene)
        ref = self._ref(o, scene)
        if ref is None:
            return None
        x = ref.text(rng)
        text = rng.choice(["remove {X}", "delete {X}", "take away {X}", "get rid of {X}", "erase {X}"]).format(X=x)
        return ({"op": "remove", "cell": list(o.cell), "refers": [x]}, text, ref.relational)

    def _swap(self, scene):
        rng = self.rng
        if len(scene) < 2:
            return None
        a, b = rng.sample(list(scene), 2)
        attr = rng.choice([t for t in ("color", "shape", "position") if a.attr(t) != b.attr(t)])
        ra, rb = self._ref(a, scene), self._ref(b, scene)
        if ra is None or rb is None:
            return None
        xa, xb = ra.text(rng), rb.text(rng)
        noun = {"color": "colours", "shape": "shapes", "position": "places"}[attr]
        if attr == "position":
            templates = ["swap the positions of {A} and {B}", "let {A} and {B} change places",
                         "exchange the places of {A} and {B}"]
        else:
            templates = [f"swap the {noun} of {{A}} and {{B}}", f"exchange the {noun} of {{A}} and {{B}}",
                         f"{{A}} and {{B}} trade {noun}"]
        text = rng.choice(templates).format(A=xa, B=xb)
        stated = {"color": "color", "shape": "shape", "position": "position"}[attr]
        dependent = ra.relational or rb.relational or stated not in (ra.attrs & rb.attrs)
        return ({"op": "swap", "attr": attr, "cells": [list(a.cell), list(b.cell)], "refers": [xa, xb]},
                text, dependent)

    def _copy(self, scene):
        rng = self.rng
        if len(scene) < 2:
            return None
        a, b = rng.sample(list(scene), 2)
        choices = [t for t in ("color", "shape", "size") if getattr(a, t) != getattr(b, t)]
        if not choices:
            return None
        attr = rng.choice(choices)
        # the source must be named without the attribute being copied, or the text would give it away
        ra, rb = self._ref(a, scene), self._ref(b, scene, avoid=frozenset({attr}))
        if ra is None or rb is None:
            return None
        xa, xb = ra.text(rng), rb.text(rng)
        templates = {
            "color": ["make {A} the same colour as {B}", "give {A} the colour of {B}", "paint {A} in the colour of {B}"],
            "shape": ["make {A} the same shape as {B}", "turn {A} into the shape of {B}", "give {A} the shape of {B}"],
            "size": ["make {A} the same size as {B}", "give {A} the size of {B}", "resize {A} to match {B}"],
        }[attr]
        text = rng.choice(templates).format(A=xa, B=xb)
        return ({"op": "copy", "attr": attr, "cell": list(a.cell), "source": list(b.cell), "refers": [xa, xb]},
                text, True)

    def _remove_where(self, scene):
        rng = self.rng
        if len(scene) < 2:
            return None
        attr = rng.choice(("shape", "color", "size"))
        value = getattr(rng.choice(scene), attr)
        negate = rng.random() < 0.5
        pred = _predicate(attr, value, negate)
        removed = [o for o in scene if pred(o)]
        if not removed or len(removed) == len(scene):
            return None
        if negate:
            text = rng.choice([f"remove every {rng.choice(OBJECT_WORDS)} that is not {not_phrase(attr, value)}",
                               f"keep only the {_class_phrase(attr, value, rng)}",
                               f"remove everything except the {_class_phrase(attr, value, rng)}"])
        else:
            single = value if attr == "shape" else f"{value} {rng.choice(OBJECT_WORDS)}"
            text = rng.choice([f"remove all {_class_phrase(attr, value, rng)}",
                               f"get rid of all the {_class_phrase(attr, value, rng)}",
                               f"delete every {single}"])
        return ({"op": "remove_where", "where": attr, "value": value, "negate": negate, "refers": []}, text, True)

    def _set_where(self, scene):
        rng = self.rng
        where = rng.choice(("shape", "color", "size"))
        value = getattr(rng.choice(scene), where)
        attr = rng.choice([a for a in ("color", "size") if a != where])
        members = [o for o in scene if getattr(o, where) == value]
        options = [v for v in (COLORS if attr == "color" else SIZES) if any(getattr(o, attr) != v for o in members)]
        if not options:
            return None
        to = rng.choice(options)
        cls = _class_phrase(where, value, rng)
        if attr == "color":
            text = rng.choice([f"make all the {cls} {to}", f"paint every one of the {cls} {to}", f"turn all {cls} {to}"])
        else:
            text = rng.choice([f"make all the {cls} {'bigger' if to == 'large' else 'smaller'}",
                               f"make every one of the {cls} {to}",
                               f"{'enlarge' if to == 'large' else 'shrink'} all the {cls}"])
        return ({"op": "set_where", "where": where, "value": value, "attr": attr, "to": to, "refers": []},
                text, True)


def _join(texts: list[str], rng: random.Random) -> str:
    if len(texts) == 1:
        s = texts[0]
    elif len(texts) == 2:
        s = rng.choice(["{0} and {1}", "{0}, then {1}", "{0}; also {1}", "first {0}, then {1}"]).format(*texts)
    else:
        s = rng.choice(["{0}, {1} and {2}", "{0}, then {1}, and finally {2}", "{0}; {1}; {2}",
                        "first {0}, then {1}, and then {2}"]).format(*texts)
    return s[0].upper() + s[1:]


def sample_modification(rng: random.Random, reference: Scene, n_edits: int, next_oid: Callable[[], int]):
    """Sample ``n_edits`` chained edits that each change the scene and never return to an earlier
    state. Returns (target scene, edits, text) or None when this reference does not allow it."""
    maker = _EditMaker(rng, reference, next_oid)
    scene, seen = reference, {scene_key(reference)}
    touched: set[tuple[int, str]] = set()  # (object, attribute) pairs changed by earlier edits
    edits, texts = [], []
    for _ in range(n_edits):
        made = None
        for _ in range(20):
            cand = maker.sample(scene)
            if cand is None:
                continue
            edit, text, dependent = cand
            new = apply_edit(scene, edit)
            changes = scene_changes(scene, new)
            # an edit that overrides or deletes what an earlier one did would make that one moot
            if scene_key(new) not in seen and not changes & touched and not (
                    {oid for oid, a in changes if a == "removed"} & {oid for oid, _ in touched}):
                made = (edit, text, dependent, new, changes)
                break
        if made is None:
            return None
        edit, text, dependent, scene, changes = made
        touched |= changes
        seen.add(scene_key(scene))
        edit = {**edit, "text": text, "reference_dependent": dependent}
        edit.pop("oid", None)
        edits.append(edit)
        texts.append(text)
    return scene, edits, _join(texts, rng)


def scene_changes(before: Scene, after: Scene) -> set[tuple[int, str]]:
    """(object id, what changed) between two scenes: an attribute name, 'removed' or 'added'."""
    b, a = {o.oid: o for o in before}, {o.oid: o for o in after}
    out = {(oid, "removed") for oid in b.keys() - a.keys()} | {(oid, "added") for oid in a.keys() - b.keys()}
    for oid in b.keys() & a.keys():
        out |= {(oid, attr) for attr in ("color", "shape", "size", "position") if b[oid].attr(attr) != a[oid].attr(attr)}
    return out


def perturb(rng: random.Random, scene: Scene, objs: Sequence[Obj]) -> Scene:
    """The scene with exactly one attribute of one of ``objs`` changed (colour, shape, size or cell)."""
    o = rng.choice(list(objs))
    empty = _empty_cells(scene)
    attrs = ["color", "shape", "size"] + (["position"] if empty else [])
    attr = rng.choice(attrs)
    if attr == "position":
        r, c = rng.choice(empty)
        new = o.with_(row=r, col=c)
    else:
        values = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES)}[attr]
        new = o.with_(**{attr: rng.choice([v for v in values if v != getattr(o, attr)])})
    return make_scene([new if x is o else x for x in scene])


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
        # other targets made from the same reference are natural hard negatives too
        for q in queries[len(queries) - made:]:
            q["hard_negatives"] = q["hard_negatives"] + [s for s in siblings if s != q["target"]]
    return SplitData(images, queries)


def _dump_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def generate(params: SyntheticParams, out: str | os.PathLike) -> dict:
    """Generate the whole benchmark into ``out`` (replaced atomically: an interrupted run leaves
    the previous contents, or nothing, never a half-written benchmark). Returns the counts."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    used: set = set()
    splits = {s: generate_split(params, s, used) for s in SPLITS}
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
    _dump_json({"format": FORMAT_VERSION, "params": params.model_dump(), "counts": counts}, tmp / "meta.json")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return counts


def load_params(path: str | os.PathLike | None) -> SyntheticParams:
    """The ``synthetic`` section of a params.yaml (DVC's parameter file), or the defaults."""
    if path is None:
        return SyntheticParams()
    import yaml

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
    counts = generate(params, args.out)
    log.info("wrote %s in %.1fs: %s", args.out, time.monotonic() - start, json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
