"""The embedded base's pretraining corpus on cir-shapes (``model_code.datasets`` hook ``pretraining``):
scenes of its own, never the benchmark's, each with its caption, its image and text edits written in
the oracle's canonical wording; and the parser that reads generated text back into objects.

The generic job (``model_code.model.pretrain``) reaches this through the benchmark's hooks
(``BenchmarkSpec.hooks.pretraining``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from model_code.common import Progress
from model_code.model.cir_cot import edit_request
from model_code.synthetic import scenes
from model_code.synthetic.edits import _candidate_refs, not_phrase, sample_modification
from model_code.synthetic.oracle import _class_words, describe, item, object_match, oracle_cot, scene_from_text
from model_code.synthetic.resolution import resolution_scores  # noqa: F401  (the corpus's resolution measure)

SCENE_SEED = "circot-pretrain"  # scenes are drawn from random.Random(f"{SCENE_SEED}/{seed}/{i}")
# the edit ops a modification is made of, as the scores by op name them ("set" split by attribute)
EDIT_OPS = ("color", "shape", "size", "move", "add", "remove", "swap", "copy", "remove_where", "set_where")


def op_name(edit: dict) -> str:
    """The edit's op as ``EDIT_OPS`` names it (a "set" by the attribute it sets)."""
    return edit["attr"] if edit["op"] == "set" else edit["op"]


def excluded_scenes(root: str | os.PathLike | None) -> set[tuple]:
    """The scene keys of a cir-shapes benchmark folder that pretraining must never use (none when
    ``root`` is None): every image of the evaluated splits, and every image of the train split but
    its one-object scenes. There are only 648 one-object scenes and the benchmark's train split holds
    all of them as images (no query's reference or target among val and test has one object), so
    excluding them would leave the base unable to caption a one-object image at all."""
    if root is None:
        return set()
    out = set()
    for f in sorted((Path(root) / "scene_graphs").glob("*.json")):
        keys = {scenes.scene_key(scenes.scene_from_json(g)) for g in json.loads(f.read_text()).values()}
        out |= {k for k in keys if len(k) > 1} if f.stem == "train" else keys
    if not out:
        raise FileNotFoundError(f"no scene graphs under {root}/scene_graphs: cannot exclude the benchmark's scenes")
    return out


def _scene_with(rng: random.Random, n_objects: int | None, next_oid) -> tuple:
    """A random scene (of exactly ``n_objects`` objects when given: drawn until the count matches)."""
    while True:
        scene = scenes.random_scene(rng, next_oid)
        if n_objects is None or len(scene) == n_objects:
            return scene


def resolution_pairs(rng: random.Random, scene: scenes.Scene, count: int) -> tuple[tuple[str, str], ...]:
    """Up to ``count`` resolution examples of ``scene``, drawn without repeats: (the resolve prompt's
    text: the description and a phrase; the answer: the oracle's clause naming the object(s) the
    phrase means, in ``<reasoning>`` tags as a chain's reasoning starts). The phrases are those the
    modifications use: each phrase that picks out exactly one object ("the yellow shape", "the lowest
    object", "the object at the top middle"), and each class an edit of many objects takes ("all the
    red objects", "every object that is not round"), answered in the oracle's words ("The red objects
    are ...", "The only object that is not round is ...")."""
    from model_code.model.cir_cot import resolve_request

    def objects(hit) -> str:
        return " and ".join(item(o) for o in hit)

    found: list[tuple[str, str]] = []   # (phrase, clause)
    for o in scene:
        for ref in _candidate_refs(o):
            if [x.oid for x in ref.matches(scene)] == [o.oid]:
                phrase = ref.text(rng)
                found.append((phrase, f"{phrase[0].upper()}{phrase[1:]} is {item(o)}."))
    for attr, values in (("color", scenes.COLORS), ("shape", scenes.SHAPES), ("size", scenes.SIZES)):
        for value in values:
            hit = [o for o in scene if getattr(o, attr) == value]
            rest = [o for o in scene if getattr(o, attr) != value]
            if hit:
                many = _class_words(attr, value)
                found.append((f"all the {many}", f"The {many} are {objects(hit)}." if len(hit) > 1 else
                              f"The only {_class_words(attr, value, False)} is {objects(hit)}."))
            if hit and rest:
                negated = f"that {{}} not {not_phrase(attr, value)}"
                found.append((f"every object {negated.format('is')}",
                              f"The objects {negated.format('are')} are {objects(rest)}." if len(rest) > 1 else
                              f"The only object {negated.format('is')} is {objects(rest)}."))
    return tuple((resolve_request(describe(scene), phrase), f"<reasoning>{clause}</reasoning>")
                 for phrase, clause in rng.sample(found, min(count, len(found))))


