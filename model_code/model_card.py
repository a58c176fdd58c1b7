"""The model card of a saved CIR-CoT model: ``README.md`` in its folder, in the Hugging Face model-card
format (YAML front matter, then Markdown), so that the folder explains itself wherever it is copied
(the BentoML store, a Bento, a hub).

- :func:`render_model_card` is a pure function of the records: the ``TrainedModel``
  (model_code/model/recipes.py), the ``EvaluationRecord`` s (model_code/evaluation/evaluate.py) and
  the promotion gate's verdicts (model_code/evaluation/gate.py, as ``Verdict.to_dict()`` or the
  ``gate.json`` written beside an evaluation). Each may be given as its record or as its dict.
- :func:`write_model_card` writes it into the model folder; :func:`card_for_evaluation` is what the
  promotion gate calls: the card of the evaluated model with every evaluation of that model version
  found beside this one (``<artifacts>/evaluation/<dataset>/<split>/record.json`` and ``gate.json``).

The card is not part of the model's file manifest (``file_manifest`` in model_code/model/cir_cot.py
leaves it out), so writing it after training, or again after another evaluation, never makes a
model look damaged; promotion copies it into the store entry (model_code/registry.py).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml

from model_code.benchmarks import zero_shot_note
from model_code.common import atomic_write_text

log = logging.getLogger(__name__)

CARD_NAME = "README.md"
PAPER = "https://arxiv.org/abs/2510.08003"
TAGS = ["circot", "cir-cot", "composed-image-retrieval", "chain-of-thought", "image-retrieval", "qwen2-vl"]
# reasoning-quality figures of the cot method, shown apart from the retrieval table
REASONING_METRICS = ("cot_parsed", "conclusion_exact", "conclusion_object_f1")


def _as_dict(value) -> dict:
    if value is None:
        return {}
    return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def _number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.3f}" if isinstance(value, float) else f"{value:,}"


def _count(n) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    return f"{n / 1e6:.1f} M" if n >= 100_000 else f"{n:,}"


def _front_matter(meta: dict) -> str:

    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _weights_kind(trained: dict, weights: str | None) -> str:
    """``adapter`` (LoRA over the base) or ``full`` (every parameter): from circot.json when given,
    else from the parameter counts (a LoRA model trains a small part of its parameters)."""
    if weights in ("adapter", "full"):
        return weights
    counts = trained.get("parameters") or {}
    total, trainable = counts.get("total"), counts.get("trainable")
    if isinstance(total, int) and isinstance(trainable, int) and trainable < total:
        return "adapter"
    return "full"


METHOD_ORDER = ("cot", "no_cot", "image_only", "text_only")
METRIC_ORDER = ("R", "R_subset", "mAP")


def _metric_key(name: str) -> tuple:
    """Recall@K, then Recall_subset@K, then mAP@K, each by K; metrics without a K (Avg) last. (Records
    come back from Dagster's metadata with their keys sorted as text: R@10 before R@5.)"""
    prefix, _, k = name.partition("@")
    known = METRIC_ORDER.index(prefix) if prefix in METRIC_ORDER else len(METRIC_ORDER)
    return (not k.isdigit(), known, prefix, int(k) if k.isdigit() else 0)


def _tabled(name: str) -> bool:
    """A metric the card's table and model-index show: not a breakdown (``R@1[edits=2]``), a category's
    (``dress/R@10``) or a reasoning figure."""
    return "[" not in name and "/" not in name and name not in REASONING_METRICS


def _metric_table(metrics: dict[str, dict[str, float]]) -> list[str]:
    """One row per method; the columns every method has (breakdowns ``R@1[edits=2]``, per-category
    ``dress/R@10`` and group sizes left to the evaluation's own report)."""
    methods = sorted(metrics, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))
    if not methods:
        return ["(no metrics: the split hides its targets)"]
    columns = sorted((k for k in metrics[methods[0]]
                      if _tabled(k) and all(k in metrics[m] for m in methods)), key=_metric_key)
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(_number(metrics[m][c]) for c in columns) + " |" for m in methods]
    cot = metrics.get("cot", {})
    reasoning = [(k, cot[k]) for k in REASONING_METRICS if k in cot]
    if reasoning:
        lines += ["", "Reasoning written by `cot`: " + ", ".join(f"{k} {_number(v)}" for k, v in reasoning)
                  + " (`cot_parsed`: share of chains that parse; `conclusion_exact`: share whose conclusion "
                    "states the target exactly)."]
    return lines


