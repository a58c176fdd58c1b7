"""cir-shapes edits: referring expressions, the structured edits a modification is made of, their
phrasing, and the perturbations that make hard distractors.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence

from model_code.synthetic.scenes import (
    CELL_NAMES,
    COLORS,
    DIRECTIONS,
    MAX_OBJECTS,
    OBJECT_WORDS,
    SHAPE_PLURAL,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    Obj,
    Scene,
    empty_cells,
    make_scene,
    scene_key,
)

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
            na, nb = (
                a.with_(**{edit["attr"]: getattr(b, edit["attr"])}),
                b.with_(**{edit["attr"]: getattr(a, edit["attr"])}),
            )
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
        empty = empty_cells(scene)
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
        empty = empty_cells(scene)
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
            "color": [
                "make {A} the same colour as {B}",
                "give {A} the colour of {B}",
                "paint {A} in the colour of {B}",
            ],
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
            text = rng.choice(
                [f"make all the {cls} {to}", f"paint every one of the {cls} {to}", f"turn all {cls} {to}"]
            )
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
        out |= {
            (oid, attr) for attr in ("color", "shape", "size", "position") if b[oid].attr(attr) != a[oid].attr(attr)
        }
    return out


def perturb(rng: random.Random, scene: Scene, objs: Sequence[Obj]) -> Scene:
    """The scene with exactly one attribute of one of ``objs`` changed (colour, shape, size or cell)."""
    o = rng.choice(list(objs))
    empty = empty_cells(scene)
    attrs = ["color", "shape", "size"] + (["position"] if empty else [])
    attr = rng.choice(attrs)
    if attr == "position":
        r, c = rng.choice(empty)
        new = o.with_(row=r, col=c)
    else:
        values = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES)}[attr]
        new = o.with_(**{attr: rng.choice([v for v in values if v != getattr(o, attr)])})
    return make_scene([new if x is o else x for x in scene])
