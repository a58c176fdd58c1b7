"""The CIR-CoT model: a Qwen2-VL-family MLLM that reasons, then compresses intent into ``<emb>``.

Three prompts (versioned by ``PROMPT_VERSION``), each a chat with one image whose assistant turn
ends in ``<emb>``:

- query:    reference image + modification; the assistant writes the chain of thought, then ``<emb>``
- no-CoT:   reference image + modification; the assistant answers ``<emb>`` at once
- gallery:  a gallery image + a one-word summary instruction; the assistant answers ``<emb>``

The embedding is the last-layer hidden state at ``<emb>``, L2-normalised, in float32. Batches are
left-padded, so ``<emb>`` is the last position of every row and padding changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from model_code.backbone import checkpoint_version, load_backbone
from model_code.chain import CoTFormatError, parse
from model_code.common import atomic_write_json, file_md5, writing

IGNORE = -100  # label of the positions no loss is computed on
CIR_TOKENS = ("<caption>", "</caption>", "<reasoning>", "</reasoning>", "<conclusion>", "</conclusion>", "<emb>")
EMB_TOKEN = "<emb>"
PROMPT_VERSION = "circot-prompts-v1"
PROMPTS = {
    "query": "Modification: {text}\nDescribe the reference image, reason about the modification, conclude with "
             "the image wanted, then embed it.",
    "no_cot": "Modification: {text}\nEmbed the image wanted.",
    "gallery": "Summarize this image in one word.",
    "describe": "Describe the image.",
    "text": "Description: {text}\nEmbed the image it describes.",
    "edit": "{text}\nDescribe the image after the modification.",  # pretraining's text edits
    "resolve": "{text}\nSay which object the phrase means.",       # pretraining's reference resolution
}
IDENTITY_REQUEST = "keep the image exactly as it is"   # pretraining: the no-change query of an image


def edit_request(description: str, modification: str) -> str:
    """The text of a text edit's prompt (``PROMPTS["edit"]``): a scene description and a modification."""
    return f"Description: {description}\nModification: {modification}"


def resolve_request(description: str, phrase: str) -> str:
    """The text of a resolution's prompt (``PROMPTS["resolve"]``): a scene description and a phrase."""
    return f"Description: {description}\nPhrase: {phrase}"


def caption_answer(description: str) -> str:
    """A caption as the chain of thought writes it (the describe prompt's answer)."""
    return f"<caption>{description}</caption>"


def edit_answer(reasoning: str | None, conclusion: str) -> str:
    """A text edit's answer as the chain writes its second half: reasoning (when given), then conclusion."""
    head = f"<reasoning>{reasoning}</reasoning>\n" if reasoning is not None else ""
    return f"{head}<conclusion>{conclusion}</conclusion>"


# LoRA on the language model only: plain names would also hit the vision tower, "all-linear" its Conv3d.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def add_cir_tokens(model, processor) -> list[int]:
    """Add the CoT section tokens and ``<emb>`` to the tokenizer (once) and resize the model's
    embeddings to match; returns their ids. Call before LoRA is applied."""
    tok = processor.tokenizer
    missing = [t for t in CIR_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing)
    if model.get_input_embeddings().weight.shape[0] < len(tok):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model.resize_token_embeddings(len(tok), mean_resizing=False)
    return tok.convert_tokens_to_ids(list(CIR_TOKENS))


def _open(image):

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return im.convert("RGB")
    return image.convert("RGB")


