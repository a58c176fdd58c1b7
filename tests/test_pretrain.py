"""The embedded base's pretraining job: its own scenes (never the benchmark's), perception measured in
generated text, and an interrupted run that resumes to exactly the uninterrupted result."""

import json

import pytest
import torch

from model_code import backbone
from model_code.model import pretrain
from model_code.model.pretrain import PretrainConfig
from model_code.synthetic import pretraining
from tests._png import drawn, pixels


@pytest.fixture
def micro_shape(monkeypatch):
    monkeypatch.setitem(backbone.SHAPES, "micro", backbone.BackboneShape(
        text_hidden=64, text_layers=2, text_heads=2, text_kv_heads=1, text_intermediate=128, vision_embed=32,
        vision_depth=2, vision_heads=2, image_size=56, patch_size=7))
    return "micro"


# the keys of config.json as pretraining runs wrote it before PretrainConfig extended TrainConfig
EARLIER_CONFIG_KEYS = ("corpus", "shape", "vocab_size", "seed", "scenes", "heldout", "steps", "batch_size", "lr",
                       "warmup_steps", "caption_fraction", "edit_fraction", "identity_queries", "mixed_precision",
                       "eval_every", "checkpoint_every", "edit_answer", "align_size", "edits_per_scene", "init",
                       "start_edits", "advance_at", "advance_by_step", "oversample_ops", "oversample")


def _config(shape: str, **kw) -> PretrainConfig:
    return PretrainConfig(**{"shape": shape, "vocab_size": 400, "scenes": 24, "heldout": 4, "steps": 4, "batch_size": 4,
                             "eval_every": 2, "warmup_steps": 1, "mixed_precision": "no", **kw})


def test_no_scene_of_the_benchmark_is_pretrained_on(tmp_path, tiny_synthetic):
    from model_code.synthetic import scenes

    bench = pretraining.excluded_scenes(tiny_synthetic)
    assert len(bench) > 50
    # every image of the evaluated splits is excluded; of the train split, all but the one-object scenes
    # (the benchmark's train split holds every one of them: excluding them would leave none to caption)
    for split in ("train", "val", "test"):
        graphs = json.loads((tiny_synthetic / "scene_graphs" / f"{split}.json").read_text()).values()
        keys = {scenes.scene_key(scenes.scene_from_json(g)) for g in graphs}
        assert {k for k in keys if split != "train" or len(k) > 1} <= bench
        assert not {k for k in keys if split == "train" and len(k) == 1} & bench
        assert split != "train" or any(len(k) == 1 for k in keys)
    cfg = _config("tiny", scenes=20, heldout=2)
    first = pretrain.make_samples(cfg, tmp_path / "a")
    # the generator's first scene, declared a benchmark image: it is skipped, the next ones come instead
    samples = pretrain.make_samples(cfg, tmp_path / "b", exclude=bench | {first[0].scene})
    keys = [s.scene for s in samples]
    assert first[0].scene not in keys and not set(keys) & bench
    assert len(samples) == 22 and len(set(keys)) == 22
    assert keys[:3] == [s.scene for s in first[1:4]]
    # each image is its scene, and each text edit's answer states the edited scene's objects
    from model_code.synthetic.oracle import scene_from_text

    s = samples[0]
    assert scenes.scene_key(scenes.make_scene(scenes.Obj(*o) for o in s.scene)) == s.scene
    assert scene_from_text(s.conclusion) == set(s.edited) and scene_from_text(s.description) == set(s.scene)
    assert "Modification: " in s.edit_text and s.image.is_file()


def test_perception_scores_read_generated_text_back_into_objects():
    truth = (("star", "red", "small", 0, 0), ("circle", "blue", "large", 2, 2))
    right = "<caption>There are two objects: a small red star in the top left corner and a big blue circle in " \
            "the lower right corner.</caption>"
    half = "<caption>A scene with two shapes: a small red star in the top left corner and a small blue circle " \
           "in the centre.</caption>"
    exact, f1 = pretrain._scores([right, half, "nonsense"], [truth] * 3)
    assert exact == pytest.approx(1 / 3)
    assert f1 == pytest.approx((1 + 0.5 + 0) / 3)