def make_samples(cfg, folder: str | os.PathLike, *, exclude: set[tuple] = frozenset(),
                 progress: Callable[[str], None] | None = None) -> list:
    """``cfg.scenes + cfg.heldout`` scenes (the held-out ones last), each as ``cfg.edits_per_scene``
    consecutive samples (one modification of one to three edits each; the first is the same whatever
    the count). The held-out scenes are drawn first, from a stream of their own, in equal numbers of
    every object count (one-object scenes included: there are only 648 of them, and the training
    scenes would otherwise take them all). Images are rendered into ``folder`` under a name given by
    their scene (kept across runs: rendering is skipped for files present)."""

    from model_code.model.pretrain import PretrainSample

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seen = set(exclude)
    bar = Progress(cfg.scenes + cfg.heldout, "pretraining scenes", say=progress, every_s=15)

    def draw(stream: str, count: int, n_objects) -> list:
        out: list[PretrainSample] = []
        i = 0
        while len(out) < count * cfg.edits_per_scene:
            rng = random.Random(f"{SCENE_SEED}/{cfg.seed}/{stream}{i}")
            i += 1
            oid = iter(range(1000))
            scene = _scene_with(rng, n_objects(len(out) // cfg.edits_per_scene), oid.__next__)
            if scenes.scene_key(scene) in seen:
                continue
            made = sample_modification(rng, scene, rng.choice((1, 1, 2, 3)), oid.__next__)
            if made is None:
                continue
            seen.add(scenes.scene_key(scene))
            key = scenes.scene_key(scene)
            path = folder / f"{hashlib.sha1(repr(key).encode()).hexdigest()[:16]}.png"
            if not path.is_file():
                tmp = path.with_suffix(".tmp.png")
                scenes.render_scene(scene).save(tmp)
                os.replace(tmp, path)
            description = describe(scene)
            for j in range(cfg.edits_per_scene):
                while made is None:   # the scene admits some modification (the first draw found one)
                    made = sample_modification(rng, scene, rng.choice((1, 1, 2, 3)), oid.__next__)
                edited, edits, modification = made
                tag = f"{stream}{i}" if j == 0 else f"{stream}{i}/{j}"
                out.append(PretrainSample(
                    image=path, scene=key, description=description,
                    edit_text=edit_request(description, modification), edited=scenes.scene_key(edited),
                    conclusion=describe(edited), cot=oracle_cot(f"pretrain/{tag}", scene, edits).render(),
                    ops=tuple(op_name(e) for e in edits),
                    resolutions=resolution_pairs(random.Random(f"{SCENE_SEED}/{cfg.seed}/resolve/{tag}"), scene,
                                                 getattr(cfg, "resolves_per_scene", 0))))
                made = None
            bar.step()
        return out

    heldout = draw("heldout/", cfg.heldout, lambda n: 1 + n % scenes.MAX_OBJECTS)
    return draw("", cfg.scenes, lambda n: None) + heldout


def matches(texts: Sequence[str], truths: Sequence[tuple]) -> list[tuple[bool, float]]:
    """Per text: whether it states exactly the true objects (scene keys), and its object F1."""

    return [object_match(scene_from_text(text), set(truth)) for text, truth in zip(texts, truths)]
