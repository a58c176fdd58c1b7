"""Qwen2-VL-family backbones: load a real checkpoint from a local folder, or build one locally.

Nothing here downloads anything. ``build_random_backbone`` makes a randomly initialised model of a
named shape (``tiny`` for the CPU machines, ``qwen2-vl-2b`` with the 2B checkpoint's dimensions for
GPU benchmarks) with a byte-level BPE tokenizer trained on a given corpus by the ``tokenizers``
library and a Qwen2-VL processor assembled in-process; ``save_backbone`` writes it in the standard
layout, so ``load_backbone`` (``AutoModelForImageTextToText`` + ``AutoProcessor``) reads it exactly
like a downloaded checkpoint.

``build_micro_checkpoint`` writes a micro checkpoint (shape ``micro``, about 1.6 million random
parameters, a tokenizer trained on English texts) to stand in for a real base model on a CPU try of
a real benchmark; ``texts_from_files`` gathers its texts from JSON or JSON Lines files.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model_code.common import atomic_write_json, file_md5, replace_dir, writing

# torch, transformers: imported where used (slow to import; the annotation teachers load this module, and
# checkpoint_version and the shapes need neither)

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>")

# Qwen2-VL's chat format: images become <|vision_start|><|image_pad|><|vision_end|> in the text and the
# processor expands <|image_pad|> to the image's tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class BackboneShape:
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vision_embed: int
    vision_depth: int
    vision_heads: int
    vocab_size: int | None = None  # None: the tokenizer's size
    image_size: int = 112          # the processor resizes every image to this square
    patch_size: int = 14           # vision patches (2x2 of them merge into one language-model token)

    @property
    def mrope_section(self) -> list[int]:
        half = self.text_hidden // self.text_heads // 2  # Qwen2-VL splits rotary dims 1:1.5:1.5 over (t, h, w)
        t = half // 4
        h = (half - t) // 2
        return [t, h, half - t - h]


SHAPES = {
    "tiny": BackboneShape(text_hidden=256, text_layers=4, text_heads=4, text_kv_heads=2, text_intermediate=768,
                          vision_embed=128, vision_depth=4, vision_heads=4, image_size=112),
    # the pretrained embedded base: 84 px with 7 px patches, so a cir-shapes cell (28 px) is 4x4 patches
    # and 2x2 language-model tokens, and a small shape covers 2x2 patches instead of about one
    "tiny84": BackboneShape(text_hidden=256, text_layers=4, text_heads=4, text_kv_heads=2, text_intermediate=768,
                            vision_embed=128, vision_depth=4, vision_heads=4, image_size=84, patch_size=7),
    # a stand-in for a real base on a CPU try of a real benchmark (build_micro_checkpoint): 56 px images
    # (4 image tokens), about 1.6 million parameters with a 2,000-token vocabulary
    "micro": BackboneShape(text_hidden=128, text_layers=4, text_heads=4, text_kv_heads=2, text_intermediate=384,
                           vision_embed=64, vision_depth=2, vision_heads=2, image_size=56, patch_size=14),
    # the dimensions of Qwen2-VL-2B-Instruct, for benchmarks without weights
    "qwen2-vl-2b": BackboneShape(text_hidden=1536, text_layers=28, text_heads=12, text_kv_heads=2,
                                 text_intermediate=8960, vision_embed=1280, vision_depth=32, vision_heads=16,
                                 vocab_size=151936, image_size=448),
}


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 2048, extra_special_tokens: Iterable[str] = ()):
    """A byte-level BPE tokenizer trained on ``corpus``, with Qwen's chat and vision tokens."""
    from transformers import PreTrainedTokenizerFast

    special = list(QWEN_SPECIAL_TOKENS) + [t for t in extra_special_tokens if t not in QWEN_SPECIAL_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  padding_side="left")


