"""The CIR-CoT model and its training on a very small random Qwen2-VL (CPU)."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from model_code.annotation.store import annotation_requests
from model_code.backbone import load_backbone
from model_code.data import read_dataset
from model_code.model.cir_cot import CIR_TOKENS, CirCoTModel, apply_lora, parameter_counts
from model_code.model.loss import info_nce
from model_code.model.recipes import pair_examples
from model_code.model.train import TrainConfig, TrainStep, sample_batch, train
from model_code.synthetic.oracle import OracleAnnotator
from tests._png import drawn, pixels


@pytest.fixture
def bench(tiny_synthetic):
    return read_dataset("synthetic", tiny_synthetic)


@pytest.fixture
def pairs(bench, tiny_synthetic):
    import dataclasses

    import pandas as pd

    rows = OracleAnnotator(tiny_synthetic).annotate(annotation_requests(bench.triplets, bench.images, tiny_synthetic))
    ann = pd.DataFrame([dataclasses.asdict(r) for r in rows])
    return pair_examples(bench.triplets, bench.images, tiny_synthetic, "train", ann)


def _model(path, lora=True) -> CirCoTModel:
    torch.manual_seed(0)
    model, processor = load_backbone(path, device="cpu")
    model.train()
    if lora:
        model = apply_lora(model, processor, r=4, alpha=8)
    return CirCoTModel(model, processor, base_path=str(path))


def _cfg(**kw) -> TrainConfig:
    base = dict(stage="cot", steps=6, batch_size=6, lr=3e-3, warmup_steps=2, checkpoint_every=3, log_every=100,
                temperature=0.1)
    return TrainConfig(**{**base, **kw})


def test_special_tokens_are_added_and_the_prompts_end_in_emb(micro_base):
    m = _model(micro_base, lora=False)
    vocab = m.tokenizer.get_vocab()
    assert all(t in vocab for t in CIR_TOKENS)
    assert m.model.get_input_embeddings().weight.shape[0] >= len(m.tokenizer)
    assert m.prompt("gallery").endswith("assistant\n") and "Modification: make it red" in m.prompt(
        "no_cot", "make it red "
    )


def test_only_the_chain_of_thought_and_emb_are_supervised(micro_base, pairs):
    m = _model(micro_base, lora=False)
    ex = pairs[0]
    inputs = m.query_inputs([ex.reference], [ex.text], [ex.cot], train_answer=True)
    ids, labels = inputs["input_ids"][0], inputs["labels"][0]
    supervised = m.tokenizer.decode(ids[labels != -100])
    assert supervised == ex.cot + "<emb>" and ids[-1] == m.emb_id
    assert "mm_token_type_ids" in inputs and "pixel_values" in inputs


def test_forward_backward_reaches_only_trainable_parameters(micro_base, pairs):
    m = _model(micro_base)
    cfg = _cfg()
    batch, negatives = sample_batch(pairs, cfg, 0, 0, 0, 1)
    assert all(ex.cot for ex in batch) and negatives
    out = TrainStep(m, cfg)(batch, negatives)
    assert set(out) == {"info", "acc", "txt", "loss"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for n, g in grads.items() if "lora" in n or "token_adapter" in n)
    assert any(float(g.abs().sum()) > 0 for g in grads.values() if g is not None)
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)
    counts = parameter_counts(m.model)
    assert 0 < counts["trainable"] < counts["total"] / 3


def test_rehearsal_trains_the_chains_halves_in_the_pretraining_prompts(micro_base, pairs, monkeypatch):
    from model_code.chain import parse
    from model_code.model.cir_cot import edit_answer, edit_request, unwrap
    from model_code.model.loss import rehearsal_ce

    m = _model(micro_base)
    cfg = _cfg(rehearse_fraction=0.5)
    batch, negatives = sample_batch(pairs, cfg, 0, 0, 0, 1)
    out = TrainStep(m, cfg)(batch, negatives)
    assert set(out) == {"info", "acc", "txt", "rehearse", "loss"} and torch.isfinite(out["rehearse"])
    seen = []
    encode = m.encode
    monkeypatch.setattr(m, "encode", lambda p, a, i, train_answer=False: (seen.append((p, a, i)),
                                                                          encode(p, a, i, train_answer))[1])
    rehearsal_ce(m, batch[:3], unwrap(m.model).lm_head)
    (cap_prompts, cap_answers, cap_images), (edit_prompts, edit_answers, edit_images) = seen
    first = parse(batch[0].cot)
    assert len(cap_prompts) == 3 and cap_prompts[0] == m.prompt("describe") and cap_images[0] == batch[0].reference
    assert cap_answers[0] == f"<caption>{first.caption}</caption>"
    assert edit_images is None and edit_prompts[0] == m.prompt("edit", edit_request(first.caption, batch[0].text),
                                                                 image=False)
    assert edit_answers[0] == edit_answer(first.reasoning, first.conclusion)
    out["loss"].backward()      # the rehearsal reaches the adapters
    assert any(float(p.grad.abs().sum()) > 0 for n, p in m.named_parameters() if "lora" in n and p.grad is not None)


def test_each_stage_computes_its_own_objective(micro_base, pairs):
    """TrainStep runs the objective of its config's stage (model_code.model.loss.OBJECTIVES), and a
    stage without one is refused."""
    from model_code.model import loss

    assert set(loss.OBJECTIVES) == {"pretrain", "align", "cot"}
    m = _model(micro_base)
    for stage, objective in loss.OBJECTIVES.items():
        assert TrainStep(m, _cfg(stage=stage)).objective is objective
    batch, negatives = sample_batch(pairs, _cfg(stage="align"), 0, 0, 0, 1)
    align = TrainStep(m, _cfg(stage="align"))(batch, negatives)
    assert set(align) == {"info", "acc", "loss"}
    torch.testing.assert_close(align["loss"], align["info"])     # InfoNCE alone, weight 1
    cot = TrainStep(m, _cfg(stage="cot", lambda_info=0.1))(batch, negatives)
    torch.testing.assert_close(cot["loss"], 0.1 * cot["info"] + cot["txt"])
    with pytest.raises(ValueError, match="stage must be one of"):
        TrainConfig(stage="bootstrap", steps=1)


def test_padding_does_not_change_an_embedding(micro_base, pairs):
    m = _model(micro_base)
    refs, texts, cots = [p.reference for p in pairs[:5]], [p.text for p in pairs[:5]], [p.cot for p in pairs[:5]]
    cots[1] = None
    together = m.embed_queries(refs, texts, cots, batch_size=5)
    alone = torch.cat([m.embed_queries([r], [t], [c]) for r, t, c in zip(refs, texts, cots)])
    assert together.dtype == torch.float32 and together.shape == (5, 64)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(together.norm(dim=1), torch.ones(5))
    imgs = m.embed_images([p.target for p in pairs[:4]], batch_size=3)
    torch.testing.assert_close(imgs, torch.cat([m.embed_images([p.target]) for p in pairs[:4]]), atol=1e-5, rtol=0)


def test_loss_decreases_and_only_adapters_and_new_token_rows_change(micro_base, pairs, tmp_path):
    m = _model(micro_base)
    base_before = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    emb_layer = m.model.get_input_embeddings()
    all_ids = torch.arange(len(m.tokenizer))
    rows_before = emb_layer(all_ids).detach().clone()
    # a few dozen steps on a small fixed set: the loss must fall well below where it started
    cfg = _cfg(steps=30, stage="align", batch_size=8, lr=3e-3, checkpoint_every=100, hard_negatives=0,
               reference_negatives=False)
    result = train(m, pairs[:8], cfg, tmp_path / "run")
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    assert sum(h["acc"] for h in result.history[-5:]) / 5 > 0.4
    plot = pixels(result.plot)
    assert plot.shape == (324, 900, 3)  # 10 x 3.6 in at 90 dpi
    assert drawn(plot[:, :450], "C0", 20) > 20  # the loss curve (its legend entry at least: InfoNCE lies on it here)
    assert drawn(plot[:, 450:], "tab:green", 20) > 100  # the accuracy curve
    for n, p in m.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p.detach(), base_before[n]), f"frozen parameter {n} changed"
    rows_after = emb_layer(all_ids).detach()
    changed = (rows_after != rows_before).any(dim=1).nonzero().flatten().tolist()
    new_ids = set(m.tokenizer.convert_tokens_to_ids(list(CIR_TOKENS)))
    assert changed and set(changed) <= new_ids  # only the added tokens' rows moved


def test_save_then_load_gives_identical_embeddings(micro_base, pairs, tmp_path):
    m = _model(micro_base)
    train(m, pairs, _cfg(steps=3), tmp_path / "run")
    version = m.save(tmp_path / "model")
    assert (tmp_path / "model" / "adapter").is_dir() and (tmp_path / "model" / "processor").is_dir()
    loaded = CirCoTModel.load(tmp_path / "model", device="cpu")
    assert loaded.version == version
    refs, texts, cots = [p.reference for p in pairs[:4]], [p.text for p in pairs[:4]], [p.cot for p in pairs[:4]]
    torch.testing.assert_close(
        loaded.embed_queries(refs, texts, cots), m.embed_queries(refs, texts, cots), atol=0, rtol=0
    )
    torch.testing.assert_close(loaded.embed_images(refs), m.embed_images(refs), atol=0, rtol=0)


def test_resume_gives_the_same_next_step_loss_as_an_uninterrupted_run(micro_base, pairs, tmp_path):
    full = train(_model(micro_base), pairs, _cfg(steps=5), tmp_path / "full")
    first = train(_model(micro_base), pairs, _cfg(steps=5), tmp_path / "resumed", stop_after=3)
    assert first.steps == 3
    second = train(_model(micro_base), pairs, _cfg(steps=5), tmp_path / "resumed")
    assert second.resumed_from == 3
    assert [h["loss"] for h in second.history] == [h["loss"] for h in full.history]


def test_batches_are_a_pure_function_of_seed_and_step(pairs):
    cfg = _cfg()
    a, b = sample_batch(pairs, cfg, 7, 0, 0, 1), sample_batch(pairs, cfg, 7, 0, 0, 1)
    assert a == b and sample_batch(pairs, cfg, 8, 0, 0, 1) != a
    r0, _ = sample_batch(pairs, cfg, 7, 0, 0, 2)
    r1, _ = sample_batch(pairs, cfg, 7, 0, 1, 2)
    assert not {e.query_id for e in r0} & {e.query_id for e in r1}  # processes draw disjoint queries


def test_two_queries_with_the_same_target_are_not_each_others_negatives(micro_base, pairs, monkeypatch):
    """Regression test: a batch holding two queries with one target image counted that image, under
    the other row, as a negative of each."""
    import torch.nn.functional as F

    from model_code.model import loss as loss_module
    from model_code.model.loss import image_keys, info_nce

    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(2, 8, generator=g), dim=-1)
    x, n = F.normalize(torch.randn(2, 8, generator=g), dim=-1)
    cands = torch.stack([x, x, n])                          # queries 0 and 1 both target image X; N is a negative
    keys = image_keys(["X.png", "X.png", "N.png"])
    loss, acc = info_nce(q, cands, 2, 0.1, candidate_keys=keys)
    # by hand: each query against its own X and N only; each X against its own query only (t2q has no negative)
    q2t = [F.cross_entropy((q[i] @ torch.stack([x, n]).T / 0.1)[None], torch.tensor([0])) for i in range(2)]
    torch.testing.assert_close(loss, (sum(q2t) / 2 + 0.0) / 2)
    unmasked, _ = info_nce(q, cands, 2, 0.1)
    assert unmasked > loss
    # the training step hands the keys of its candidates (targets, then negatives) to the loss
    seen = {}

    def spy(queries, candidates, n_pairs, temperature, *, candidate_keys=None):
        seen["keys"] = candidate_keys
        return info_nce(queries, candidates, n_pairs, temperature, candidate_keys=candidate_keys)

    monkeypatch.setattr(loss_module, "info_nce", spy)
    m = _model(micro_base)
    cfg = TrainConfig(stage="align", steps=1, batch_size=2)
    twin = dataclasses.replace(pairs[1], target=pairs[0].target)
    TrainStep(m, cfg)([pairs[0], twin], [pairs[2].target])
    assert seen["keys"].tolist() == image_keys([pairs[0].target, pairs[0].target, pairs[2].target]).tolist()


def test_in_batch_negatives_are_gathered_across_two_processes(tmp_path):
    import torch.multiprocessing as mp

    from tests import _gather_worker

    mp.spawn(_gather_worker.run, args=(2, str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    g = torch.Generator().manual_seed(0)
    q_all = torch.nn.functional.normalize(torch.randn(8, 8, generator=g), dim=-1).requires_grad_(True)
    c_all = torch.nn.functional.normalize(torch.randn(8, 8, generator=g), dim=-1).requires_grad_(True)
    torch.testing.assert_close(r[0]["gathered"], q_all.detach())
    single, _ = info_nce(q_all, c_all, 8, 0.1)  # one process holding the whole global batch
    single.backward()
    torch.testing.assert_close((r[0]["loss"] + r[1]["loss"]) / 2, single.detach())
    # each process's gradient includes what the other's loss sends back through the gather
    torch.testing.assert_close(torch.cat([r[0]["q_grad"], r[1]["q_grad"]]), 2 * q_all.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r[0]["c_grad"], r[1]["c_grad"]]), 2 * c_all.grad, atol=1e-6, rtol=1e-5)


def test_inference_in_both_modes_on_the_tiny_model(micro_base, pairs):
    m = _model(micro_base)
    refs, texts = [p.reference for p in pairs[:3]], [p.text for p in pairs[:3]]
    emb, reasoning = m.infer_queries(refs, texts, "no_cot")
    torch.testing.assert_close(emb, m.embed_queries(refs, texts, None))
    assert reasoning == [{}, {}, {}]
    emb, reasoning = m.infer_queries(refs, texts, "cot", max_new_tokens=8, batch_size=2)
    assert emb.shape == (3, 64) and torch.isfinite(emb).all()
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    # 8 tokens cannot hold the three sections: the chain is kept as raw text with the reason it does not
    # parse, and still ends in <emb> (the 8th token at most)
    assert all(r["cot"] is None and r["error"] for r in reasoning)
    assert all(len(r["ids"]) <= 7 and m.emb_id not in r["ids"] for r in reasoning)


def test_decoding_keeps_the_format_so_every_chain_parses(micro_base, pairs):
    """Even a random model's chains parse: decoding is constrained to the three sections in order,
    ending in <emb>, within the budget."""
    m = _model(micro_base)
    refs, texts = [p.reference for p in pairs[:4]], [p.text for p in pairs[:4]]
    for budget in (10, 24, 60):
        _, reasoning = m.infer_queries(refs, texts, "cot", max_new_tokens=budget, batch_size=4)
        assert all(r["cot"] is not None for r in reasoning), [r["error"] for r in reasoning]
        assert all(len(r["ids"]) <= budget - 1 for r in reasoning)


def test_cot_embedding_is_the_hidden_state_at_the_generated_emb(micro_base, pairs, monkeypatch):
    """<emb>'s hidden state comes from the generated ids on the KV cache (regression test: the
    reasoning was decoded to text, tokenised again and run through a second forward pass)."""
    m = _model(micro_base)
    refs, texts = [p.reference for p in pairs[:3]], [p.text for p in pairs[:3]]
    expected_chains = None

    def no_second_pass(*args, **kwargs):
        raise AssertionError("CoT inference ran a second forward pass over the sequence")

    with monkeypatch.context() as mp:
        mp.setattr(m, "embed_queries", no_second_pass)
        mp.setattr(m, "hidden_states", no_second_pass)
        emb, reasoning = m.infer_queries(refs, texts, "cot", max_new_tokens=12, batch_size=3)
        expected_chains = [r["ids"] for r in reasoning]
    # teacher-forcing exactly the generated ids (prompt + chain + <emb>) gives the same embedding, row by row
    for i in range(3):
        inputs = m.encode([m.prompt("query", texts[i])], [""], [refs[i]])
        ids = torch.tensor([expected_chains[i] + [m.emb_id]])
        inputs["input_ids"] = torch.cat([inputs["input_ids"], ids], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids)], dim=1)
        with torch.no_grad():
            forced = m.emb(inputs, m.hidden_states(inputs))
        torch.testing.assert_close(emb[i:i + 1], forced, atol=1e-4, rtol=1e-4)
    # a chain that runs out of budget still ends in <emb> (the 4th token here), and batching changes nothing
    short, chains = m.reason_and_embed(refs, texts, max_new_tokens=4, batch_size=1)
    assert all(len(c) <= 3 for c in chains)
    alone, _ = m.reason_and_embed(refs[:1], texts[:1], max_new_tokens=4, batch_size=1)
    batched, _ = m.reason_and_embed(refs, texts, max_new_tokens=4, batch_size=3)
    torch.testing.assert_close(alone[0], batched[0], atol=1e-4, rtol=1e-4)
    # a chain written in the right form parses
    from model_code.chain import CoT

    good = CoT("a red circle", "make it blue", "a blue circle").render()
    assert m.embed_queries(refs[:1], texts[:1], [good]).shape == (1, 64)
    with pytest.raises(ValueError):
        m.infer_queries(refs, texts, "both")


def test_two_processes_train_together_and_one_writes_the_model(micro_base, bench, tiny_synthetic, tmp_path):
    """The `accelerate launch` / torchrun entry point, with two CPU processes (gloo)."""
    import dataclasses
    import json
    import subprocess
    import sys

    import pandas as pd

    from model_code.annotation.store import write_annotations
    from model_code.data import write_tables
    from model_code.data.tables import TablesRecord

    write_tables(bench, tmp_path / "tables")
    TablesRecord(dataset="synthetic", folder=str(tmp_path / "tables"), root=str(tiny_synthetic),
                 raw_version="test").write(tmp_path / "tables" / TablesRecord.META)
    rows = OracleAnnotator(tiny_synthetic).annotate(annotation_requests(bench.triplets, bench.images, tiny_synthetic))
    write_annotations(pd.DataFrame([dataclasses.asdict(r) for r in rows]), tmp_path / "annotations.parquet")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "model_code.model.recipes",
        "--tables",
        str(tmp_path / "tables"),
        "--annotations",
        str(tmp_path / "annotations.parquet"),
        "--base",
        str(micro_base),
        "--profile",
        "smoke",
        "--set",
        "cot.steps=2",
        "--out",
        str(tmp_path / "run"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stages"]["align"]["steps"] == 3 and summary["stages"]["cot"]["steps"] == 2   # --set
    loaded = CirCoTModel.load(tmp_path / "run" / "model", device="cpu")
    assert loaded.version == summary["version"]
    assert proc.stdout.count('"version"') == 1  # one process reported and wrote


def test_a_fully_fine_tuned_model_saves_and_loads_with_its_processor(micro_base, tmp_path):
    """Full-parameter fine-tuning (the profile's ``lora=False``) writes the whole model: it loads back
    with the tokenizer that holds the CoT tokens and gives the same embeddings."""
    m = _model(micro_base, lora=False)
    version = m.save(tmp_path / "full")
    loaded = CirCoTModel.load(tmp_path / "full", device="cpu")
    assert loaded.version == version and loaded.emb_id == m.emb_id
    texts = ["a small red star in the centre"]
    assert torch.allclose(loaded.embed_texts(texts), m.embed_texts(texts), atol=1e-5)


# ---- profiles: overrides, their JSON, the launched process's reading of it ------------------------


def test_a_profile_is_changed_only_through_overrides_that_make_a_new_one():
    from model_code.model.recipes import PROFILES

    embedded = PROFILES["embedded"]
    short = embedded.with_overrides(align={"steps": 3}, cot={"steps": 4, "lr": 1e-4}, lora=True)
    assert (short.align.steps, short.cot.steps, short.cot.lr, short.lora) == (3, 4, 1e-4, True)
    assert short.cot.lambda_info == embedded.cot.lambda_info == 0.1          # the rest is the profile's
    assert (embedded.align.steps, embedded.cot.steps, embedded.lora) == (40, 140, False)   # left as it was
    with pytest.raises(dataclasses.FrozenInstanceError):
        embedded.align.steps = 3
    with pytest.raises(ValueError, match="no field stepz"):
        embedded.with_overrides(align={"stepz": 3})
    with pytest.raises(ValueError, match="steps, batch_size and grad_accum must be at least 1"):
        embedded.with_overrides(cot={"steps": 0})
    with pytest.raises(ValueError, match="stages are align then cot"):
        embedded.with_overrides(align={"stage": "cot"})
    # the settings of a command line, each read as the type of the value it replaces
    set_ = embedded.with_settings(["cot.lr=5e-4", "align.steps=7", "lora=true", "base.device=cpu",
                                   "cot.reference_negatives=no"])
    assert (set_.cot.lr, set_.align.steps, set_.lora, set_.base.device, set_.cot.reference_negatives) == (
        5e-4, 7, True, "cpu", False)
    for bad, message in (("align.steps=three", "not a int"), ("lora=maybe", "not true or false"),
                         ("stage2.lr=1", "FIELD=VALUE"), ("cot.lr", "FIELD=VALUE"), ("cot.nope=1", "no field 'nope'")):
        with pytest.raises(ValueError, match=message):
            embedded.with_settings([bad])


def test_the_smoke_profile_is_the_default_recipe_smaller_on_a_given_checkpoint():
    from model_code.model.recipes import PROFILES

    smoke, embedded = PROFILES["smoke"], PROFILES["embedded"]
    assert smoke.base.kind == "checkpoint" and smoke.base.checkpoint_path is None   # the resource's base_model_path
    assert smoke.lora == embedded.lora is False
    small = {"steps", "batch_size", "warmup_steps", "checkpoint_every"}
    for stage in ("align", "cot"):
        a, b = dataclasses.asdict(getattr(smoke, stage)), dataclasses.asdict(getattr(embedded, stage))
        assert {k for k in a if a[k] != b[k]} == small and a["steps"] == 3


def test_the_launched_process_trains_the_profile_it_is_handed(bench, tiny_synthetic, tmp_path, monkeypatch):
    """cir_cot_model hands its launch one file: the whole profile, overrides applied; the process's
    main reads it (and a hand's --set on top) instead of flags for single fields."""
    import dataclasses as dc

    import pandas as pd

    from model_code.annotation.store import write_annotations
    from model_code.data import write_tables
    from model_code.data.tables import TablesRecord
    from model_code.model import recipes

    write_tables(bench, tmp_path / "tables")
    TablesRecord(dataset="synthetic", folder=str(tmp_path / "tables"), root=str(tiny_synthetic),
                 raw_version="test").write(tmp_path / "tables" / TablesRecord.META)
    rows = OracleAnnotator(tiny_synthetic).annotate(annotation_requests(bench.triplets, bench.images, tiny_synthetic))
    write_annotations(pd.DataFrame([dc.asdict(r) for r in rows]), tmp_path / "annotations.parquet")
    profile = recipes.PROFILES["gpu"].with_overrides(align={"steps": 5}, cot={"lambda_info": 0.3}, eval_batches=2)
    profile_file = profile.save(tmp_path / "run" / "profile.json")
    command = recipes.launch_command([str(tmp_path / "tables")], [str(tmp_path / "annotations.parquet")], "/base",
                                     str(profile_file), str(tmp_path / "run"), processes=2)
    assert command[command.index("--profile-json") + 1] == str(profile_file)
    assert not {"--align-steps", "--cot-steps", "--profile"} & set(command)
    handed = []
    monkeypatch.setattr(recipes, "register_checkpoint", lambda path: path)
    monkeypatch.setattr(recipes, "train_cir_cot", lambda base, train, val, profile, out, progress=None:
                        handed.append((base, len(train), len(val), profile)) or SimpleNamespace(path=out, version="v"))
    args = command[command.index("--base"):command.index("--pipes")]
    assert recipes.main(args) == 0
    n = {split: int((bench.triplets.split == split).sum()) for split in ("train", "val")}
    assert handed == [("/base", n["train"], n["val"], profile)]
    assert recipes.main([*args, "--set", "cot.steps=9"]) == 0
    assert handed[1][3] == profile.with_overrides(cot={"steps": 9})
    with pytest.raises(SystemExit):        # one profile: a named one or a file, not both
        recipes.main([*args, "--profile", "smoke"])


def test_the_default_recipe_trains_the_shipped_base_end_to_end(bench, tiny_synthetic, tmp_path):
    """The embedded profile itself (the shipped base, every parameter, stage 1 then stage 2), its steps
    cut to one and two through the profile's overrides: the path ``make run`` trains, in under a minute."""
    import pandas as pd

    from model_code.model.recipes import PROFILES, register_embedded, train_cir_cot

    rows = OracleAnnotator(tiny_synthetic).annotate(annotation_requests(bench.triplets, bench.images, tiny_synthetic))
    ann = pd.DataFrame([dataclasses.asdict(r) for r in rows])
    train_pairs = pair_examples(bench.triplets, bench.images, tiny_synthetic, "train", ann)
    val_pairs = pair_examples(bench.triplets, bench.images, tiny_synthetic, "val", ann)
    profile = PROFILES["embedded"].with_overrides(align={"steps": 1}, cot={"steps": 2})
    base = register_embedded()
    trained = train_cir_cot(base, train_pairs, val_pairs, profile, tmp_path / "run")
    align, cot = trained.stage("align"), trained.stage("cot")
    assert (align.steps, cot.steps, align.examples) == (1, 2, len(train_pairs))
    assert trained.parameters["trainable"] == trained.parameters["total"] > 4_000_000   # every parameter
    assert trained.base_version == base.version and align.val and cot.val
    # the profile's own hyperparameters ran: lr 3e-4 warmed up over 5 steps; stage 2's InfoNCE weighted 0.1
    assert align.first["lr"] == cot.first["lr"] == pytest.approx(3e-4 / 5) and cot.last["lr"] == pytest.approx(
        2 * 3e-4 / 5)
    assert cot.last["loss"] == pytest.approx(0.1 * cot.last["info"] + cot.last["txt"], abs=1e-5)
    loaded = CirCoTModel.load(trained.path, device="cpu")
    assert loaded.version == trained.version
    emb = loaded.embed_queries([val_pairs[0].reference], [val_pairs[0].text])
    assert emb.shape == (1, 256) and torch.isfinite(emb).all()


def test_the_gpu_profile_starts_from_recall_and_each_value_is_a_setting(monkeypatch):
    """LoRA rank 64 and lr 2e-5 (ReCALL's recipe), 448 px images, 256-token chains, checkpointing where the
    batch is large; each changed through the environment (docs/configuration.md), the rest kept."""
    import dagster as dg

    from assets.resources import TrainingResource, resources_from_environment
    from model_code.model.recipes import PROFILES

    gpu = PROFILES["gpu"]
    assert (gpu.lora, gpu.lora_r, gpu.lora_alpha, gpu.align.lr, gpu.cot.lr) == (True, 64, 128, 2e-5, 2e-5)
    assert (gpu.max_pixels, gpu.max_chain_tokens) == (448 * 448, 256)
    assert gpu.align.gradient_checkpointing and not gpu.cot.gradient_checkpointing
    assert (gpu.align.batch_size, gpu.cot.batch_size * gpu.cot.grad_accum) == (64, 32)
    for name, value in (("PROFILE", "gpu"), ("BASE_MODEL_PATH", "/models/qwen"), ("LORA_RANK", "32"),
                        ("LEARNING_RATE", "1e-4"), ("BATCH_SIZE", "8"), ("MAX_PIXELS", "50176"),
                        ("MAX_CHAIN_TOKENS", "300"), ("GRADIENT_CHECKPOINTING", "on"),
                        ("TRAINING_OVERRIDES", "cot.steps=500, align.warmup_steps=10")):
        monkeypatch.setenv(f"CIRCOT_{name}", value)
    profile = resources_from_environment()["training"].spec()
    assert (profile.lora_r, profile.lora_alpha, profile.max_pixels, profile.max_chain_tokens) == (32, 64, 50176, 300)
    for stage in (profile.align, profile.cot):
        assert (stage.lr, stage.batch_size, stage.gradient_checkpointing) == (1e-4, 8, True)
    assert (profile.cot.steps, profile.align.warmup_steps, profile.align.steps) == (500, 10, gpu.align.steps)
    assert profile.base.checkpoint_path == "/models/qwen" and profile.cot.grad_accum == gpu.cot.grad_accum
    # a value whose default is unset is read as its declared type, not kept as text
    overridden = PROFILES["micro"].with_settings(["max_pixels=50176", "max_chain_tokens=none", "base.device=cpu"])
    assert (overridden.max_pixels, overridden.max_chain_tokens, overridden.base.device) == (50176, None, "cpu")
    with pytest.raises(ValueError, match="not a int"):
        PROFILES["micro"].with_settings(["max_pixels=lots"])
    with pytest.raises(dg.Failure, match="no field 'stepz'.*CIRCOT_TRAINING_OVERRIDES"):
        TrainingResource(profile="gpu", base_model_path="/m", overrides=["cot.stepz=3"]).spec()


def test_only_the_embedded_profile_is_refused_on_a_benchmark_its_base_cannot_read():
    from assets.resources import TrainingResource

    embedded = TrainingResource(profile="embedded")
    assert embedded.refusal("synthetic") is None
    refusal = embedded.refusal("fashioniq")
    assert "pretrained on the synthetic benchmark alone" in refusal and "823-piece vocabulary" in refusal
    assert "CIRCOT_PROFILE=gpu CIRCOT_BASE_MODEL_PATH=" in refusal and "circot micro-model" in refusal
    for profile in ("micro", "gpu", "smoke"):
        assert TrainingResource(profile=profile, base_model_path="/m").refusal("cirr") is None
    # a checkpoint given to the embedded recipe is a checkpoint base: its own tokenizer decides...
    assert TrainingResource(profile="embedded", base_model_path="/m").refusal("cirr") is None
    # ...unless it is the embedded base itself (its PRETRAINING.json says which words it reads)
    from model_code.model.recipes import EMBEDDED_BASE

    given = TrainingResource(profile="smoke", base_model_path=str(EMBEDDED_BASE)).refusal("cirr")
    assert given and "pretrained on the synthetic benchmark alone" in given
    assert TrainingResource(profile="smoke", base_model_path=str(EMBEDDED_BASE)).refusal("synthetic") is None


def test_images_are_capped_at_the_profiles_pixels_and_long_chains_are_left_out(micro_base, pairs, tmp_path):
    """max_pixels reaches the processor the model is saved with (what evaluation and serving use);
    chains over max_chain_tokens are counted and not trained on."""
    import json

    from model_code.backbone import limit_pixels
    from model_code.model.recipes import PROFILES, register_checkpoint, train_cir_cot

    model, processor = load_backbone(micro_base, device="cpu")
    before = processor(text=["<|image_pad|>"], images=[pixels(pairs[0].reference)], return_tensors="pt")
    limit_pixels(processor, 28 * 28)                       # one merged image token instead of 56 px's four
    after = processor(text=["<|image_pad|>"], images=[pixels(pairs[0].reference)], return_tensors="pt")
    assert before["image_grid_thw"].prod() == 16 and after["image_grid_thw"].prod() == 4

    tokenizer = processor.tokenizer
    lengths = sorted(len(tokenizer(p.cot, add_special_tokens=False)["input_ids"]) for p in pairs)
    cap = lengths[len(lengths) // 2]
    longer = sum(n > cap for n in lengths)
    profile = PROFILES["smoke"].with_overrides(align={"steps": 1}, cot={"steps": 1}, max_pixels=28 * 28,
                                               max_chain_tokens=cap)
    trained = train_cir_cot(register_checkpoint(micro_base), pairs, pairs[:4], profile, tmp_path / "run")
    cot = trained.stage("cot")
    assert cot.chains_too_long == longer > 0 and cot.examples == len(pairs) - longer
    saved = json.loads((tmp_path / "run" / "model" / "processor" / "processor_config.json").read_text())
    assert saved["image_processor"]["size"]["longest_edge"] == 28 * 28
    loaded = CirCoTModel.load(trained.path, device="cpu")
    assert loaded.gallery_inputs([pairs[0].target])["image_grid_thw"].prod() == 4


def test_bf16_autocast_is_used_only_where_the_hardware_computes_it(monkeypatch, tmp_path):
    """bf16 autocast is emulated on a CPU without AVX-512 BF16 or AMX (100 times slower than float32,
    measured): ``auto`` picks it only where it is native, read from /proc/cpuinfo."""
    from pathlib import Path as P

    from model_code.model import train as train_mod

    monkeypatch.setattr(train_mod.torch.cuda, "is_available", lambda: False)
    read = P.read_text
    for flags, native in (("fpu avx2 fma", False), ("fpu avx2 avx512f avx512_bf16", True), ("amx_bf16 avx2", True)):
        monkeypatch.setattr(P, "read_text", lambda self, *a, _f=flags, **k: f"flags\t\t: {_f}\n"
                            if str(self) == "/proc/cpuinfo" else read(self, *a, **k))
        assert train_mod.native_bf16() is native
        assert train_mod.precision("auto") == ("bf16" if native else "no")
        assert train_mod.precision("no") == "no"
    with pytest.raises(ValueError, match="mixed_precision"):
        train_mod.TrainConfig(stage="align", steps=1, mixed_precision="fp8")
