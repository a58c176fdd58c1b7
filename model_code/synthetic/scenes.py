"""cir-shapes scenes: objects of a shape, colour and size on a 3x3 grid, their scene graphs and rendering.

A scene is a tuple of :class:`Obj` sorted by cell (at most one object per cell); its JSON form is
what ``scene_graphs/<split>.json`` holds, and :func:`render_scene` is a pure function of it.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Iterable

from PIL import Image, ImageDraw

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


def empty_cells(scene: Scene) -> list[tuple[int, int]]:
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
