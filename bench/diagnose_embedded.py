"""Diagnostics of the embedded (tiny, CPU) CIR-CoT model: where its retrieval quality is lost.
The figures of docs/experiments/ (earlier-default-runs.md, 2026-11-27-embedded-recipe.md,
2026-11-29-canonical-wording.md) and of docs/model-card-embedded-base.md come from these commands.

    .venv/bin/python bench/diagnose_embedded.py upper-bounds [--artifacts artifacts] [--queries 128]
    .venv/bin/python bench/diagnose_embedded.py corrections  [--queries 500]
    .venv/bin/python bench/diagnose_embedded.py decoding     [--artifacts artifacts] [--queries 128]
    .venv/bin/python bench/diagnose_embedded.py stage1 --full --steps 100 --lr 5e-4 [--queries 256]
    .venv/bin/python bench/diagnose_embedded.py cot-more --steps 150 [--queries 128]

- ``upper-bounds``: the newest model's methods on the first test queries, and what it would reach
  with perfect reasoning (the oracle's chain teacher-forced before ``<emb>``) and with the oracle's
  conclusion alone as a text query.
- ``corrections``: simulated correction (docs/feedback.md): the model's own chains, then each with its
  conclusion, its caption, its reasoning, or all three replaced by the oracle's, teacher-forced as a
  corrected ``/search`` ranks them.
- ``decoding``: the ``cot`` method under greedy decoding and two anti-repetition settings.
- ``stage1``: stage 1 again from the base, with LoRA or (``--full``) all parameters trainable.
- ``cot-more``: more stage-2 steps on the newest model, then its evaluation.
- ``skills [--model FOLDER] [--data data/raw/synthetic]``: the chain's two halves asked apart, in
  the prompts the base was pretrained on (the reference's caption; the text edit of the oracle's
  caption by the modification), exact per edit count, and, for a fine-tuned model, the same two
  inside its own chains: whether fine-tuning joined the base's skills or unlearned them; also by the
  reference's number of objects and, for single edits, by the edit's op.
  ``--model`` is a saved model (``circot.json``) or a base checkpoint (``model_code/model/embedded_base``).
  Then reference resolution, the text compared with the oracle's: the share of phrases ("the yellow
  shape", "the lowest object") resolved to the oracle's objects by kind of phrase, and the part in
  which each wrong text first differs (resolution, result, restated scene, conclusion; the caption too
  in a chain), for the base's edit and inside the fine-tuned model's own chains.

Reads what a finished ``make run`` made, as the Dagster instance of ``$DAGSTER_HOME`` records it
(``.dagster`` under ``make``; run with ``DAGSTER_HOME=$PWD/.dagster``); writes only under ``--out``
(default a temporary folder). ``--artifacts`` is unused (kept for old command lines).
"""

import argparse
import dataclasses
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _record(asset: str, partition: str | None = None) -> dict:
    """The record of the newest materialisation of ``asset`` in the Dagster instance (its lineage)."""
    import dagster as dg

    instance = dg.DagsterInstance.get()
    found = instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None), limit=1).records
    if not found:
        raise SystemExit(f"{asset} has not been materialised in $DAGSTER_HOME's instance: run `make run` first")
    return found[0].asset_materialization.metadata["record"].value


def _load(artifacts: Path):
    from model_code.annotation.store import read_annotations
    from model_code.data import read_tables

    tables = _record("triplets", "synthetic")
    return (tables["root"], read_tables(tables["folder"]),
            read_annotations(_record("cot_annotations", "synthetic")["path"]))


def _latest(artifacts: Path) -> dict:
    return _record("cir_cot_model", "synthetic")


def _evaluate(model, bench, root, n: int) -> None:
    from model_code.evaluation.evaluate import evaluate
    from model_code.evaluation.report import markdown_table

    print(markdown_table(evaluate(model, bench, root, "synthetic", "test", limit=n, batch_size=64, say=lambda s: None)))


