"""Reference resolution measured in cir-shapes chains: which object each phrase means, right or wrong
by the kind of phrase, and the part of the oracle's text where a wrong chain first goes wrong."""

import random

import pytest

from model_code.chain import CoT
from model_code.model.cir_cot import edit_answer
from model_code.synthetic import scenes
from model_code.synthetic.edits import sample_modification
from model_code.synthetic.oracle import oracle_cot
from model_code.synthetic.resolution import (
    first_error,
    phrase_kind,
    resolution_clauses,
    resolution_hits,
    resolution_scores,
)

REFERENCE = scenes.make_scene([scenes.Obj("triangle", "yellow", "small", 1, 0, 0),
                                scenes.Obj("triangle", "green", "small", 2, 1, 1)])
# "Give the yellow shape the colour of the lowest object"
EDITS = [{"op": "copy", "attr": "color", "cell": [1, 0], "source": [2, 1],
          "refers": ["the yellow shape", "the lowest object"]}]


def _chain() -> CoT:
    return oracle_cot("q", REFERENCE, EDITS)


@pytest.mark.parametrize("phrase, kind", [
    ("the yellow shape", "colour"), ("the red circle", "colour"), ("the big circle", "size"),
    ("the little object", "size"), ("the hexagon", "shape"), ("the circles", "shape"),
    ("the object at the top middle", "position"), ("the shape in the centre", "position"),
    ("the lowest object", "superlative"), ("the biggest shape", "superlative"),
    ("the objects that are not round", "negation"), ("the only object that is not red", "negation"),
    ("the shape", "only"),
])
def test_a_phrase_is_of_the_kind_a_modification_words(phrase, kind):
    assert phrase_kind(phrase) == kind


def test_the_oracle_resolves_every_phrase_it_states_and_equals_itself():
    chain = _chain()
    assert resolution_clauses(chain.reasoning) == [
        ("the yellow shape", "middle left: small yellow triangle"),
        ("the lowest object", "bottom centre: small green triangle")]
    assert resolution_hits(chain.reasoning, chain.reasoning) == [("colour", True), ("superlative", True)]
    assert first_error(chain.render(), chain.render()) is None
    # the padding and end of turn a batch's decoding leaves after the text are not a difference
    assert first_error(chain.render() + "<|endoftext|><|endoftext|>", chain.render()) is None


def test_the_failure_the_default_run_shows_is_a_wrong_colour_resolution():
    """The example query of the default run: the yellow shape resolved to the green triangle."""
    truth = _chain()
    wrong = CoT(truth.caption, truth.reasoning.replace("The yellow shape is middle left: small yellow triangle",
                                                       "The yellow shape is bottom centre: small green triangle"),
                truth.caption)
    assert resolution_hits(wrong.reasoning, truth.reasoning) == [("colour", False), ("superlative", True)]
    assert first_error(wrong.render(), truth.render()) == "resolution"
    scores = resolution_scores([wrong.render(), truth.render()], [truth.render()] * 2)
    assert scores["resolution_acc"] == 0.75 and scores["n_resolved"] == 4
    assert scores["resolution_acc[kind=colour]"] == 0.5 and scores["resolution_acc[kind=superlative]"] == 1.0
    assert scores["n_wrong"] == 1 and scores["first_error[part=resolution]"] == 1.0


@pytest.mark.parametrize("part, old, new", [
    ("caption", "<caption>middle left: small yellow", "<caption>middle left: large yellow"),
    ("result", "it becomes middle left: small green", "it becomes middle left: small red"),
    ("conclusion", "<conclusion>middle left: small green", "<conclusion>middle left: small blue"),
    # a list of objects that goes on belongs to the clause it lengthens
    ("resolution", "yellow triangle; the lowest", "yellow triangle and centre: small red star; the lowest"),
    # a phrase the model does not write as the oracle does is not resolved
    ("resolution", "The yellow shape is", "The yellow object is"),
])
def test_the_first_error_is_the_part_where_a_chain_leaves_the_oracles(part, old, new):
    truth = _chain().render()
    assert old in truth
    wrong = truth.replace(old, new)
    assert first_error(wrong, truth) == part
    if part == "resolution" and "object is" in new:
        assert resolution_hits(_section(wrong), _section(truth))[0] == ("colour", False)


def _section(text: str) -> str:
    return text.split("<reasoning>")[1].split("</reasoning>")[0]


def test_a_restated_scene_and_a_text_edit_answer_are_parts_too():
    rng = random.Random(3)
    while True:
        scene = scenes.random_scene(rng, iter(range(100)).__next__)
        made = sample_modification(rng, scene, 2, iter(range(100, 200)).__next__)
        if made and len(made[1]) == 2:
            break
    chain = oracle_cot("q", scene, made[1])
    answer = edit_answer(chain.reasoning, chain.conclusion)    # pretraining's text edit: no caption
    assert first_error(answer, answer) is None
    at = answer.index("Now: ") + len("Now: ")
    assert first_error(answer[:at] + "zzz" + answer[at + 3:], answer) == "restated scene"
    assert first_error(answer[:-20] + "zzz", answer) == "conclusion"
    assert first_error("", answer) == "resolution"   # nothing written: the first clause is missing
