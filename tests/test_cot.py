"""The three-part CoT format: strict parsing with precise reasons, lenient repair, round trip."""

import random
import string

import pytest

from model_code.annotation.judge import judge
from model_code.chain import (
    MAX_SECTION_CHARS,
    CoT,
    CoTFormatError,
    is_blank,
    normalised_text,
    parse,
    repair,
    word_count,
)

OK = "<caption>a red circle</caption>\n<reasoning>make it blue</reasoning>\n<conclusion>a blue circle</conclusion>"


def _random_text(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + " \n\t.,;:!?'\"()[]{}-_/*#<>=&é漢"
    while True:
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
        if text.strip() and not any(
            f"<{t}>" in text or f"</{t}>" in text for t in ("caption", "reasoning", "conclusion")
        ):
            return text


def test_round_trip_holds_for_arbitrary_text_without_tags():
    rng = random.Random(0)
    for _ in range(500):
        cot = CoT(_random_text(rng), _random_text(rng), _random_text(rng))
        assert parse(cot.render()) == cot


def test_render_is_the_design_form():
    assert CoT("a", "b", "c").render() == "<caption>a</caption>\n<reasoning>b</reasoning>\n<conclusion>c</conclusion>"
    assert parse(OK) == CoT("a red circle", "make it blue", "a blue circle")


@pytest.mark.parametrize(
    "text, reason, detail",
    [
        ("<caption>a</caption><reasoning>b</reasoning>", "missing_section", "no <conclusion>"),
        ("plain nonsense from a random model", "missing_section", "no <caption>"),
        (
            "<caption>a</caption><caption>b</caption><reasoning>b</reasoning><conclusion>c</conclusion>",
            "repeated_section",
            "<caption> appears 2 times",
        ),
        (
            "<caption>a</caption><reasoning>b<conclusion>c</conclusion>",
            "unclosed_section",
            "<reasoning> has no closing tag",
        ),
        (
            "<caption>a</caption>b</reasoning><conclusion>c</conclusion>",
            "unclosed_section",
            "<reasoning> has no opening tag",
        ),
        ("<reasoning>b</reasoning><caption>a</caption><conclusion>c</conclusion>", "wrong_order", "found <reasoning>"),
        ("<caption>a<reasoning>b</reasoning></caption><conclusion>c</conclusion>", "wrong_order", "caption, reasoning"),
        (
            "Sure!<caption>a</caption><reasoning>b</reasoning><conclusion>c</conclusion>",
            "text_outside_sections",
            "'Sure!'",
        ),
        (
            "<caption>a</caption><reasoning>b</reasoning><conclusion>c</conclusion> bye",
            "text_outside_sections",
            "'bye'",
        ),
        (
            "<caption>  </caption><reasoning>b</reasoning><conclusion>c</conclusion>",
            "empty_section",
            "<caption> is empty",
        ),
        (
            f"<caption>a</caption><reasoning>{'x' * (MAX_SECTION_CHARS + 1)}</reasoning><conclusion>c</conclusion>",
            "too_long",
            f"{MAX_SECTION_CHARS + 1} characters",
        ),
    ],
)
def test_every_rejection_has_a_precise_reason(text, reason, detail):
    with pytest.raises(CoTFormatError) as err:
        parse(text)
    assert err.value.reason == reason
    assert detail in str(err.value)


def test_constructing_a_bad_cot_is_refused():
    with pytest.raises(CoTFormatError, match="tag_in_section"):
        CoT("a <reasoning> b", "c", "d")
    with pytest.raises(CoTFormatError, match="empty_section"):
        CoT("a", "", "d")


@pytest.mark.parametrize(
    "text, repairs",
    [
        (
            "**Caption:** a red circle\n**Reasoning**: make it blue\n**Conclusion:** a blue circle",
            {"markdown heading for caption", "markdown heading for reasoning", "markdown heading for conclusion"},
        ),
        (
            "## Caption\na red circle\n\n## Reasoning\nmake it blue\n## Conclusion\na blue circle",
            {"markdown heading for caption"},
        ),
        (
            "Caption: a red circle\nReasoning: make it blue\nConclusion: a blue circle",
            {"markdown heading for reasoning"},
        ),
        (
            "<caption>a red circle<reasoning>make it blue</reasoning><conclusion>a blue circle</conclusion>",
            {"added missing </caption>"},
        ),
        (
            "<caption>a red circle</caption><reasoning>make it blue</reasoning><conclusion>a blue circle",
            {"added missing </conclusion>"},
        ),
        (
            "Here you go:\n```\n" + OK + "\n```\nHope this helps!",
            {"removed code fences", "dropped text before the sections", "dropped text after conclusion"},
        ),
    ],
)
def test_repair_recovers_common_teacher_deviations_and_says_what_it_did(text, repairs):
    fixed = repair(text)
    assert fixed.cot == CoT("a red circle", "make it blue", "a blue circle")
    assert repairs <= set(fixed.repairs)


def test_repair_leaves_good_text_alone_and_refuses_hopeless_text():
    assert repair(OK).repairs == ()
    for text, reason in [("gibberish", "missing_section"), ("Caption: a\nConclusion: c", "missing_section"),
                         ("Caption: a\nCaption: b\nReasoning: r\nConclusion: c", "repeated_section"),
                         ("Reasoning: r\nCaption: a\nConclusion: c", "wrong_order"),
                         ("<caption>a</caption><reasoning> </reasoning><conclusion>c</conclusion>", "empty_section")]:
        with pytest.raises(CoTFormatError) as err:
            repair(text)
        assert err.value.reason == reason, text


# characters of rendering categories that draw nothing (Hangul fillers, the combining grapheme joiner,
# variation selectors, a Khmer inherent vowel, a Mongolian selector, the blank braille pattern)
DRAW_NOTHING = ["\u3164", "\uffa0", "\u115f", "\u1160", "\u034f", "\ufe00", "\ufe0f", "\U000e0100", "\u17b4",
                "\u180b", "\u2800"]


@pytest.mark.parametrize("ch", DRAW_NOTHING)
def test_text_of_fillers_and_selectors_is_empty_for_the_judge_the_search_and_the_suite(ch):
    import re

    from model_code.annotation.judge import judge
    from model_code.chain import visible_pattern
    from model_code.retrieval import QueryError, check_text

    text = f"{ch}{ch} {ch}\u200b"
    assert is_blank(text) and not re.search(visible_pattern(), text)   # the triplets suite's regex agrees
    with pytest.raises(QueryError):
        check_text(text)                                              # /search, the evaluation's queries
    answer = judge("q", "t", "v", f"<caption>a red circle</caption><reasoning>{text}</reasoning>"
                                   "<conclusion>a blue circle</conclusion>")
    assert (answer.status, answer.reject_reason) == ("rejected", "empty_section")
    assert judge("q", "t", "v", text).reject_reason == "empty_answer"
    # beside a letter they are harmless: an emoji with its variation selector, a mark on its letter
    for shown in (f"a{ch}", "\u2764\ufe0f", "e\u0301", "한"):
        assert not is_blank(shown) and re.search(visible_pattern(), shown)
    assert is_blank("\u0301")     # a combining mark alone draws nothing of its own


def test_one_notion_of_empty_and_of_repeats_for_every_script():
    # nothing but spaces of any script and format characters (zero-width, BOM, bidi marks) is empty
    for blank in ("", " \t\n", "\u200b\u200c\u200d\u2060\ufeff", "\u00ad\u200e\u200f\u202a", "\u3000\u00a0", None):
        assert is_blank(blank)
    assert not is_blank("赤") and not is_blank("🟥")
    with pytest.raises(CoTFormatError, match="empty_section"):
        CoT("a red circle", "\u200b\u2060\u200e", "a blue circle")
    # chains in other scripts are accepted; a conclusion repeats its caption only when it says the same
    chains = {
        "chinese": ("一个红色的圆", "把红色改成蓝色", "一个蓝色的圆"),
        "arabic": ("دائرة حمراء", "اللون يصبح أزرق", "دائرة زرقاء"),
        "russian": ("Красный круг", "цвет меняется на синий", "Синий круг"),
        "emoji": ("a 🟥 circle", "the colour changes", "a 🟦 circle"),
    }
    for name, (cap, reasoning, con) in chains.items():
        assert judge("q", "t", "v", CoT(cap, reasoning, con).render()).ok, name
        assert judge("q", "t", "v", CoT(cap, reasoning, cap + " !").render()).reject_reason == \
            "conclusion_repeats_caption", name
    assert normalised_text("Ａ  Red\u200bCircle!") == normalised_text("a red circle")
    # words: spaces where a script has them, each ideograph or kana where it has none
    assert word_count("make the circle red") == 4
    assert word_count("把红色改成蓝色") == 7 and word_count("colour 赤い circle") == 4