def _scorer(model, bench, root, n: int):
    from model_code.evaluation.metrics import rank_gallery, recall_at_k, reference_exclusions

    t = bench.triplets[bench.triplets.split == "test"].iloc[:n]
    im = bench.images[bench.images.split == "test"]
    gallery = model.embed_images([Path(root) / p for p in im.path], batch_size=64)
    ids = list(im.image_id)
    exclude = reference_exclusions("synthetic", list(t.reference_id))

    def score(name: str, queries) -> None:
        r = rank_gallery(queries, gallery, ids, exclude=exclude, top=50)
        print(name, {f"R@{k}": round(v, 3) for k, v in recall_at_k(r, list(t.target_ids), [1, 10, 50]).items()},
              flush=True)

    paths = dict(zip(im.image_id, (Path(root) / p for p in im.path)))
    return t, [paths[r] for r in t.reference_id], score


def _oracle(bench, root, t) -> tuple[dict, list[str]]:
    """The oracle's annotation of each query of ``t`` (what the pipeline accepts for cir-shapes), by
    query id, and their rendered chains in ``t``'s order."""
    from model_code.annotation.store import annotation_requests
    from model_code.chain import CoT
    from model_code.synthetic.oracle import OracleAnnotator

    test = bench.triplets[bench.triplets.query_id.isin(set(t.query_id))]
    oracle = {
        a.query_id: a for a in OracleAnnotator(root).annotate(annotation_requests(test, bench.images, root, ["test"]))
    }
    return oracle, [CoT(oracle[q].caption, oracle[q].reasoning, oracle[q].conclusion).render() for q in t.query_id]


def upper_bounds(args, artifacts):
    from model_code.model.cir_cot import CirCoTModel
    from model_code.retrieval import embed_with_chains

    root, bench, _ = _load(artifacts)
    model = CirCoTModel.load(_latest(artifacts)["path"])
    _evaluate(model, bench, root, args.queries)
    t, refs, score = _scorer(model, bench, root, args.queries)
    oracle, chains = _oracle(bench, root, t)
    score("oracle chain teacher-forced", embed_with_chains(model, refs, list(t.modification), chains, batch_size=64))
    score("oracle conclusion as text", model.embed_texts([oracle[q].conclusion for q in t.query_id]))


def corrections(args, artifacts):
    """Simulated correction on the first test queries: the model's own chain (decoded), then that chain
    with one section replaced by the oracle's where they differ (a person correcting it), each
    teacher-forced before ``<emb>`` as a corrected /search ranks it; R@1/10/50 and how many chains
    each correction changed."""
    from model_code.chain import SECTIONS, CoT, changed_sections
    from model_code.model.cir_cot import CirCoTModel
    from model_code.retrieval import embed_with_chains, infer

    root, bench, _ = _load(artifacts)
    model = CirCoTModel.load(_latest(artifacts)["path"])
    t, refs, score = _scorer(model, bench, root, args.queries)
    texts = list(t.modification)
    oracle, _ = _oracle(bench, root, t)
    oracle = [oracle[q] for q in t.query_id]
    decoded, chains = [], []
    for start in range(0, len(texts), 32):   # decoded in batches, as the evaluation decodes
        emb, part = infer(model, refs[start:start + 32], texts[start:start + 32], "cot")
        decoded.append(torch.as_tensor(emb))
        chains += part
    print(f"{len(texts)} test queries; {sum(c['error'] is not None for c in chains)} chains did not parse "
          "(a correction cannot name their sections: they keep the model's ranking)", flush=True)
    decoded = torch.cat(decoded)
    score("cot (the model's chain, decoded)", decoded)
    own = [CoT(c["caption"], c["reasoning"], c["conclusion"]) if c["error"] is None else None for c in chains]
    score("cot, its chain teacher-forced", embed_with_chains(model, refs, texts, own, batch_size=64))
    for fixed in (("conclusion",), ("caption",), ("reasoning",), ("caption", "reasoning", "conclusion")):
        given, changed = [], 0
        for c, o in zip(own, oracle):
            if c is None:
                given.append(None)
                continue
            sections = {s: getattr(o if s in fixed else c, s) for s in SECTIONS}
            changed += bool(set(fixed) & set(changed_sections(c, o)))
            given.append(CoT(**sections))
        emb = embed_with_chains(model, refs, texts, given, batch_size=64)
        if any(g is None for g in given):   # an unparsed chain keeps the ranking of its decoding
            keep = torch.tensor([g is None for g in given])
            emb[keep] = decoded[keep]
        score(f"{' + '.join(fixed)} corrected by the oracle's ({changed} of {len(given)} changed)", emb)