def unwrap(model):
    """The transformers model under PEFT / DDP wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


class CirCoTModel(torch.nn.Module):
    """A transformers image-text-to-text model (possibly PEFT-wrapped) and its processor."""

    decoding = "cot-format-v1"  # how chains are decoded (CoTFormat): part of what a cached cot embedding depends on

    def __init__(self, model, processor, *, base_path: str | None = None, base_version: str | None = None,
                 prompt_version: str = PROMPT_VERSION):
        super().__init__()
        self.model, self.processor = model, processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.base_path, self.base_version, self.prompt_version = base_path, base_version, prompt_version
        self.emb_id = self.tokenizer.convert_tokens_to_ids(EMB_TOKEN)
        if self.emb_id is None or self.emb_id == self.tokenizer.unk_token_id:
            raise ValueError("the tokenizer has no <emb> token: call add_cir_tokens(model, processor) first")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- prompts -----------------------------------------------------------------------------

    def prompt(self, kind: str, text: str = "", *, image: bool = True) -> str:
        """The chat up to the assistant turn for prompt ``kind`` (see ``PROMPTS``)."""
        content = ([{"type": "image"}] if image else []) + [
            {"type": "text", "text": PROMPTS[kind].format(text=text.strip())}
        ]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=False)

    def encode(self, prompts: Sequence[str], answers: Sequence[str], images: Sequence | None,
               train_answer: bool = False) -> dict:
        """Tokenise prompt + answer pairs (left-padded) with their images. With ``train_answer``,
        ``labels`` hold the answer's tokens (the supervised part) and IGNORE elsewhere."""
        texts = [p + a for p, a in zip(prompts, answers)]
        kwargs = {"images": [_open(i) for i in images]} if images is not None else {}
        batch = self.processor(text=texts, padding=True, return_tensors="pt", **kwargs)
        if train_answer:
            labels = torch.full_like(batch["input_ids"], IGNORE)
            for row, answer in enumerate(answers):
                n = len(self.tokenizer(answer, add_special_tokens=False)["input_ids"])
                labels[row, -n:] = batch["input_ids"][row, -n:]
            batch["labels"] = labels
        return dict(batch)

    def query_inputs(self, images, texts: Sequence[str], cots: Sequence[str | None] | None = None, *,
                     train_answer: bool = False) -> dict:
        """Queries: with a chain of thought (rendered text, teacher-forced) in the query prompt, or
        without one (None) in the no-CoT prompt."""
        cots = list(cots) if cots is not None else [None] * len(texts)
        prompts = [self.prompt("query" if c else "no_cot", t) for t, c in zip(texts, cots)]
        answers = [(c or "") + EMB_TOKEN for c in cots]
        return self.encode(prompts, answers, images, train_answer=train_answer and any(cots))

    def text_inputs(self, texts: Sequence[str]) -> dict:
        """Text-only queries: a description (or a modification alone) without an image."""
        return self.encode([self.prompt("text", t, image=False) for t in texts], [EMB_TOKEN] * len(texts), None)

    def gallery_inputs(self, images) -> dict:
        return self.encode([self.prompt("gallery")] * len(images), [EMB_TOKEN] * len(images), images)

    # ---- forward -----------------------------------------------------------------------------

    def hidden_states(self, inputs: dict) -> torch.Tensor:
        """Last-layer hidden states [batch, seq, hidden] of the language model, without the LM head."""
        inner = unwrap(self.model).model
        keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
        out = inner(**{k: inputs[k].to(self.device) for k in keys if k in inputs}, use_cache=False)
        return out.last_hidden_state

    def emb(self, inputs: dict, hidden: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 hidden state at each row's last ``<emb>`` [batch, hidden]."""
        ids = inputs["input_ids"].to(hidden.device)
        pos = torch.arange(ids.shape[1], device=hidden.device).expand_as(ids)
        last = torch.where(ids == self.emb_id, pos, -1).max(dim=1).values
        if (last < 0).any():
            raise ValueError("a sequence has no <emb> token")
        h = hidden[torch.arange(ids.shape[0], device=hidden.device), last]
        return F.normalize(h.float(), dim=-1)

    # ---- embedding API -----------------------------------------------------------------------

    @torch.inference_mode()
    def _embed(self, make_inputs, n: int, batch_size: int) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            out = [self.emb(inputs, self.hidden_states(inputs)).cpu()
                   for inputs in (make_inputs(slice(i, i + batch_size)) for i in range(0, n, batch_size))]
        finally:
            self.model.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.hidden_size)

    @property
    def hidden_size(self) -> int:
        return unwrap(self.model).config.text_config.hidden_size

    def embed_images(self, images: Sequence, batch_size: int = 32) -> torch.Tensor:
        """Gallery embeddings [n, hidden]: L2-normalised float32 on the CPU."""
        images = list(images)
        return self._embed(lambda s: self.gallery_inputs(images[s]), len(images), batch_size)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Text-only query embeddings [n, hidden]: each text in the description prompt, no image
        (the text-only baseline, and retrieval by a description)."""
        texts = list(texts)
        return self._embed(lambda s: self.text_inputs(texts[s]), len(texts), batch_size)

    def embed_queries(self, images: Sequence, texts: Sequence[str], cots: Sequence[str | None] | None = None,
                      batch_size: int = 32) -> torch.Tensor:
        """Query embeddings [n, hidden], from the reference images and modification texts, with a
        given chain of thought per query (rendered text) or none (the no-CoT prompt)."""
        images, texts = list(images), list(texts)
        cots = list(cots) if cots is not None else [None] * len(texts)
        return self._embed(lambda s: self.query_inputs(images[s], texts[s], cots[s]), len(images), batch_size)

    # ---- inference with reasoning ------------------------------------------------------------

    def reason_and_embed(self, images: Sequence, texts: Sequence[str], *, max_new_tokens: int = 256,
                         batch_size: int = 16, static_cache: bool | None = None
                         ) -> tuple[torch.Tensor, list[list[int]]]:
        """Each query's chain of thought, written greedily in the chain's format, and its ``<emb>``
        embedding, in one decoding pass (:func:`model_code.model.decoding.reason_and_embed`)."""
        from model_code.model.decoding import reason_and_embed

        return reason_and_embed(self, images, texts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                static_cache=static_cache)

    def generate_cots(self, images: Sequence, texts: Sequence[str], *, max_new_tokens: int = 256,
                      batch_size: int = 16, static_cache: bool | None = None) -> list[str]:
        """The chain of thought the model writes for each query (see :meth:`reason_and_embed`), as
        text without ``<emb>``."""
        _, chains = self.reason_and_embed(images, texts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                          static_cache=static_cache)
        return [self.tokenizer.decode(ids, skip_special_tokens=False) for ids in chains]

    def infer_queries(self, images: Sequence, texts: Sequence[str], mode: str = "cot", *,
                      max_new_tokens: int = 256, batch_size: int = 16) -> tuple[torch.Tensor, list[dict]]:
        """Query embeddings in ``mode`` ``cot`` (the model writes its reasoning and ``<emb>``, whose
        hidden state is the embedding: :meth:`reason_and_embed`) or ``no_cot`` (the prompt goes to
        ``<emb>`` at once). Returns the embeddings and, per query, ``{"text": raw reasoning, "ids":
        its token ids, "cot": CoT or None, "error": why it did not parse or None}`` (empty dicts in
        ``no_cot``)."""

        if mode == "no_cot":
            return self.embed_queries(images, texts, None, batch_size=batch_size), [{} for _ in texts]
        if mode != "cot":
            raise ValueError(f"mode must be 'cot' or 'no_cot', not {mode!r}")
        embeddings, chains = self.reason_and_embed(images, texts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        reasoning = []
        for ids in chains:
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            try:
                reasoning.append({"text": text, "ids": ids, "cot": parse(text), "error": None})
            except CoTFormatError as e:
                reasoning.append({"text": text, "ids": ids, "cot": None, "error": str(e)})
        return embeddings, reasoning

    # ---- persistence -------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> str:
        """Write the model as one folder: ``processor/`` (tokenizer with the added tokens), the
        weights (``adapter/`` over the base model folder recorded in ``circot.json``, or ``model/``
        in full), the prompts and a version hash. The version depends on content only: the weights
        written, the prompts and (for an adapter) the base model's version, never on a path, so a
        model saved again after loading has the same version. Returns the version."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        is_peft = hasattr(self.model, "peft_config")
        weights = path / ("adapter" if is_peft else "model")
        with writing(path):           # a full disk says so, naming the folder
            self.processor.save_pretrained(path / "processor")
            self.model.save_pretrained(weights)
            if not is_peft:  # full weights load like any checkpoint folder: config, weights and processor
                self.processor.save_pretrained(weights)
        if is_peft and self.base_version is None:
            if self.base_path is None:
                raise ValueError("an adapter model needs its base model's path or version to be saved")

            self.base_version = checkpoint_version(self.base_path)
        files = file_manifest(path)   # the version hashes the weights' md5s the manifest already holds
        version = model_version({rel: md5 for rel, (_, md5) in files.items()}, weights.name, PROMPTS,
                                self.base_version if is_peft else None)
        meta = {"format": 1, "weights": "adapter" if is_peft else "full", "base_model": self.base_path,
                "files": files,
                "base_version": self.base_version if is_peft else None,
                "prompt_version": self.prompt_version, "prompts": PROMPTS, "emb_token": EMB_TOKEN,
                "cir_tokens": list(CIR_TOKENS), "hidden_size": self.hidden_size, "version": version}
        atomic_write_json(path / "circot.json", meta)
        self.version = version
        return version

    @classmethod
    def load(cls, path: str | os.PathLike, *, dtype: str = "auto", device: str | None = None,
             attn_implementation: str | None = None, trainable: bool = False, verify: bool = False) -> CirCoTModel:
        """Load a folder written by :meth:`save`; with ``trainable`` the adapter stays trainable.
        A relative base model path (a model store entry's ``../base``) is resolved against ``path``.
        Each file is checked against the size recorded when saved; with ``verify`` by content too
        (:func:`check_model_folder`: every file's md5 and the version recomputed from the weights), as
        the loads from the model store do (``registry.load_promoted``, the service's encoder)."""
        from transformers import AutoProcessor


        path = Path(path)
        meta, base_path = check_model_folder(path, hashes=verify)
        processor = AutoProcessor.from_pretrained(path / "processor")
        if meta["weights"] == "full":
            model, _ = load_backbone(
                path / "model", dtype=dtype, device=device, attn_implementation=attn_implementation
            )
        else:
            from peft import PeftModel

            base, _ = load_backbone(base_path, dtype=dtype, device=device,
                                    attn_implementation=attn_implementation)
            add_cir_tokens(base, processor)
            model = PeftModel.from_pretrained(base, path / "adapter", is_trainable=trainable).to(base.device)
        model.eval()
        out = cls(model, processor, base_path=str(base_path) if base_path else None,
                  base_version=meta.get("base_version"), prompt_version=meta["prompt_version"])
        out.version = meta["version"]
        return out


