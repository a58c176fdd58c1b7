"""``circot micro-model``: a micro Qwen2-VL checkpoint with a tokenizer trained on the texts of annotation
files, loadable as a base model (load_backbone, checkpoint_version, LoRA), the same from the same inputs."""

from __future__ import annotations

import json
import re

import pytest

from model_code.backbone import (
    MICRO_MANIFEST,
    build_micro_checkpoint,
    checkpoint_version,
    load_backbone,
    texts_from_files,
)
from model_code.model.cir_cot import CIR_TOKENS, PROMPTS, apply_lora, parameter_counts
from orchestration.__main__ import main

CAPTIONS = ["is red with long sleeves", "has a floral pattern and a belt", "is shorter and black",
            "has no sleeves and a lace collar", "show three bottles of soft drink on a wooden table",
            "shows two people and has a more colourful background"]


@pytest.fixture
def annotation_files(tmp_path):
    """A JSON list of entries (FashionIQ-like and CIRR-like) and a JSON Lines file of chains."""
    entries = [{"candidate": "B001", "target": "B002", "captions": CAPTIONS[:2]},
               {"candidate": "B003", "target": "B004", "captions": CAPTIONS[2:4]},
               {"pairid": 7, "reference": "dev-1-img0", "caption": CAPTIONS[4],
                "img_set": {"members": ["dev-1-img0", "dev-2-img1"]}}]
    listing = tmp_path / "cap.json"
    listing.write_text(json.dumps(entries))
    chains = tmp_path / "chains.jsonl"
    chains.write_text(json.dumps({"query_id": "q1", "chain": f"<caption>a photo</caption><reasoning>"
                                  f"{CAPTIONS[5]}</reasoning><conclusion>a new photo</conclusion>"}) + "\n")
    return [listing, chains]


def test_texts_are_every_string_with_a_space_and_unusable_files_are_named(annotation_files, tmp_path):
    texts = texts_from_files(annotation_files)
    assert texts[:5] == CAPTIONS[:5] and CAPTIONS[5] in texts[5]
    assert not any(t in texts for t in ("B001", "dev-1-img0", "q1"))   # ids have no space
    (tmp_path / "notes.md").write_text("# not JSON\n")
    (tmp_path / "ids.json").write_text('["B001", "B002"]')
    assert texts_from_files([*annotation_files, tmp_path / "ids.json"]) == texts   # a list of ids adds nothing
    for name, why in (("notes.md", "neither JSON nor JSON Lines"), ("absent.json", "no such file")):
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name}: {why}")):
            texts_from_files([annotation_files[0], tmp_path / name])
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'ids.json'}: no text in them")):
        texts_from_files([tmp_path / "ids.json"])


def test_micro_model_builds_a_base_that_loads_tokenises_english_and_takes_lora(annotation_files, tmp_path, capsys):
    out = tmp_path / "micro"
    argv = ["micro-model", "--out", str(out), "--texts", *map(str, annotation_files), "--vocab-size", "2000"]
    assert main(argv) == 0
    said = capsys.readouterr().out
    built = json.loads((out / MICRO_MANIFEST).read_text())
    assert f"{built['parameters']:,} parameters" in said and f"vocabulary of {built['vocab_size']:,} tokens" in said
    version = checkpoint_version(out)

    model, processor = load_backbone(out, device="cpu")
    tok = processor.tokenizer
    assert len(tok) == built["vocab_size"] <= 2000
    assert not any(t in tok.get_vocab() for t in CIR_TOKENS)   # the training adds them, as for any base
    assert 500_000 < parameter_counts(model)["total"] == built["parameters"] < 5_000_000
    config = model.config
    assert (config.model_type, config.text_config.hidden_size, config.vision_config.embed_dim) == ("qwen2_vl", 128, 64)
    for caption in CAPTIONS:   # English words in few pieces each, not a byte or a letter apiece
        assert len(tok.tokenize(" " + caption)) <= 1.5 * len(caption.split()), tok.tokenize(" " + caption)
    words = " ".join(CAPTIONS + list(PROMPTS.values())).split()
    assert sum(len(tok.tokenize(" " + w)) for w in words) / len(words) < 1.5
    assert tok.decode(tok(" has a floral pattern")["input_ids"]) == " has a floral pattern"

    peft = apply_lora(model, processor)
    counts = parameter_counts(peft)
    assert 0 < counts["trainable"] < counts["total"]
    assert all(t in tok.get_vocab() for t in CIR_TOKENS)

    # determinism: the same texts, vocabulary size and seed give the same checkpoint; a rebuild in place is allowed
    corpus = texts_from_files(annotation_files) + list(PROMPTS.values())
    again = build_micro_checkpoint(corpus, tmp_path / "again", vocab_size=2000, seed=0)
    assert checkpoint_version(again) == version
    assert (again / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    assert checkpoint_version(build_micro_checkpoint(corpus, out, vocab_size=2000, seed=1)) != version


def test_micro_model_refuses_a_folder_of_other_files_and_bad_texts(annotation_files, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    (tmp_path / "notes.md").write_text("not JSON")
    for argv, why in (
        (["--out", str(taken), "--texts", str(annotation_files[0])], "not a micro checkpoint"),
        (["--out", str(tmp_path / "m"), "--texts", str(tmp_path / "notes.md")], "neither JSON nor JSON Lines"),
        (["--out", str(tmp_path / "m"), "--texts", str(annotation_files[0]), "--vocab-size", "50"], "too small"),
    ):
        assert main(["micro-model", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("micro-model: ") and why in err and err.count("\n") == 1, err
    assert [p.name for p in taken.iterdir()] == ["keep.txt"] and not (tmp_path / "m").exists()