def _where(record: dict) -> str:
    """"circo / val", and ", zero-shot from cirr" where the model was trained on another benchmark."""
    dataset = record.get("dataset", "?")
    return f"{dataset} / {record.get('split', '?')}{zero_shot_note(dataset, record.get('trained_on'))}"


def _metric_type(name: str) -> str:
    """A model-index metric type: ``R@10`` -> ``recall_at_10``, ``R_subset@1`` -> ``recall_subset_at_1``,
    ``mAP@10`` -> ``map_at_10``, ``Avg`` -> ``avg``."""
    prefix, _, k = name.partition("@")
    kind = {"R": "recall", "R_subset": "recall_subset", "mAP": "map"}.get(prefix, prefix.lower())
    return f"{kind}_at_{k}" if k else kind


def model_index(name: str, pairs: list[tuple[dict, dict | None]]) -> list[dict]:
    """Hugging Face's ``model-index``: one result per evaluation, the metrics of the served method
    (``cot``) that the card's table shows."""
    results = []
    for r, _ in pairs:
        cot = (r.get("metrics") or {}).get("cot") or {}
        shown = sorted((k for k in cot if _tabled(k) and isinstance(cot[k], (int, float))), key=_metric_key)
        if not shown:
            continue
        results.append({
            "task": {"type": "composed-image-retrieval", "name": "Composed image retrieval"},
            "dataset": {"type": r.get("dataset", "?"), "name": r.get("dataset", "?"), "split": r.get("split", "?")},
            "metrics": [{"type": _metric_type(k), "name": f"{k} (CIR-CoT)", "value": round(float(cot[k]), 4)}
                        for k in shown]})
    return [{"name": name, "results": results}] if results else []