def decoding(args, artifacts):
    from model_code.chain import CoTFormatError, parse
    from model_code.model.cir_cot import CirCoTModel

    root, bench, _ = _load(artifacts)
    model = CirCoTModel.load(_latest(artifacts)["path"])
    t, refs, score = _scorer(model, bench, root, args.queries)
    texts = list(t.modification)
    score("no_cot", model.embed_queries(refs, texts))
    generate = model.model.generate
    for name, extra in (("greedy", {}), ("no_repeat_ngram_size=4", {"no_repeat_ngram_size": 4}),
                        ("repetition_penalty=1.3", {"repetition_penalty": 1.3})):
        model.model.generate = lambda *a, _extra=extra, **k: generate(*a, **{**k, **_extra})
        raw = model.generate_cots(refs, texts, batch_size=64)
        parsed = 0
        for text in raw:
            try:
                parse(text)
                parsed += 1
            except CoTFormatError:
                pass
        score(f"cot, {name} ({parsed}/{len(raw)} parse)",
              model.embed_queries(refs, texts, [x if x.strip() else " " for x in raw], batch_size=64))
    model.model.generate = generate


def stage1(args, artifacts, out: Path):
    from model_code.backbone import load_backbone
    from model_code.model.cir_cot import CirCoTModel, add_cir_tokens, apply_lora
    from model_code.model.recipes import PROFILES, pair_examples
    from model_code.model.train import train

    root, bench, _ = _load(artifacts)
    base = _record("base_model")
    torch.manual_seed(0)
    model, processor = load_backbone(base["path"])
    model.train()
    if args.full:
        add_cir_tokens(model, processor)
    else:
        model = apply_lora(model, processor, r=16, alpha=32)
    m = CirCoTModel(model, processor, base_path=base["path"], base_version=base["version"])
    cfg = dataclasses.replace(PROFILES["embedded"].align, steps=args.steps, lr=args.lr or PROFILES["embedded"].align.lr,
                              checkpoint_every=10**6, log_every=25)
    train(m, pair_examples(bench.triplets, bench.images, root, "train"), cfg, out / "stage1")
    _, refs, score = _scorer(m, bench, root, args.queries)
    t = bench.triplets[bench.triplets.split == "test"].iloc[:args.queries]
    score(
        f"no_cot after stage 1 ({'all parameters' if args.full else 'LoRA'})",
        m.embed_queries(refs, list(t.modification)),
    )


def cot_more(args, artifacts, out: Path):
    from model_code.model.cir_cot import CirCoTModel
    from model_code.model.recipes import PROFILES, pair_examples
    from model_code.model.train import train

    root, bench, ann = _load(artifacts)
    model = CirCoTModel.load(_latest(artifacts)["path"], trainable=True)
    cfg = dataclasses.replace(PROFILES["embedded"].cot, steps=args.steps, checkpoint_every=10**6, log_every=25)
    pairs = [p for p in pair_examples(bench.triplets, bench.images, root, "train", ann) if p.cot]
    train(model, pairs, cfg, out / "cot-more")
    _evaluate(model, bench, root, args.queries)