class ModelFolderError(FileNotFoundError):
    """A saved model folder lacks a file it needs, or a file differs from what was saved; the message
    names it."""


# files of a model folder outside its manifest: the description that holds the manifest, and the model
# card (model_code/model_card.py), which is written after the evaluation and rewritten after each one
UNMANIFESTED = ("circot.json", "README.md")


def file_manifest(path: str | os.PathLike) -> dict[str, list]:
    """``{relative path: [size, md5]}`` of every file under ``path`` but those in :data:`UNMANIFESTED`."""
    path = Path(path)
    return {f.relative_to(path).as_posix(): [f.stat().st_size, file_md5(f)]
            for f in sorted(path.rglob("*")) if f.is_file() and f.relative_to(path).as_posix() not in UNMANIFESTED}


def model_version(md5s: dict[str, str], weights: str, prompts: dict, base_version: str | None) -> str:
    """A saved model's version from its content: the md5s (``{relative path: md5}``) of the
    ``*.safetensors`` under the weights folder ``weights`` (``adapter`` or ``model``), the prompts and,
    for an adapter, its base model's version. :meth:`CirCoTModel.save` writes it; the verification by
    content (:func:`verify_model_files`) computes it again from the files as they are."""
    h = hashlib.md5()
    # in the order of the weights' paths part by part, as Path objects sort (the order saved models used)
    for rel in sorted((r for r in md5s if r.startswith(f"{weights}/") and r.endswith(".safetensors")),
                      key=lambda r: r.split("/")):
        h.update(md5s[rel].encode())
    h.update(json.dumps(prompts, sort_keys=True).encode())
    h.update(str(base_version or "").encode())
    return h.hexdigest()[:16]


