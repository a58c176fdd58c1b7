"""Training throughput of one CoT step on a Qwen2-VL-2B-shaped model (random weights, no download).

    PYTHONPATH=. python bench/gpu_train.py                       # on a GPU: naive vs ours
    PYTHONPATH=. python bench/gpu_train.py --shape tiny --image-size 112 --steps 2   # CPU smoke check
    PYTHONPATH=. python bench/gpu_train.py --lora-r 64 --cot-words 200 --modes ours+compile      # the gpu profile's CoT
    PYTHONPATH=. python bench/gpu_train.py --stage align --batch 64 --lora-r 64 --modes ours+ckpt   # ... its align

A step: 16 queries (448x448 reference, modification, a teacher-forced chain of thought of about
160 tokens, then <emb>) and their 16 target images through the gallery prompt; LoRA r=16 on the
language model; joint loss (CE on the CoT tokens + symmetric InfoNCE); backward; AdamW step.

- ``naive``: the usual transformers call, ``model(**inputs, labels=...)`` with
  ``output_hidden_states=True``: logits over the whole vocabulary at every position of both the
  queries and the gallery images, and every layer's hidden states kept.
- ``ours``: ``model_code.train.TrainStep`` as the pipeline runs it: the language model's last hidden
  state only, the LM head on the CoT positions only, none for gallery images.
- ``ours+ckpt``: the same with gradient checkpointing.
- ``ours+bf16``: LoRA adapters kept in bf16 (no fp32 casts around each adapted layer).
- ``ours+compile``: each language-model decoder layer compiled with ``torch.compile`` (fused kernels).

Prints pairs/s (queries per second) and peak GPU memory per mode, each after warm-up steps.
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench._common import print_table, random_image  # noqa: E402
from model_code.backbone import (
    SHAPES,
    BackboneShape,
    build_model,
    build_processor,
    resolve_device,
    train_tokenizer,
)  # noqa: E402
from model_code.model.cir_cot import PROMPTS, CirCoTModel, apply_lora, compile_decoder_layers  # noqa: E402
from model_code.model.loss import info_nce
from model_code.model.train import TrainConfig, TrainExample, TrainStep

WORDS = ("a small red circle in the top left corner and a large blue square in the centre ; the text asks to "
         "make the circle green and move the square to the right , so the circle becomes green while the star "
         "stays where it is").split()


def cot_text(rng: random.Random, n_words: int) -> str:
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    a, b = n_words // 4, n_words // 2
    return (f"<caption>{words(a)}</caption>\n<reasoning>{words(b)}</reasoning>\n"
            f"<conclusion>{words(n_words - a - b)}</conclusion>")


def image(rng: random.Random, size: int, path: Path) -> Path:
    random_image(rng, size).save(path)
    return path


def naive_losses(m: CirCoTModel, batch, cfg: TrainConfig) -> torch.Tensor:
    """The straightforward transformers way: full logits everywhere, all hidden states returned."""
    q = m.query_inputs([e.reference for e in batch], [e.text for e in batch], [e.cot for e in batch], train_answer=True)
    q = {k: v.to(m.device) for k, v in q.items()}
    out = m.model(**q, output_hidden_states=True)                     # logits [B, T, 151936]
    queries = m.emb(q, out.hidden_states[-1])
    g = {k: v.to(m.device) for k, v in m.gallery_inputs([e.target for e in batch]).items()}
    g_out = m.model(**g, output_hidden_states=True)                   # logits for gallery images too
    gallery = m.emb(g, g_out.hidden_states[-1])
    l_info, _ = info_nce(queries, gallery, len(batch), cfg.temperature)
    return out.loss + l_info + 0.0 * g_out.logits.float().mean()  # the gallery logits are computed either way


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen2-vl-2b", choices=sorted(SHAPES))
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--cot-words", type=int, default=142, help="about 160 tokens with the bench tokenizer")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode (after 2 warm-up steps)")
    p.add_argument("--modes", nargs="+", default=["naive", "ours", "ours+ckpt", "ours+bf16"])
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--stage", choices=["cot", "align"], default="cot",
                   help="the stage's step: cot (the chain teacher-forced, joint loss) or align (no chain, InfoNCE)")
    p.add_argument(
        "--profile", action="store_true", help="print the top operators of one step per mode (torch.profiler)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    device = resolve_device()
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    rng = random.Random(0)
    tmp = Path("/tmp/circot-gpu-train")
    tmp.mkdir(exist_ok=True)
    examples = [TrainExample(f"q{i}", image(rng, args.image_size, tmp / f"r{i}.png"), "make the circle green",
                             image(rng, args.image_size, tmp / f"t{i}.png"),
                             cot_text(rng, args.cot_words) if args.stage == "cot" else None)
                for i in range(args.batch)]
    if args.stage == "align" and "naive" in args.modes:
        raise SystemExit("--stage align: the naive mode is the CoT step's baseline; choose from ours, ours+ckpt, "
                         "ours+bf16, ours+compile")
    tokenizer = train_tokenizer([" ".join(WORDS)] * 200 + list(PROMPTS.values()) * 20, vocab_size=2048)
    base = SHAPES[args.shape]
    shape = BackboneShape(**{**base.__dict__, "image_size": args.image_size})
    cfg = TrainConfig(stage=args.stage, steps=1, batch_size=args.batch, mixed_precision="bf16" if cuda else "no")
    info = {"shape": args.shape, "stage": args.stage, "lora_r": args.lora_r, "batch": args.batch,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    import transformers

    info["transformers"] = transformers.__version__
    print("#", json.dumps(info), flush=True)
    results = []
    for mode in args.modes:
        torch.manual_seed(0)
        model = build_model(shape, tokenizer, device=device, dtype=dtype)
        processor = build_processor(tokenizer, args.image_size)
        model.train()
        model = apply_lora(model, processor, r=args.lora_r, alpha=2 * args.lora_r, fp32_adapters="bf16" not in mode)
        m = CirCoTModel(model, processor)
        if "compile" in mode:
            compile_decoder_layers(model)
        if mode.endswith("+ckpt"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        q_len = m.query_inputs([examples[0].reference], [examples[0].text], [examples[0].cot], train_answer=True)
        cot_tokens = int((q_len["labels"] != -100).sum()) if "labels" in q_len else 0
        step_module = TrainStep(m, cfg)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

        def one_step(m=m, mode=mode, step_module=step_module, opt=opt):   # bound to this iteration's
            with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
                loss = naive_losses(m, examples, cfg) if mode == "naive" else step_module(examples, [])["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)

        try:
            for _ in range(2):
                one_step()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                one_step()
            if cuda:
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / args.steps
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                with profile(activities=activities) as prof:
                    one_step()
                    if cuda:
                        torch.cuda.synchronize()
                sort = "cuda_time_total" if cuda else "cpu_time_total"
                print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=60), flush=True)
            row = {"mode": mode, "pairs_per_s": round(args.batch / seconds, 1), "s_per_step": round(seconds, 3),
                   "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
                   "query_tokens": int(q_len["input_ids"].shape[1]), "cot_tokens": cot_tokens}
        except torch.OutOfMemoryError:
            row = {"mode": mode, "error": "out of memory"}
        results.append(row)
        print(json.dumps(row), flush=True)
        model = m = step_module = opt = None  # free the GPU memory before the next mode
        if cuda:
            torch.cuda.empty_cache()
    print_table(results, [("mode", "mode"), ("pairs/s", "pairs_per_s"), ("peak GiB", "peak_gib")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