def test_an_interrupted_pretraining_resumes_to_the_uninterrupted_result(tmp_path, micro_shape):
    cfg = _config(micro_shape)
    whole = pretrain.pretrain(cfg, tmp_path / "whole")
    assert whole is not None and whole.steps == 4
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    for key in ("caption_exact", "caption_object_f1", "edit_exact", "text_to_image_R@1", "cap", "edit", "info"):
        assert key in rows[-1]
    plot = pixels(tmp_path / "whole" / "perception.png")
    assert plot.shape == (324, 900, 3)  # 10 x 3.6 in at 90 dpi
    left = plot[:, :450]  # the perception metrics' panel: a line of each of the 4 metrics
    assert all(drawn(left, f"C{i}", 20) > 20 for i in range(4)), [drawn(left, f"C{i}", 20) for i in range(4)]

    # stopped at the first evaluation point (minutes=0), then the same call again; the stopped run's
    # config.json as earlier versions wrote it (pretraining's own keys and the stage fields they set)
    assert pretrain.pretrain(cfg, tmp_path / "split", minutes=0) is None
    assert not (tmp_path / "split" / "model").exists()
    written = json.loads((tmp_path / "split" / "config.json").read_text())
    (tmp_path / "split" / "config.json").write_text(json.dumps({k: written[k] for k in EARLIER_CONFIG_KEYS}))
    resumed = pretrain.pretrain(cfg, tmp_path / "split")
    assert resumed.version == whole.version

    # a finished run is not trained again; another configuration in the same folder is refused
    assert pretrain.pretrain(cfg, tmp_path / "split").version == whole.version
    pretrain.pretrain(cfg, tmp_path / "unfinished", minutes=0)
    with pytest.raises(ValueError, match="another configuration"):
        pretrain.pretrain(_config(micro_shape, lr=0.5), tmp_path / "unfinished")