def verify_model_files(path: str | os.PathLike, meta: dict, *, hashes: bool = True) -> None:
    """Check the files of a saved model against the manifest it recorded when saved: each file there
    and as big as saved, and when ``hashes`` by content, every file's md5 as saved and the version
    recomputed from the weights (:func:`model_version`, every ``*.safetensors`` of the weights folder,
    manifested or not) equal to the one ``circot.json`` states. :class:`ModelFolderError` names the
    first file that differs, or the two versions. Models saved before manifests existed have none and
    pass."""
    path = Path(path)
    manifest = meta.get("files") or {}
    for rel, (size, _) in manifest.items():
        f = path / rel
        if not f.is_file():
            raise ModelFolderError(f"the model at {path} is damaged: {rel} is missing")
        if f.stat().st_size != size:
            raise ModelFolderError(f"the model at {path} is damaged: {rel} has {f.stat().st_size} bytes, "
                                   f"{size} when saved")
    if not (hashes and manifest):
        return
    found = {}
    for rel, (_, md5) in manifest.items():
        found[rel] = file_md5(path / rel)
        if found[rel] != md5:
            raise ModelFolderError(f"the model at {path} is damaged: {rel} differs from what was saved (md5)")
    weights = "adapter" if meta.get("weights") == "adapter" else "model"
    for f in (path / weights).rglob("*.safetensors"):   # weights put in beside the manifest's count too
        rel = f.relative_to(path).as_posix()
        if rel not in found:
            found[rel] = file_md5(f)
    version = model_version(found, weights, meta.get("prompts") or {}, meta.get("base_version"))
    if version != meta.get("version"):
        raise ModelFolderError(f"the model at {path} is damaged: its version recomputed from its weights is {version}, "
                               f"circot.json says {meta.get('version')} (circot.json was edited, or describes "
                               "another model)")