def base_license(base: str | os.PathLike) -> str | None:
    """The license a base model's own card declares (``license`` in the front matter of its folder's
    ``README.md``: the embedded base's is MIT, a Qwen2-VL checkpoint's Apache 2.0), or None."""
    try:
        text = (Path(base) / CARD_NAME).read_text()
    except OSError:
        return None
    if not text.startswith("---\n"):
        return None
    try:
        front = yaml.safe_load(text.split("---\n", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    value = front.get("license") if isinstance(front, dict) else None
    return value if isinstance(value, str) and value else None


def _limitations(pairs: list[tuple[dict, dict | None]], base_name: str) -> list[str]:
    out = ["## Limitations", ""]
    evaluated = ", ".join(f"{_where(r)} ({r.get('queries', '?')} queries)" for r, _ in pairs)
    out.append(f"- Evaluated only on {evaluated}; nothing is known of it on other data."
               if pairs else "- Not evaluated: nothing is known of its retrieval or its reasoning yet.")
    for r, _ in pairs:
        exact = ((r.get("metrics") or {}).get("cot") or {}).get("conclusion_exact")
        if isinstance(exact, (int, float)):
            out.append(f"- Its reasoning is not always right: on {_where(r)} its conclusion states the target "
                       f"exactly for {exact:.1%} of the queries; a wrong conclusion can still retrieve the target, "
                       "and a right one can miss it.")
    out.append("- Its reasoning is checked for format everywhere, for content only where the benchmark can tell "
               "a right conclusion from a wrong one (the synthetic benchmark): elsewhere a fluent chain may be "
               "wrong about the images.")
    if base_name == "embedded_base":
        out.append("- Its base, the embedded base, knows only the synthetic benchmark's world (shapes, colours, "
                   "sizes on a grid, at 84 px, in the oracle's wording): no photographs, no free English.")
    small = [r for r, _ in pairs if isinstance(r.get("queries"), int) and r["queries"] < 1000]
    if small:
        out.append("- Figures on fewer than 1,000 queries move by a few points from run to run: differences "
                   "that small are noise.")
    return out + [""]


def render_model_card(trained, evaluations: Iterable[tuple[object, object]] = (), *, base_model: str | None = None,
                      weights: str | None = None, license: str | None = None) -> str:
    """The card (front matter and Markdown) of the model ``trained`` (a ``TrainedModel`` or its
    dict) with ``evaluations``: ``(EvaluationRecord or dict, gate verdict dict / Verdict or None)``
    pairs. ``base_model``: the base's hub id or name (default: the base folder's name); ``weights``:
    ``adapter`` or ``full`` as ``circot.json`` says (default: read from the parameter counts);
    ``license``: the base's (default: what the base folder's card declares, else ``other``, the base
    model's license, which the card then names)."""
    t = _as_dict(trained)
    pairs = [(_as_dict(r), _as_dict(v) or None) for r, v in evaluations]
    pairs.sort(key=lambda p: (p[0].get("dataset", ""), p[0].get("split", "")))
    kind = _weights_kind(t, weights)
    base_name = base_model or Path(str(t.get("base", "") or "unknown")).name or "unknown"
    data = t.get("data") or {}
    datasets = sorted(set(data) | {r.get("dataset") for r, _ in pairs if r.get("dataset")})
    license = license or base_license(t.get("base", "") or "") or "other"
    version = t.get("version") or "unsaved"
    front = {
        "license": license,
        # `other`: the base model's license, named as such, and its page on the hub where the base is a hub id
        **({"license_name": "base-model-license"} if license == "other" else {}),
        **({"license_link": f"https://huggingface.co/{base_name}"}
           if license == "other" and base_name.count("/") == 1 else {}),
        "library_name": "peft" if kind == "adapter" else "transformers",
        "base_model": base_name,
        "base_model_relation": "adapter" if kind == "adapter" else "finetune",
        "tags": TAGS,
        "datasets": datasets,
    }
    index = model_index(f"cir-cot:{version}", pairs)
    if index:
        front["model-index"] = index
    out = [_front_matter(front), f"# cir-cot:{version}", "",
           "A CIR-CoT model for composed image retrieval, trained by the circot pipeline. Given a reference "
           "image and a modification text, it writes a caption of the reference, its reasoning and a conclusion "
           "describing the target (`<caption>…</caption><reasoning>…</reasoning><conclusion>…</conclusion>`), then "
           "embeds the query at `<emb>`; gallery images are embedded by the same model and ranked by cosine "
           f"similarity. Method: Lin et al., 2025, CIR-CoT ([arXiv 2510.08003]({PAPER})).", ""]

    counts = t.get("parameters") or {}
    out += ["## Base", "", "| | |", "|---|---|",
            f"| base model | `{base_name}` |",
            f"| base version | `{t.get('base_version', '?')}` |",
            f"| base folder when trained | `{t.get('base', '?')}` |",
            "| weights | " + ("a LoRA adapter over the base (`adapter/`)" if kind == "adapter"
                              else "every parameter fine-tuned (`model/`)") + " |",
            f"| parameters | {_count(counts.get('total'))} in all, {_count(counts.get('trainable'))} trained |",
            ""]

    out += ["## Data versions", ""]
    if t.get("dataset"):
        out += [f"Trained on `{t['dataset']}` (its train split and checked chains).", ""]
    if data:
        out += ["| dataset | raw data | annotations | teacher / prompt |", "|---|---|---|---|"]
        out += [f"| {d} | `{v.get('raw', '?')}` | `{v.get('annotations', '?')}` | "
                f"`{v.get('teacher', '?')}/{v.get('prompt_version', '?')}` |" for d, v in sorted(data.items())]
        for d, v in sorted(data.items()):
            fb = v.get("feedback")
            if fb:   # people's picks in the service; a chain a person corrected is counted apart from a teacher's
                out += ["", f"Feedback of `{d}`: version `{fb.get('version', '?')}`, "
                        f"{fb.get('triplets', '?')} triplets "
                        f"(weight {fb.get('weight', '?')}); chains written by people (corrections): "
                        f"{fb.get('person_chains', 0)}, by the teacher: {fb.get('teacher_chains', '?')}."]
    else:
        out += ["(not recorded)"]
    out += [""]

    out += ["## Recipe", ""]
    if t.get("profile"):
        out += [f"Profile `{t['profile']}`.", ""]
    stages = t.get("stages") or {}
    if stages:
        out += ["| stage | steps | examples | seconds | loss (first → last) | validation in-batch accuracy |",
                "|---|---|---|---|---|---|"]
        for name, s in stages.items():
            first, last, val = s.get("first") or {}, s.get("last") or {}, s.get("val") or {}
            out.append(f"| {name} | {s.get('steps', '?')} | {s.get('examples', '?')} | {s.get('seconds', '?')} | "
                       f"{_number(first.get('loss', '?'))} → {_number(last.get('loss', '?'))} | "
                       f"{_number(val['acc']) if 'acc' in val else '-'} |")
        out += ["", "Stage `align`: the query without a chain against its target (InfoNCE); stage `cot`: the chain "
                "teacher-forced, `L = λ_txt·CE + λ_info·InfoNCE`."]
    else:
        out += ["(not recorded)"]
    out += [""]

    out += ["## Evaluation", ""]
    if not pairs:
        out += ["Not evaluated yet.", ""]
    for r, _ in pairs:
        out += [f"### {_where(r)}", "",
                f"{r.get('queries', '?')} queries; headline metric `{r.get('headline', '?')}`; the full report "
                f"(per-query reasoning, plots, breakdowns) was written to `{r.get('folder', '?')}`.", ""]
        out += _metric_table(r.get("metrics") or {}) + [""]

    out += ["## Gate verdict", ""]
    if not pairs:
        out += ["No verdict yet.", ""]
    for r, v in pairs:
        where = _where(r)
        if not v:
            out += [f"- {where}: not judged", ""]
            continue
        value = v.get("value")
        said = "passed, promotable" if v.get("passed") else "refused, not promoted"
        out += [f"### {where}: {said} ({v.get('headline', '?')} {_number(value)})", ""]
        out += [f"- {v['note']}"] if v.get("note") else []
        out += [f"- {'PASS' if c.get('passed') else 'FAIL'} {c.get('name', '?')}: {c.get('detail', '')}"
                for c in v.get("checks", [])] + [""]

    out += ["## Use", "", "```python",
            "from model_code.model.cir_cot import CirCoTModel",
            "",
            "model = CirCoTModel.load(\"<this folder>\")   # device / dtype: see its docstring",
            "gallery = model.embed_images(image_paths)                      # L2-normalised",
            "queries, reasoning = model.infer_queries(images, texts, \"cot\")  # the chain, then <emb>",
            "```", "",
            "Intended for composed image retrieval on the benchmark it was evaluated on above, with its reasoning "
            "shown to the person who searches (who can correct it).", ""]
    out += _limitations(pairs, base_name)
    out += ["## License", "",
            (f"`{license}`, the base model's license." if license != "other"
             else "The base model's license (not declared in the base folder's card)."), ""]
    return "\n".join(out)


def base_model_name(base: str | os.PathLike) -> str:
    """A base model's hub id where its folder names one (``_name_or_path`` of its config, ``org/name``),
    else the folder's name (the embedded base: ``embedded_base``)."""
    path = Path(base)
    try:
        named = json.loads((path / "config.json").read_text()).get("_name_or_path", "")
    except (OSError, ValueError):
        named = ""
    if isinstance(named, str) and named.count("/") == 1 and not named.startswith((".", "/")):
        return named
    return path.name or str(base)


def write_model_card(model_dir: str | os.PathLike, trained, evaluations: Sequence[tuple[object, object]] = ()) -> Path:
    """Write ``README.md`` (the card) into the saved model folder ``model_dir``. Returns its path."""
    model_dir = Path(model_dir)
    t = _as_dict(trained)
    try:
        weights = json.loads((model_dir / "circot.json").read_text()).get("weights")
    except (OSError, ValueError):
        weights = None
    text = render_model_card(t, evaluations, base_model=base_model_name(t.get("base", "")), weights=weights)
    return atomic_write_text(model_dir / CARD_NAME, text)


def evaluations_of(model_version: str, evaluation_root: str | os.PathLike) -> list[tuple[dict, dict | None]]:
    """The evaluations of ``model_version`` under ``evaluation_root`` (``<dataset>/<split>/record.json``)
    with the gate's verdict on each (``gate.json`` beside it, when it judged this version)."""
    found = []
    for path in sorted(Path(evaluation_root).glob("*/*/record.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("model_version") != model_version:
            continue
        try:
            verdict = json.loads(path.with_name("gate.json").read_text())
        except (OSError, ValueError):
            verdict = None
        if verdict is not None and verdict.get("model_version") != model_version:
            verdict = None
        found.append((record, verdict))
    return found


def card_for_evaluation(record, verdict) -> Path | None:
    """The card of the model ``record`` (an ``EvaluationRecord``) evaluated, with ``verdict`` (the
    gate's, as written to ``gate.json``) and every other evaluation of the same model version beside
    it. Returns the card's path, or None when the model folder is not on this machine."""
    r = _as_dict(record)
    trained = r.get("model") or {}
    model_dir = Path(str(trained.get("path", "")))
    if not trained.get("path") or not (model_dir / "circot.json").is_file():
        log.warning("no model folder at %r: its model card is not written", trained.get("path"))
        return None
    here = (r.get("dataset"), r.get("split"))
    folder = Path(str(r.get("folder", "")))
    found = evaluations_of(r.get("model_version", ""), folder.parents[1]) if len(folder.parents) > 1 else []
    others = [(o, v) for o, v in found if (o.get("dataset"), o.get("split")) != here]
    return write_model_card(model_dir, trained, [*others, (r, verdict)])


def render_base_card(record: dict) -> str:
    """The card (``README.md``) of a pretrained base published into the repository (the embedded base),
    from its ``PRETRAINING.json`` ``record``: Hugging Face's front matter with its held-out figures as
    ``model-index``, what it is, how it was made, its limitations."""
    p = record.get("perception") or {}
    figures = [("caption_exact", "caption exact"), ("caption_object_f1", "caption object F1"),
               ("edit_exact", "edit exact"), ("edit_object_f1", "edit object F1"),
               ("text_to_image_R@1", "description to image R@1")]
    shown = [(k, label, p[k]) for k, label in figures if isinstance(p.get(k), (int, float))]
    config = record.get("config") or {}
    scenes = config.get("heldout", "?")
    front = {
        "license": "mit",
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": ["circot", "qwen2-vl", "composed-image-retrieval", "chain-of-thought", "synthetic-data", "tiny"],
        "model-index": [{"name": f"circot-embedded-base:{record.get('version', '?')}", "results": [{
            "task": {"type": "image-text-to-text", "name": "Captions and edits of cir-shapes scenes"},
            "dataset": {"type": "cir-shapes", "name": f"cir-shapes held-out scenes ({scenes})", "split": "held-out"},
            "metrics": [{"type": k.lower().replace("@", "_at_"), "name": label, "value": round(float(v), 4)}
                        for k, label, v in shown]}]}] if shown else [],
    }
    if not front["model-index"]:
        del front["model-index"]
    phases = len(record.get("earlier") or []) + 1
    out = [_front_matter(front), f"# circot embedded base `{record.get('version', '?')}`", "",
           "A tiny vision-language model of the Qwen2-VL architecture (`Qwen2VLForConditionalGeneration`), trained "
           "from random weights by the circot project on synthetic scenes of shapes (cir-shapes) so that the "
           "CIR-CoT pipeline runs end to end on a CPU. It holds no Qwen weights. The `embedded` training profile "
           "fine-tunes all of it into a CIR-CoT model.", "",
           "| | |", "|---|---|",
           f"| version | `{record.get('version', '?')}` (md5 of `config.json` and the weights) |",
           f"| pretraining | {phases} phase{'s' if phases > 1 else ''}; the last: {record.get('steps', '?')} steps, "
           f"{record.get('seconds', '?')} s |",
           "| record | `PRETRAINING.json`: the commands, configurations, figures and curves of every phase |", "",
           f"## Figures (held-out scenes, {scenes})", "",
           "| | |", "|---|---|", *[f"| {label} | {_number(float(v))} |" for _, label, v in shown], "",
           "## Limitations", "",
           "- It knows only cir-shapes' world: six shapes, six colours, two sizes on a 3x3 grid, at 84 px, in the "
           "oracle's wording. It has never seen a photograph or free English: it is no base for FashionIQ, CIRR "
           "or CIRCO (use a real Qwen2-VL checkpoint and the `gpu` profile there).",
           "- Perception is its strong skill; applying an edit in text is the weak one (`edit exact` above), and "
           "finding the object a phrase names by colour, shape or size is what fails first: a CIR-CoT model "
           "fine-tuned from it writes conclusions that are right no more often.",
           "- The figures are on few scenes: differences of a few points are noise.", "",
           "## Intended use", "",
           "Testing and demonstrating the pipeline without a GPU or a download, and small-scale research on how a "
           "chain of thought helps composed retrieval. The project's documentation holds the full card "
           "(`docs/model-card-embedded-base.md`: the phases, per-edit figures, reference resolution).", "",
           "## License", "", "MIT, as the circot code (`LICENSE`).", ""]
    return "\n".join(out)


def write_base_card(folder: str | os.PathLike) -> Path:
    """Write ``README.md`` into a published base folder from its ``PRETRAINING.json``."""
    folder = Path(folder)
    record = json.loads((folder / "PRETRAINING.json").read_text())
    return atomic_write_text(folder / CARD_NAME, render_base_card(record))