def test_the_exported_checkpoint_loads_like_any_other(tmp_path, micro_shape):
    from model_code.backbone import checkpoint_version, load_backbone

    cfg = _config(micro_shape, steps=2)
    record = pretrain.pretrain(cfg, tmp_path / "run")
    exported = pretrain.export_checkpoint(tmp_path / "run", tmp_path / "exported")
    assert checkpoint_version(exported) == record.version   # the last checkpoint is the final model
    model, processor = load_backbone(exported, device="cpu")
    assert next(model.parameters()).dtype == torch.float32 and "<emb>" in processor.tokenizer.get_vocab()
    weights = exported / "model.safetensors"
    from safetensors import safe_open

    with safe_open(weights, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_the_published_base_is_registered_and_a_damaged_one_refused(tmp_path, micro_shape):
    from model_code.model.recipes import register_embedded

    pretrain.pretrain(_config(micro_shape, steps=2), tmp_path / "run")
    dest = pretrain.publish(tmp_path / "run", tmp_path / "embedded_base", "make pretrain")
    meta = json.loads((dest / "PRETRAINING.json").read_text())
    assert meta["steps"] == 2 and meta["command"] == "make pretrain" and [r["step"] for r in meta["curve"]] == [2]
    assert "caption_exact" in meta["perception"]
    record = register_embedded(dest)
    assert record.kind == "embedded" and record.version == meta["version"]
    weights = dest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(FileNotFoundError, match="changed or damaged"):
        register_embedded(dest)
    with pytest.raises(FileNotFoundError, match="make pretrain"):
        register_embedded(tmp_path / "nowhere")


def test_several_edits_per_scene_share_its_image_and_keep_its_first_edit(tmp_path):
    from model_code.chain import parse
    from model_code.synthetic.oracle import scene_from_text

    one = pretrain.make_samples(_config("tiny", scenes=6, heldout=2), tmp_path / "one")
    three = pretrain.make_samples(_config("tiny", scenes=6, heldout=2, edits_per_scene=3), tmp_path / "three")
    assert len(three) == 3 * len(one) == 24
    for n, s in enumerate(one):
        group = three[3 * n:3 * n + 3]
        assert {g.image.name for g in group} == {s.image.name} and {g.scene for g in group} == {s.scene}
        assert (group[0].edit_text, group[0].edited, group[0].cot) == (s.edit_text, s.edited, s.cot)
    assert len({s.edit_text for s in three}) > len(one) + 6   # the extra edits are other modifications
    # the "chain" answer: the oracle's reasoning, then a conclusion that states the edited scene
    answer = pretrain.edit_target(three[4], "chain")
    assert answer.startswith("<reasoning>") and answer.endswith("</conclusion>")
    conclusion = answer.split("<conclusion>")[1]
    assert scene_from_text(conclusion) == set(three[4].edited)
    assert parse(three[4].cot).reasoning in answer
    assert pretrain.edit_target(three[4]) == f"<conclusion>{three[4].conclusion}</conclusion>"
    with pytest.raises(ValueError, match="edit_answer"):
        _config("tiny", edit_answer="essay")


def test_pretraining_continues_from_a_checkpoint_with_a_text_heavy_batch(tmp_path, micro_shape, monkeypatch):
    from model_code.backbone import load_backbone
    from model_code.model.cir_cot import CirCoTModel

    first = pretrain.pretrain(_config(micro_shape, steps=2), tmp_path / "first")
    sizes = []
    gallery_inputs = CirCoTModel.gallery_inputs
    monkeypatch.setattr(CirCoTModel, "gallery_inputs", lambda self, c: sizes.append(len(c)) or gallery_inputs(self, c))
    cfg = _config(micro_shape, steps=2, init=first.path, edit_answer="chain", edits_per_scene=2, align_size=2,
                  batch_size=6, edit_fraction=1.0)
    # the starting point is the checkpoint itself (its weights and its tokenizer), not a new model
    start = {k: v.clone() for k, v in load_backbone(first.path, device="cpu")[0].state_dict().items()}
    record = pretrain.pretrain(cfg, tmp_path / "second")
    init = load_backbone(tmp_path / "second" / "init", device="cpu")[0].state_dict()
    assert all(torch.equal(init[k], v) for k, v in start.items())
    assert record.version != first.version and record.config["init"] == first.path
    assert set(sizes[:2]) == {2}            # two images aligned per step, of a batch of six text edits
    assert "edit_exact" in record.perception

    # published with its lineage: the phase it continued (a run folder, or a published base with its own)
    base1 = pretrain.publish(tmp_path / "first", tmp_path / "base1", "phase one")
    base2 = pretrain.publish(tmp_path / "second", tmp_path / "base2", "phase two", earlier=[base1])
    meta = json.loads((base2 / "PRETRAINING.json").read_text())
    assert [p["command"] for p in meta["earlier"]] == ["phase one"] and meta["config"]["edit_answer"] == "chain"
    assert meta["earlier"][0]["version"] == first.version and meta["curve"][-1]["device"] == "cpu"
    from_folder = pretrain.publish(tmp_path / "second", tmp_path / "base3", "x", earlier=[tmp_path / "first", base2])
    phases = json.loads((from_folder / "PRETRAINING.json").read_text())["earlier"]
    assert [p["steps"] for p in phases] == [2, 2, 2] and phases[0]["config"]["init"] == ""
    assert [p.get("command") for p in phases[1:]] == ["phase one", "phase two"]


def test_the_pretraining_imports_without_pydantic():
    """The GPU image has torch, transformers and accelerate but no pydantic: the pretraining (and the
    scene generator, oracle and training loop it uses) must import there without it."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import model_code.model.pretrain, model_code.model.train, model_code.model.cir_cot\n"
            "import model_code.synthetic.oracle, model_code.synthetic.edits, model_code.synthetic.scenes\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pydantic'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_held_out_scenes_hold_every_object_count_and_are_never_trained_on(tmp_path):
    cfg = _config("tiny", scenes=40, heldout=8)
    samples = pretrain.make_samples(cfg, tmp_path / "s")
    train, heldout = samples[:40], samples[40:]
    assert sorted(len(s.scene) for s in heldout) == [1, 1, 2, 2, 3, 3, 4, 4]
    assert not {s.scene for s in train} & {s.scene for s in heldout}
    assert all(len(s.ops) in (1, 2, 3) and set(s.ops) <= set(pretraining.EDIT_OPS) for s in samples)


def test_the_curriculum_holds_single_edits_until_they_are_right_then_takes_every_count(tmp_path, micro_shape,
                                                                                         monkeypatch):
    cfg = _config(micro_shape, steps=6, scenes=30, start_edits=1, advance_at=0.8, oversample_ops=("swap", "move"),
                  oversample=3)
    samples = pretrain.make_samples(cfg, tmp_path / "s")[:30]
    exs = pretrain.examples(samples)
    pool = pretrain.curriculum_pool(samples, exs, cfg, 1)
    weak = [s for s in samples if len(s.ops) == 1 and set(s.ops) & {"swap", "move"}]
    assert len(pool) == sum(len(s.ops) == 1 for s in samples) + 2 * len(weak)
    assert len(pretrain.curriculum_pool(samples, exs, cfg, 3)) == len(samples) + 2 * sum(
        bool(set(s.ops) & {"swap", "move"}) for s in samples)

    # what each chunk trains on: single edits while they score 0.5, 0.7; every count once they score 0.85
    pools, scores = [], iter([0.5, 0.85, 0.9])
    train = pretrain.train
    monkeypatch.setattr(pretrain, "train", lambda m, ex, *a, **k: pools.append(len(ex)) or train(m, ex, *a, **k))
    monkeypatch.setattr(pretrain, "perception", lambda *a, **k: {
        "caption_exact": 1.0, "caption_object_f1": 1.0, "edit_exact": 0.5, "text_to_image_R@1": 1.0,
        "eval_seconds": 0.0, "edit_exact[edits=1]": next(scores)})
    pretrain.pretrain(cfg, tmp_path / "run")
    rows = pretrain.read_metrics(tmp_path / "run")
    assert [r["trained_max_edits"] for r in rows] == [1, 1, 3] and [r["max_edits"] for r in rows] == [1, 3, 3]
    assert pools[0] == pools[1] < pools[2]
    with pytest.raises(ValueError, match="oversample_ops"):
        _config("tiny", oversample_ops=("teleport",))


def test_a_curriculum_run_resumes_at_the_level_it_reached(tmp_path, micro_shape, monkeypatch):
    cfg = _config(micro_shape, steps=6, scenes=30, start_edits=1)
    monkeypatch.setattr(pretrain, "perception", lambda *a, **k: {
        "caption_exact": 1.0, "caption_object_f1": 1.0, "edit_exact": 0.5, "text_to_image_R@1": 1.0,
        "eval_seconds": 0.0, "edit_exact[edits=1]": 0.9})
    whole = pretrain.pretrain(cfg, tmp_path / "whole")
    assert pretrain.pretrain(cfg, tmp_path / "split", minutes=0) is None      # stopped after the first chunk
    assert [r["max_edits"] for r in pretrain.read_metrics(tmp_path / "split")] == [3]
    resumed = pretrain.pretrain(cfg, tmp_path / "split")
    assert resumed.version == whole.version
    assert [r["trained_max_edits"] for r in pretrain.read_metrics(tmp_path / "split")] == [1, 3, 3]


def test_the_configurations_pretraining_runs_wrote_still_load_and_train_as_they_did():
    """The shipped base's PRETRAINING.json holds the configuration of each of its phases as the code of
    its day wrote it (five generations of keys): each loads, and trains the stage the code of its day
    built from it (written out here as it was)."""
    import math

    from model_code.model.recipes import EMBEDDED_BASE
    from model_code.model.train import TrainConfig

    meta = json.loads((EMBEDDED_BASE / "PRETRAINING.json").read_text())
    saved = [p["config"] for p in meta["earlier"]] + [meta["config"]]
    assert len({tuple(sorted(c)) for c in saved}) >= 4 and all(set(c) <= set(EARLIER_CONFIG_KEYS) for c in saved)
    for c in saved:
        cfg = PretrainConfig.from_saved(c)
        assert all(getattr(cfg, k) == (tuple(v) if isinstance(v, list) else v) for k, v in c.items())
        assert cfg.train_config() == TrainConfig(
            stage="pretrain", steps=c["steps"], batch_size=c["batch_size"], lr=c["lr"], warmup_steps=c["warmup_steps"],
            caption_fraction=c["caption_fraction"], edit_fraction=c["edit_fraction"],
            identity_queries=c["identity_queries"], mixed_precision=c["mixed_precision"], hard_negatives=0,
            seed=c["seed"], align_size=c.get("align_size", 0),
            checkpoint_every=math.gcd(c["checkpoint_every"], c["eval_every"]), log_every=10)
    # and a stage field pretraining never set before is now the run's to set
    assert PretrainConfig(temperature=0.1).train_config().temperature == 0.1
    with pytest.raises(ValueError, match="stage is 'pretrain'"):
        PretrainConfig(stage="cot")


def test_resolution_examples_name_exactly_the_objects_their_phrase_means(tmp_path):
    """The resolve task: a description and a phrase -> the oracle's clause naming what it means."""
    import random

    from model_code.synthetic.edits import _candidate_refs
    from model_code.synthetic.oracle import scene_from_text
    from model_code.synthetic.resolution import phrase_kind, resolution_clauses

    rng, kinds = random.Random(0), set()
    for _ in range(40):
        scene = pretraining._scene_with(rng, None, iter(range(100)).__next__)
        pairs = pretraining.resolution_pairs(rng, scene, 50)
        assert len({q for q, _ in pairs}) == len(pairs) > 0          # drawn without repeats
        for prompt_text, answer in pairs:
            description, phrase = prompt_text.removeprefix("Description: ").split("\nPhrase: ")
            assert scene_from_text(description) == set(scenes_key(scene))
            assert answer.startswith("<reasoning>") and answer.endswith(".</reasoning>")
            [(stated, objects)] = resolution_clauses(answer.removeprefix("<reasoning>").removesuffix("</reasoning>"))
            named = scene_from_text(objects)
            kinds.add(phrase_kind(stated))
            words = phrase.split()
            if words[0] == "the" and "all" not in words:       # one object: the phrase picks out exactly it
                refs = [r for o in scene for r in _candidate_refs(o) if [x.oid for x in r.matches(scene)] == [o.oid]]
                assert len(named) == 1 and stated == phrase
                assert any(set(scenes_key(r.matches(scene))) == named for r in refs)
            else:                                               # a class: every member, nothing else
                assert named and named <= set(scenes_key(scene))
    assert kinds >= {"colour", "shape", "size", "position", "superlative", "negation"}
    # samples carry them (drawn from a stream of their own: the scenes and edits are as before)
    with_resolutions = pretrain.make_samples(_config("tiny", scenes=4, heldout=2, resolves_per_scene=3), tmp_path / "a")
    without = pretrain.make_samples(_config("tiny", scenes=4, heldout=2, resolves_per_scene=0), tmp_path / "b")
    assert [s.edit_text for s in with_resolutions] == [s.edit_text for s in without]
    assert all(len(s.resolutions) == 3 for s in with_resolutions) and not any(s.resolutions for s in without)


def scenes_key(objs):
    from model_code.synthetic import scenes

    return scenes.scene_key(tuple(objs))


def test_a_grown_model_computes_what_the_shallow_one_did_and_trains_resolution(tmp_path, micro_shape):
    from model_code.backbone import grow_layers, load_backbone
    from model_code.model.cir_cot import CirCoTModel

    first = pretrain.pretrain(_config(micro_shape, steps=2), tmp_path / "first")
    model, processor = load_backbone(first.path, device="cpu")
    m = CirCoTModel(model, processor)
    before = m.embed_texts(["top left: large red circle."])
    grow_layers(model, 4)
    assert len(model.model.language_model.layers) == model.config.text_config.num_hidden_layers == 4
    assert torch.allclose(m.embed_texts(["top left: large red circle."]), before, atol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        grow_layers(model, 6)
    with pytest.raises(ValueError, match="init"):
        _config(micro_shape, grow_layers=4)

    cfg = _config(micro_shape, steps=2, init=first.path, grow_layers=4, edit_answer="chain", resolve_fraction=0.5,
                  resolves_per_scene=2)
    record = pretrain.pretrain(cfg, tmp_path / "grown")
    grown = load_backbone(record.path, device="cpu")[0]
    assert grown.config.text_config.num_hidden_layers == 4
    history = json.loads((tmp_path / "grown" / "train" / "checkpoint" / "history.json").read_text())
    assert all(h["resolve"] > 0 for h in history)     # the resolution task was trained at every step
    # and the held-out scores hold resolution by kind of phrase and the first error of wrong edits
    p = record.perception
    assert 0 <= p["resolution_acc"] <= 1 and p["n_resolved"] > 0
    assert any(k.startswith("resolution_acc[kind=") for k in p)
    assert p["n_wrong"] == 0 or any(k.startswith("first_error[part=") for k in p)