def build_processor(tokenizer, image_size: int, patch_size: int = 14):
    """A Qwen2-VL processor that resizes every image to ``image_size`` x ``image_size`` (a multiple
    of twice ``patch_size``)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    if image_size % (2 * patch_size):
        raise ValueError(f"image size {image_size} is not a multiple of 2 x patch size {patch_size}")
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=patch_size)
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


def build_model(shape: BackboneShape, tokenizer, seed: int = 0, *, device: str = "cpu", dtype=None):
    """A randomly initialised Qwen2-VL model of ``shape`` whose special ids match ``tokenizer``,
    created directly on ``device`` in ``dtype`` (default float32)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=shape.vocab_size or len(tokenizer), hidden_size=shape.text_hidden,
            intermediate_size=shape.text_intermediate, num_hidden_layers=shape.text_layers,
            num_attention_heads=shape.text_heads, num_key_value_heads=shape.text_kv_heads,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": shape.mrope_section},
            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None),
        vision_config=dict(depth=shape.vision_depth, embed_dim=shape.vision_embed, hidden_size=shape.text_hidden,
                           num_heads=shape.vision_heads, mlp_ratio=4, patch_size=shape.patch_size, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        with torch.device(device):
            model = Qwen2VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model


def build_random_backbone(shape: str | BackboneShape, corpus: Iterable[str], *, vocab_size: int = 2048, seed: int = 0,
                          extra_special_tokens: Iterable[str] = (), device: str = "cpu", dtype=None):
    """(model, processor): a random model of ``shape`` with a tokenizer trained on ``corpus``."""
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    tokenizer = train_tokenizer(corpus, vocab_size, extra_special_tokens)
    model = build_model(shape, tokenizer, seed, device=device, dtype=dtype)
    return model, build_processor(tokenizer, shape.image_size, shape.patch_size)


def grow_layers(model, layers: int):
    """Deepen a Qwen2-VL model's language model to ``layers`` layers in place (a multiple of its
    depth): each layer is followed by copies of itself whose output projections (attention ``o_proj``
    and MLP ``down_proj``) start at zero, so each copy adds nothing to the residual stream at first
    and the grown model computes exactly what the original did; training then uses the new depth.
    Returns the model."""
    import torch

    text = model.model.language_model
    old = list(text.layers)
    if layers % len(old) or layers < len(old):
        raise ValueError(f"grow to a multiple of the {len(old)} layers there are, not {layers}")
    grown = []
    for layer in old:
        grown.append(layer)
        for _ in range(layers // len(old) - 1):
            twin = copy.deepcopy(layer)
            with torch.no_grad():
                twin.self_attn.o_proj.weight.zero_()
                twin.mlp.down_proj.weight.zero_()
            grown.append(twin)
    for i, layer in enumerate(grown):
        layer.self_attn.layer_idx = i
    text.layers = torch.nn.ModuleList(grown)
    config = model.config.text_config
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = [t for t in config.layer_types for _ in range(layers // len(old))]
    return model


def limit_pixels(processor, max_pixels: int) -> None:
    """Make the processor resize every image to at most ``max_pixels`` pixels (aspect kept, as Qwen2-VL's
    ``smart_resize`` does): fewer image tokens, the memory a profile was sized for. Saved with the
    processor, so the evaluation and the service see images as training did."""
    image_processor = processor.image_processor
    size = dict(image_processor.size or {})
    size["longest_edge"] = max_pixels
    size["shortest_edge"] = min(size.get("shortest_edge") or max_pixels, max_pixels)
    image_processor.size = size
    for name, value in (("max_pixels", max_pixels), ("min_pixels", size["shortest_edge"])):
        if getattr(image_processor, name, None) is not None:   # releases that keep both spellings
            setattr(image_processor, name, value)


def save_backbone(model, processor, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


MICRO_MANIFEST = "micro_checkpoint.json"   # what build_micro_checkpoint made, beside the checkpoint's files
MIN_MICRO_VOCAB = 300   # the 256 bytes, Qwen's special tokens and some merges


def _strings(value) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def texts_from_files(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The texts of JSON files (a list or an object) or JSON Lines files: every string value, at any
    depth, that contains a space (captions, modification texts, chains; ids and file names have none),
    each once, in file order. Nothing here knows a benchmark's layout, so a benchmark's annotation files
    may be given together: those without such text (lists of image ids) add nothing. A file that is not
    JSON or JSON Lines, or files that hold no such text at all, are a ValueError naming them."""
    found: dict[str, None] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not UTF-8 text (expected a JSON or JSON Lines file)") from None
        try:
            documents = [json.loads(text)]
        except json.JSONDecodeError:
            try:
                documents = [json.loads(line) for line in text.split("\n") if line.strip()]
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: neither JSON nor JSON Lines ({e.msg})") from None
        found.update(dict.fromkeys(t for d in documents for t in _strings(d) if " " in t))
    if not found:
        raise ValueError(f"{', '.join(map(str, paths))}: no text in them (no string value with a space)")
    return list(found)


def build_micro_checkpoint(texts: Iterable[str], out: str | os.PathLike, vocab_size: int = 2000,
                           seed: int = 0) -> Path:
    """Write a micro Qwen2-VL checkpoint (shape ``micro``: random weights drawn from ``seed``, a
    byte-level BPE tokenizer of at most ``vocab_size`` tokens trained on ``texts``, a processor for
    56 px images) to the folder ``out`` and return it. It loads like any checkpoint
    (:func:`load_backbone`, :func:`checkpoint_version`) and is a base model for a CPU try of a real
    benchmark; the CIR tokens are not in it (the training adds them to any base). The same texts,
    vocabulary size and seed give the same checkpoint. ``out`` is written whole or not at all; an
    existing micro checkpoint there is replaced, anything else there is refused (ValueError).
    ``micro_checkpoint.json`` beside the weights says what was built (parameters, vocabulary)."""
    texts = list(dict.fromkeys(t for t in texts if t.strip()))
    if not texts:
        raise ValueError("no text to train the tokenizer on")
    if vocab_size < MIN_MICRO_VOCAB:
        raise ValueError(f"vocabulary size {vocab_size} is too small: at least {MIN_MICRO_VOCAB}")
    out = Path(out).expanduser().absolute()
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"{out} is a file: give a folder for the checkpoint")
        if out.resolve() == Path.cwd().resolve():
            raise ValueError(f"{out} is the current folder: give a folder of its own for the checkpoint")
        if any(out.iterdir()) and not (out / MICRO_MANIFEST).is_file():
            raise ValueError(f"{out} is a folder with files in it and not a micro checkpoint: give a new or empty "
                             f"folder")
    model, processor = build_random_backbone("micro", texts, vocab_size=vocab_size, seed=seed)
    manifest = {"shape": "micro", "parameters": sum(p.numel() for p in model.parameters()),
                "vocab_size": len(processor.tokenizer), "seed": seed, "texts": len(texts),
                "texts_md5": hashlib.md5("\x1e".join(texts).encode()).hexdigest()}
    built = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with writing(out, built):
        save_backbone(model, processor, built)
        atomic_write_json(built / MICRO_MANIFEST, manifest)
        replace_dir(built, out)
    return out


def checkpoint_version(path: str | os.PathLike) -> str:
    """A checkpoint folder's version: md5 over its config and its weights' bytes (never its path),
    so the same weights anywhere have the same version."""
    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no model checkpoint at {path} (config.json missing)")
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not weights:
        raise FileNotFoundError(f"no weights (*.safetensors) in the checkpoint at {path}")
    return file_md5(config, *weights)[:16]


def resolve_device(device: str | None = None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_backbone(path: str | os.PathLike, *, dtype: str = "auto", device: str | None = None,
                  attn_implementation: str | None = None):
    """(model, processor) from a local checkpoint folder. ``dtype`` 'auto' means bfloat16 on a GPU
    and float32 on the CPU; ``attn_implementation`` e.g. 'sdpa' or 'flash_attention_2'."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model checkpoint at {path} (config.json missing); give a local folder")
    device = resolve_device(device)
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    kwargs = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs).to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return model, processor