def skills(args, artifacts):
    import json

    from model_code.backbone import load_backbone
    from model_code.data import read_dataset
    from model_code.data.tables import image_paths
    from model_code.model.cir_cot import CirCoTModel, edit_answer, edit_request
    from model_code.model.decoding import generate_until
    from model_code.retrieval import embed_with_chains
    from model_code.synthetic import scenes
    from model_code.synthetic.oracle import describe, object_match, oracle_cot, scene_from_text
    from model_code.synthetic.resolution import resolution_scores

    path = Path(args.model or _latest(artifacts)["path"])
    tuned = (path / "circot.json").is_file()
    model = CirCoTModel.load(path) if tuned else CirCoTModel(*load_backbone(path, dtype="float32", device="cpu"))
    root = Path(args.data)
    bench = read_dataset("synthetic", root)
    graphs = json.loads((root / "scene_graphs" / "test.json").read_text())
    by_id = {q["query_id"]: q for q in json.loads((root / "captions" / "cap.test.json").read_text())}
    t = bench.triplets[bench.triplets.split == "test"].iloc[:args.queries]   # _scorer's queries, in its order
    queries = [by_id[q] for q in t.query_id]
    image = {i: p for (s, i), p in image_paths(bench.images, root).items() if s == "test"}
    refs = [set(scenes.scene_key(scenes.scene_from_json(graphs[q["reference"]]))) for q in queries]
    targets = [set(scenes.scene_key(scenes.scene_from_json(graphs[q["target"]]))) for q in queries]
    descriptions = [describe(scenes.scene_from_json(graphs[q["reference"]])) for q in queries]
    images = [image[q["reference"]] for q in queries]
    texts = [q["modification"] for q in queries]

    def exact(texts, truths):
        return [object_match(scene_from_text(t), truth)[0] for t, truth in zip(texts, truths)]

    rows = {"caption (describe prompt)": exact(generate_until(
        model, [model.prompt("describe")] * len(queries), images, "</caption>", 96), refs)}
    edited = generate_until(model, [model.prompt("edit", edit_request(d, m), image=False)
                               for d, m in zip(descriptions, texts)], None, "</conclusion>", 384)
    rows["edit of the true caption (edit prompt)"] = exact([t.rsplit("<conclusion>", 1)[-1] for t in edited], targets)
    oracle = [oracle_cot(q["query_id"], scenes.scene_from_json(graphs[q["reference"]]), q["edits"]) for q in queries]
    resolution = {"edit of the true caption (edit prompt)": resolution_scores(
        edited, [edit_answer(c.reasoning, c.conclusion) for c in oracle])}
    if tuned:
        embeddings, chains = model.infer_queries(images, texts, "cot", batch_size=50)   # written once
        resolution["the model's own chain"] = resolution_scores([c["text"] for c in chains],
                                                                [c.render() for c in oracle])
        cots = [c["cot"] for c in chains]
        rows["caption in the chain"] = cap = exact([c.caption if c else "" for c in cots], refs)
        rows["conclusion in the chain"] = con = exact([c.conclusion if c else "" for c in cots], targets)
        rows["conclusion, of chains whose caption is right"] = [c for c, ok in zip(con, cap) if ok]
        # what retrieval the chain would give were it right: the oracle's chain teacher-forced
        _, _, score = _scorer(model, bench, root, args.queries)
        score("cot (generated chain)", embeddings)
        score("cot with the oracle's chain teacher-forced",
              embed_with_chains(model, images, texts, _oracle(bench, root, t)[1], batch_size=50))
        score("no_cot", model.embed_queries(images, texts, None, batch_size=50))
    print(f"\n{path} ({len(queries)} test queries; exact = the stated scene is the true one)\n")
    print(skills_table(rows, [q["n_edits"] for q in queries]))
    print("\n" + resolution_table(resolution))
    # the same per query, by the reference's number of objects and, for single edits, by the edit's op
    print("\n" + grouped_table(rows, [len(r) for r in refs], "objects in the reference"))
    print("\n" + grouped_table(rows, [_op_name(q["edits"][0]) if len(q["edits"]) == 1 else None for q in queries],
                                "op of a single edit"))


