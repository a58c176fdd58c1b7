"""The oracle's canonical wording on cir-shapes: one way to say each thing, objects cell first and row by
row, the scene restated after each edit but the last, and the parser that reads it back."""

import random

from model_code.synthetic import scenes
from model_code.synthetic.edits import apply_edits, sample_modification
from model_code.synthetic.oracle import CELLS, describe, item, oracle_cot, scene_from_text


def _queries(n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        oid = iter(range(1000))
        scene = scenes.random_scene(rng, oid.__next__)
        made = sample_modification(rng, scene, rng.choice((1, 2, 3)), oid.__next__)
        if made is not None:
            out.append((scene, *made))
    return out


def test_a_scene_is_written_one_way_cell_first_and_row_by_row():
    scene = scenes.make_scene([scenes.Obj("star", "blue", "small", 1, 1), scenes.Obj("circle", "red", "large", 0, 0)])
    assert describe(scene) == "top left: large red circle; centre: small blue star."
    assert len(set(CELLS.values())) == 9
    # the wording is a function of the scene and the edits alone, not of the query's id
    for reference, _target, edits, _ in _queries(30):
        assert oracle_cot("a", reference, edits) == oracle_cot("b", reference, edits)


def test_unchanged_objects_are_literal_copies_and_the_reasoning_carries_the_scene():
    for reference, target, edits, _ in _queries(200, seed=1):
        cot = oracle_cot("q", reference, edits)
        assert cot.caption == describe(reference) and cot.conclusion == describe(target)
        # every object the edits leave alone is written in the conclusion exactly as in the caption
        kept = {item(o) for o in reference} & {item(o) for o in target}
        assert all(k in cot.caption and k in cot.conclusion for k in kept)
        # after each edit but the last, the whole scene as it stands; the last one leads to the conclusion
        states = [describe(apply_edits(reference, edits[:i + 1])) for i in range(len(edits) - 1)]
        assert cot.reasoning.count("Now: ") == len(edits) - 1
        assert all(f"Now: {st}" in cot.reasoning for st in states)
        # each step names the objects its phrases refer to in the same item format
        for e in edits:
            for phrase in e.get("refers", []):
                assert f"{phrase} is " in cot.reasoning or f"{phrase[0].upper()}{phrase[1:]} is " in cot.reasoning


def test_the_parser_reads_the_canonical_wording_and_the_earlier_one():
    for reference, target, edits, _ in _queries(100, seed=2):
        cot = oracle_cot("q", reference, edits)
        assert scene_from_text(cot.conclusion) == set(scenes.scene_key(target))
        assert scene_from_text(cot.caption) == set(scenes.scene_key(reference))
    assert scene_from_text("top centre: small blue star; centre: large red circle.") == {
        ("star", "blue", "small", 0, 1), ("circle", "red", "large", 1, 1)}
    assert scene_from_text("a big Red circle in the upper left corner, then nonsense") == {
        ("circle", "red", "large", 0, 0)}
    assert scene_from_text("top left: red circle; the centre") == set()   # no size: no object