def check_model_folder(path: str | os.PathLike, *, hashes: bool = False) -> tuple[dict, Path | None]:
    """Check that a folder written by :meth:`CirCoTModel.save` holds every file it needs (its
    ``circot.json``, the processor, the weights, and for an adapter its base model's config and
    weights), each as big as when it was saved, and return its metadata and resolved base path;
    :class:`ModelFolderError` names the first file missing or damaged. With ``hashes`` the check is by
    content (:func:`verify_model_files`: every file's md5, the version recomputed from the weights;
    for an adapter its base model's version recomputed from the base's config and weights too): the
    one check of the promotion, ``circot models --verify``, the gallery index's and the service's
    loads."""
    path = Path(path)

    def need(file: Path, what: str) -> None:
        if not file.is_file():
            raise ModelFolderError(f"the model at {path} is incomplete: {what} {file} is missing")

    need(path / "circot.json", "its description")
    try:
        meta = json.loads((path / "circot.json").read_text())
        weights = meta["weights"]
    except (ValueError, KeyError) as e:
        raise ModelFolderError(f"the model at {path} has an unreadable circot.json ({e})") from None
    need(path / "processor" / "tokenizer.json", "the processor's tokenizer")
    settings = [path / "processor" / n for n in ("processor_config.json", "preprocessor_config.json")]
    need(next((f for f in settings if f.is_file()), settings[0]), "the processor's settings")
    if weights == "full":
        need(path / "model" / "config.json", "the model's config")
        if not list((path / "model").glob("*.safetensors")):
            raise ModelFolderError(f"the model at {path} is incomplete: no weights (*.safetensors) in {path / 'model'}")
        verify_model_files(path, meta, hashes=hashes)
        return meta, None
    need(path / "adapter" / "adapter_config.json", "the adapter's config")
    need(path / "adapter" / "adapter_model.safetensors", "the adapter's weights")
    if not meta.get("base_model"):
        raise ModelFolderError(f"the model at {path} names no base model in circot.json")
    base = Path(meta["base_model"])
    base = base if base.is_absolute() else (path / base).resolve()
    need(base / "config.json", "its base model's config")
    if not list(base.glob("*.safetensors")):
        raise ModelFolderError(f"the model at {path} is incomplete: its base model {base} has no weights "
                               f"(*.safetensors)")
    verify_model_files(path, meta, hashes=hashes)
    if hashes and meta.get("files") and (found := checkpoint_version(base)) != meta.get("base_version"):
        raise ModelFolderError(f"the model at {path} is damaged: its base model {base} has version {found}, "
                               f"{meta.get('base_version')} when the model was saved")
    return meta, base


def apply_lora(model, processor, *, r: int = 16, alpha: int = 32, dropout: float = 0.0,
               fp32_adapters: bool = True):
    """Wrap ``model`` with LoRA adapters on the language model's linear layers (docs/architecture.md §5) and
    trainable rows for the added tokens in the input embeddings and the LM head. ``fp32_adapters``
    False keeps the adapters in the base model's dtype (bf16 on a GPU): no casts around every
    adapted layer, at some cost in precision of the adapter updates."""
    from peft import LoraConfig, get_peft_model

    ids = add_cir_tokens(model, processor)
    token_rows = {"embed_tokens": ids}
    config = unwrap(model).config
    tied = getattr(config, "tie_word_embeddings", False) or getattr(
        config.get_text_config(), "tie_word_embeddings", False
    )
    if not tied:
        token_rows["lm_head"] = ids
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS,
                      trainable_token_indices=token_rows)
    return get_peft_model(model, lora, autocast_adapter_dtype=fp32_adapters)


def compile_decoder_layers(model) -> int:
    """``torch.compile`` each decoder layer of the language model (the identical layers share one
    compiled graph, so compiling is quick); fuses the casts and element-wise work around the
    matrix products. Returns how many layers were compiled."""
    layers = unwrap(model).model.language_model.layers
    for layer in layers:
        layer.compile()
    return len(layers)


def parameter_counts(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