def skills_table(rows: dict[str, list[bool]], edits: list[int]) -> str:
    """``skills``' markdown table: each row's exact share, over all queries and per edit count
    (``edits``: each query's); a row over a subset of the queries gives its size instead."""
    lines = ["| | all | 1 edit | 2 edits | 3 edits |", "|---|---|---|---|---|"]
    for name, ok in rows.items():
        cells = [f"{sum(ok) / max(len(ok), 1):.3f}"]
        if len(ok) == len(edits):
            for k in (1, 2, 3):
                sel = [o for o, e in zip(ok, edits) if e == k]
                cells.append(f"{sum(sel) / max(len(sel), 1):.3f} (n={len(sel)})")
        else:
            cells += [f"n={len(ok)}", "", ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def resolution_table(scores: dict[str, dict]) -> str:
    """``skills``' resolution table: per text compared with the oracle's (a row of ``scores``, the
    ``resolution_scores`` of its texts), the share of phrases resolved to the oracle's objects, overall
    and per kind of phrase, and where the wrong texts first differ from the oracle's."""
    from model_code.synthetic.resolution import PARTS, PHRASE_KINDS

    lines = ["Reference resolution (right / phrases) and the first error of the wrong texts:", "",
             "| | all | " + " | ".join(PHRASE_KINDS) + " | wrong texts | "
             + " | ".join(f"first error: {p}" for p in PARTS) + " |",
             "|---" * (3 + len(PHRASE_KINDS) + len(PARTS)) + "|"]
    for name, s in scores.items():
        cells = [f"{s['resolution_acc']:.3f} (n={s['n_resolved']})"]
        cells += [f"{s[f'resolution_acc[kind={k}]']:.3f} (n={s[f'n_resolved[kind={k}]']})"
                  if f"resolution_acc[kind={k}]" in s else "" for k in PHRASE_KINDS]
        cells.append(str(s["n_wrong"]))
        cells += [f"{s.get(f'first_error[part={p}]', 0.0):.3f}" for p in PARTS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grouped_table(rows: dict[str, list[bool]], keys: list, title: str) -> str:
    """Each row's exact share per value of ``keys`` (one per query; None: left out), for rows over
    every query: e.g. by the reference's number of objects, or by the op of a single edit."""
    groups = sorted({k for k in keys if k is not None}, key=str)
    lines = [f"By {title}:", "", "| | " + " | ".join(map(str, groups)) + " |", "|---" * (len(groups) + 1) + "|"]
    for name, ok in rows.items():
        if len(ok) != len(keys):
            continue
        cells = []
        for g in groups:
            sel = [o for o, k in zip(ok, keys) if k == g]
            cells.append(f"{sum(sel) / len(sel):.3f} (n={len(sel)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _op_name(edit: dict) -> str:
    """An edit's kind as the pretraining's scores name it: ``set`` edits by the attribute they set."""
    return {"color": "colour"}.get(edit.get("attr"), edit.get("attr")) if edit["op"] == "set" else edit["op"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["upper-bounds", "corrections", "decoding", "stage1", "cot-more", "skills"])
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--queries", type=int, default=128, help="first test queries evaluated")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float)
    p.add_argument("--full", action="store_true", help="stage1: all parameters trainable instead of LoRA")
    p.add_argument("--out", help="where training writes (default: a temporary folder)")
    p.add_argument("--model", help="skills: a saved model or base checkpoint folder (default: the newest model)")
    p.add_argument("--data", default="data/raw/synthetic", help="skills: the generated cir-shapes benchmark")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    artifacts = Path(args.artifacts)
    out = Path(args.out or tempfile.mkdtemp(prefix="circot-diagnose-"))
    {"upper-bounds": lambda: upper_bounds(args, artifacts), "decoding": lambda: decoding(args, artifacts),
     "corrections": lambda: corrections(args, artifacts),
     "stage1": lambda: stage1(args, artifacts, out),
     "cot-more": lambda: cot_more(args, artifacts, out), "skills": lambda: skills(args, artifacts)}[args.what]()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
