"""The oracle chain of thought for cir-shapes: written from the scene graphs and the structured edits.

The caption describes the reference; the reasoning takes each edit in turn, says which object a
phrase refers to (resolving "the leftmost shape" or "the colour of the square" against the scene),
what it becomes, and finally what stays unchanged; the conclusion describes the whole resulting
scene. Wording varies (several templates per sentence), chosen by a generator seeded with the query
id, so the same query always gets the same text.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from model_code.synthetic import scenes
from model_code.synthetic.edits import apply_edit, not_phrase, scene_changes
from model_code.annotation.cot import CoT
from model_code.annotation.judge import Annotation, AnnotationRequest, judge, rejection

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


def _desc(o: scenes.Obj, rng: random.Random, article: str = "a") -> str:
    return f"{article} {o.size} {o.color} {o.shape} in the {rng.choice(scenes.CELL_NAMES[o.cell])}"


def _listing(objs, rng: random.Random, article: str = "a") -> str:
    parts = [_desc(o, rng, article) for o in objs]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(scene: scenes.Scene, rng: random.Random, *, result: bool) -> str:
    """A full description of a scene: the caption (``result`` False) or the conclusion (True)."""
    n = len(scene)
    items = _listing(scene, rng)
    if n == 1:
        templates = (["The result is {items} and nothing else.", "The edited scene holds just {items}.",
                      "So the image should contain only {items}."] if result else
                     ["The image shows one shape: {items}.", "There is only {items}.",
                      "A plain background with {items}."])
    else:
        templates = (["The result shows {n} shapes: {items}.", "The edited scene has {n} objects: {items}.",
                      "So the image should contain {items}.", "The final scene contains {n} objects: {items}."]
                     if result else
                     ["The image shows {n} shapes: {items}.", "There are {n} objects: {items}.",
                      "A scene with {n} shapes: {items}."])
    return rng.choice(templates).format(n=NUMBER_WORDS[n], items=items)


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _resolve(phrase: str, o: scenes.Obj, rng: random.Random) -> str:
    """'the leftmost shape is the small red circle in the top left corner'."""
    return rng.choice(["{p} is {d}", "{p} refers to {d}", "{p} means {d}"]).format(p=phrase, d=_desc(o, rng, "the"))


def _class_words(attr: str, value, plural: bool = True) -> str:
    if attr == "shape":
        return scenes.SHAPE_PLURAL[value] if plural else value
    return f"{value} objects" if plural else f"{value} object"


def _edit_sentence(edit: dict, scene: scenes.Scene, new: scenes.Scene, rng: random.Random) -> str:
    op = edit["op"]
    refers = edit.get("refers", [])
    if op in ("set", "copy", "move", "remove"):
        o = next(x for x in scene if x.cell == tuple(edit["cell"]))
        who = _resolve(refers[0], o, rng)
    if op == "set":
        attr, v = edit["attr"], edit["value"]
        change = {"color": f"it becomes {v}", "shape": f"it becomes a {o.size} {o.color} {v}",
                  "size": f"it becomes {'large' if v == 'large' else 'small'}"}[attr]
        return rng.choice(["{w}, so {c}.", "{w}; {c}.", "{w}, and {c}."]).format(w=who, c=change)
    if op == "copy":
        attr = edit["attr"]
        src = next(x for x in scene if x.cell == tuple(edit["source"]))
        value = getattr(src, attr)
        word = {"color": "colour", "shape": "shape", "size": "size"}[attr]
        source = _cap(_resolve(refers[1], src, rng))
        becomes = f"a {value}" if attr == "shape" else value
        return rng.choice([
            "{w}. {s}, whose {word} is {v}; so the {t} takes that {word} and becomes {b}.",
            "{w}. {s}, which is {b}; so the {t} becomes {b} as well.",
        ]).format(w=who, s=source, word=word, v=value, b=becomes, t=o.shape)
    if op == "move":
        to = scenes.CELL_NAMES[tuple(edit["to"])][0]
        return rng.choice(
            ["{w}; it moves from the {a} to the {b}.", "{w}, so it goes from the {a} to the {b}."]
        ).format(w=who, a=scenes.CELL_NAMES[o.cell][0], b=to)
    if op == "remove":
        return rng.choice(["{w}; it is removed.", "{w}, and it disappears.", "{w}; that object goes away."]).format(
            w=who
        )
    if op == "add":
        d = edit["object"]
        o = scenes.Obj(d["shape"], d["color"], d["size"], d["row"], d["col"])
        d = _desc(o, rng)
        return rng.choice(["A new {n} is added.", "{D} appears.", "We add {d}."]).format(n=d[2:], d=d, D=_cap(d))
    if op == "swap":
        a = next(x for x in scene if x.cell == tuple(edit["cells"][0]))
        b = next(x for x in scene if x.cell == tuple(edit["cells"][1]))
        ra, rb = _resolve(refers[0], a, rng), _resolve(refers[1], b, rng)
        if edit["attr"] == "position":
            return f"{_cap(ra)} and {rb}; they trade places, so the {a.shape} goes to the " \
                   f"{scenes.CELL_NAMES[b.cell][0]} and the {b.shape} to the {scenes.CELL_NAMES[a.cell][0]}."
        attr = edit["attr"]
        word = "colours" if attr == "color" else "shapes"
        return (f"{_cap(ra)} and {rb}; swapping their {word}, the first becomes "
                f"{getattr(b, attr)} and the second {getattr(a, attr)}.")
    if op in ("remove_where", "set_where"):
        attr, value = edit["where"], edit["value"]
        if op == "remove_where":
            hit = [o for o in scene if (getattr(o, attr) == value) != edit["negate"]]
            negated = f"{{}} that {{}} not {not_phrase(attr, value)}"
            cls = (negated.format("objects", "are") if edit["negate"] else _class_words(attr, value),
                   negated.format("object", "is") if edit["negate"] else _class_words(attr, value, False))
            what = "they are removed" if len(hit) > 1 else "it is removed"
        else:
            hit = [o for o in scene if getattr(o, attr) == value]
            cls = (_class_words(attr, value), _class_words(attr, value, False))
            what = f"{'they all become' if len(hit) > 1 else 'it becomes'} {edit['to']}"
        listing = _listing(hit, rng, "the")
        if len(hit) > 1:
            return rng.choice(["The {c} are {l}; {w}.", "Looking at the scene, the {c} are {l}; {w}."]).format(
                c=cls[0], l=listing, w=what)
        return rng.choice(["The only {c} is {l}; {w}.", "Looking at the scene, the only {c} is {l}; {w}."]).format(
            c=cls[1], l=listing, w=what)
    raise ValueError(f"unknown edit op {op!r}")


def oracle_cot(query_id: str, reference: scenes.Scene, edits: list[dict]) -> CoT:
    """The chain of thought for one query from its reference scene graph and its edits."""
    rng = random.Random(f"oracle/{query_id}")
    caption = describe(reference, rng, result=False)
    scene, touched, sentences = reference, set(), []
    openers = ["First, ", "Then ", "Finally, "] if len(edits) > 1 else [""]
    if len(edits) == 2:
        openers = ["First, ", rng.choice(["Then ", "Next, "])]
    for i, edit in enumerate(edits):
        new = apply_edit(scene, edit)
        text = _edit_sentence(edit, scene, new, rng)
        opener = openers[i]
        sentences.append(opener + text[0].lower() + text[1:] if opener else _cap(text))
        touched |= {oid for oid, _ in scene_changes(scene, new)}
        scene = new
    kept = [o for o in reference if o.oid not in touched]
    if kept:
        kept_text = _listing(kept, rng, "the")
        sentences.append(rng.choice([
            "Everything else stays as it is: {k}.", "Unchanged: {k}.",
            "The rest keeps its place, colour and size: {k}."]).format(k=kept_text))
    else:
        sentences.append(rng.choice(["No object of the reference is left untouched.",
                                     "Every original object is affected."]))
    return CoT(caption, " ".join(sentences), describe(scene, rng, result=True))


def scene_from_text(text: str) -> set[tuple]:
    """The objects a description states, as ``synthetic.scene_key`` tuples (shape, colour, size, row,
    col): every "<size> <colour> <shape> in the <place>" in ``text``. Used to check whether a
    generated conclusion describes the target scene."""
    import re

    sizes = {w: s for s, words in scenes.SIZE_WORDS.items() for w in words}
    cells = {name: cell for cell, names in scenes.CELL_NAMES.items() for name in names}
    pattern = re.compile(
        r"\b({})\s+({})\s+({})\s+in\s+the\s+({})\b".format(
            "|".join(sizes),
            "|".join(scenes.COLORS),
            "|".join(scenes.SHAPES),
            "|".join(sorted(cells, key=len, reverse=True)),
        )
    )
    return {(shape, color, sizes[size], *cells[place]) for size, color, shape, place in pattern.findall(text.lower())}


def object_match(stated: set, truth: set) -> tuple[bool, float]:
    """Whether a description states exactly the true objects, and the F1 of its objects against them
    (1.0 when both are empty)."""
    hit = len(stated & truth)
    return stated == truth, (2 * hit / (len(stated) + len(truth)) if stated or truth else 1.0)


# ---------------------------------------------------------------------------------------------
# the annotator

ORACLE_VERSION = "oracle-v1"


class OracleAnnotator:
    """Exact chains of thought for the cir-shapes benchmark at ``root`` (see model_code.synthetic.oracle)."""

    name = "oracle"
    prompt_version = ORACLE_VERSION
    default_min_acceptance = 1.0

    def __init__(self, root: str | os.PathLike):
        from model_code.synthetic import generate  # pydantic: not imported by the pretraining (the GPU image has none)

        self.root = Path(root)
        self._queries, self._graphs = {}, {}
        for split in generate.SPLITS:
            captions = self.root / "captions" / f"cap.{split}.json"
            if not captions.is_file():
                continue
            for q in json.loads(captions.read_text()):
                self._queries[q["query_id"]] = q
            self._graphs.update(json.loads((self.root / "scene_graphs" / f"{split}.json").read_text()))
        if not self._queries:
            raise FileNotFoundError(
                f"no cir-shapes captions under {self.root}: the oracle only annotates the synthetic benchmark"
            )

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]:
        out = []
        for r in requests:
            q = self._queries.get(r.query_id)
            if q is None:
                out.append(rejection(r.query_id, self.name, self.prompt_version, "", "unknown_query"))
                continue
            cot = oracle_cot(r.query_id, scenes.scene_from_json(self._graphs[q["reference"]]), q["edits"])
            out.append(judge(r.query_id, self.name, self.prompt_version, cot.render()))
        return out
