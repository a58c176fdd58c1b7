"""Qwen2-VL-family backbones: load a real checkpoint from a local folder, or build one locally.

Nothing here downloads anything. ``build_random_backbone`` makes a randomly initialised model of a
named shape (``tiny`` for the CPU machines, ``qwen2-vl-2b`` with the 2B checkpoint's dimensions for
GPU benchmarks) with a byte-level BPE tokenizer trained on a given corpus by the ``tokenizers``
library and a Qwen2-VL processor assembled in-process; ``save_backbone`` writes it in the standard
layout, so ``load_backbone`` (``AutoModelForImageTextToText`` + ``AutoProcessor``) reads it exactly
like a downloaded checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model_code.common import file_md5

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
