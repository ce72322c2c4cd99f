"""Measured error of the lossy memory options (docs/memory.md), on CPU.

    python bench/memory_options_error.py [--tokens 512] [--skip-full]

1. ``model.base_dtype=fp8`` vs bf16 base weights: the tiny DiT (output, LoRA gradients) and ONE
   full-width DiT block (dim 5120, ffn 13824, 40 heads; random normal weights, std 0.02, since no
   real weights are available here), each against an fp32 reference too.
2. ``model.checkpoint_dtype=bf16`` vs fp32 checkpointed block inputs: loss and gradient difference
   on the tiny LoRA model (one step).
Prints one JSON object (strict JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from wan_animate.config import WanAnimateConfig
from wan_animate.memory import apply_memory_options, quantize_frozen_linears
from wan_animate.model import set_precision
from wan_animate.model.blocks import DiTBlock
from wan_animate.model.rope import RopeCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_memory_options import lora_model, make_batch, options, train_steps  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def dit_call(dit, batch):
    keys = ("context", "clip_fea", "y", "pose_latents", "face_pixel_values")
    return dit(batch["latents"], torch.full((1,), 500.0), *[batch[k] for k in keys])


def tiny_fp8() -> dict:
    ref32 = lora_model(dtype=torch.float32, train_adapters=False)
    ref = copy.deepcopy(ref32)
    set_precision(ref, torch.bfloat16)
    q = copy.deepcopy(ref)
    apply_memory_options(q, options(base_dtype="fp8"), device="cpu")
    apply_memory_options(ref, options(), device="cpu")
    apply_memory_options(ref32, options(), device="cpu")
    batch = make_batch(ref.config, dtype=torch.bfloat16)
    with torch.no_grad():
        o32, o16, o8 = dit_call(ref32, {k: v.float() for k, v in batch.items()}), dit_call(ref, batch), dit_call(q, batch)
    (_, g16), (_, g8) = train_steps(ref, steps=1, autocast=True), train_steps(q, steps=1, autocast=True)
    grad = [rel(g8[n], g16[n]) for n in g16]
    return {"output_fp8_vs_bf16": rel(o8, o16), "output_bf16_vs_fp32": rel(o16, o32),
            "output_fp8_vs_fp32": rel(o8, o32), "lora_grad_fp8_vs_bf16_median": sorted(grad)[len(grad) // 2],
            "lora_grad_fp8_vs_bf16_max": max(grad)}


def full_block_fp8(tokens: int) -> dict:
    cfg = WanAnimateConfig()  # 14B widths
    torch.manual_seed(0)
    block = DiTBlock(cfg)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.02)
    block.requires_grad_(False)
    grid = (1, 16, tokens // 16)
    x = torch.randn(1, tokens, cfg.dim)
    time_mod = torch.randn(1, 6, cfg.dim) * 0.1
    text, image = torch.randn(1, 512, cfg.dim), torch.randn(1, 257, cfg.dim)
    cos, sin = RopeCache(cfg.rope_split, cfg.rope_theta)(grid, x.device)
    out = {}
    t0 = time.time()
    with torch.no_grad():
        u32 = block(x, time_mod, text, image, cos, sin) - x
        set_precision(block, torch.bfloat16)
        bf = (text.bfloat16(), image.bfloat16())
        u16 = block(x, time_mod, *bf, cos, sin) - x
        w = block.ffn[0].weight.detach().clone()
        quantize_frozen_linears(torch.nn.ModuleDict({"blocks": torch.nn.ModuleList([block])}))
        out["weight_fp8_vs_bf16_ffn0"] = rel(block.ffn[0].weight, w)
        u8 = block(x, time_mod, *bf, cos, sin) - x
    out.update({"tokens": tokens, "block_update_fp8_vs_bf16": rel(u8, u16), "block_update_bf16_vs_fp32": rel(u16, u32),
                "block_update_fp8_vs_fp32": rel(u8, u32), "seconds": round(time.time() - t0, 1)})
    return out


def checkpoint_bf16() -> dict:
    plain = lora_model()
    half = copy.deepcopy(plain)
    apply_memory_options(plain, options(), device="cpu")
    apply_memory_options(half, options(checkpoint_dtype="bf16"), device="cpu")
    (la, ga), (lb, gb) = train_steps(plain, steps=1), train_steps(half, steps=1)
    grad = sorted(rel(gb[n], ga[n]) for n in ga if ga[n].norm() > 0)
    return {"loss_abs_diff": abs(float(la[0] - lb[0])), "grad_rel_median": grad[len(grad) // 2], "grad_rel_max": grad[-1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--skip-full", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = {"tiny_fp8": tiny_fp8(), "checkpoint_dtype_bf16": checkpoint_bf16()}
    if not args.skip_full:
        result["full_width_block_fp8"] = full_block_fp8(args.tokens)
    print(json.dumps(result, indent=1, allow_nan=False))


if __name__ == "__main__":
    main()
