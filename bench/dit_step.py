"""Training-step speed of our WanAnimateDiT vs diffusers' WanAnimateTransformer3DModel.

Both models get the same config, the same weights (ours loads the peer's through the checkpoint
key map) and the same inputs; one step is forward + backward of an MSE loss against a random
velocity target. The two are timed alternately in one run (warmup, then N iterations each, median),
so the ratio is measured under the same conditions. Achieved TFLOP/s uses the analytic model FLOPs
(facts section 4: per block linear (12 d^2 + 4 d f) L, self-attention 4 L^2 d, cross-attention
4 L d 769, plus context projections, face blocks, embeddings and head); a training step counts
3x the forward. MFU = achieved / peak (peak from --peak-tflops or the GPU table; n/a on CPU).

    python bench/dit_step.py --preset tiny --device cpu              # CPU, seconds
    python bench/dit_step.py                                         # CUDA default: 480x832x77, dim 5120, 3 blocks, bf16
    python bench/dit_step.py --compile --out bench/results/dit_step-h100.md
"""

from __future__ import annotations

import argparse
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan_animate.weights.keymap import diffusers_to_official  # noqa: E402
from wan_animate.config import WanAnimateConfig  # noqa: E402
from wan_animate.model import (  # noqa: E402
    WanAnimateDiT,
    apply_activation_checkpointing,
    compile_blocks,
    set_precision,
)

# Dense bf16 tensor-core peak (TFLOP/s) by GPU name fragment.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}

# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------


def forward_flops(cfg: WanAnimateConfig, batch: int, grid: tuple[int, int, int], face_frames: int,
                  text_len: int = 512, image_len: int = 257) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of one forward, by part."""
    d, f = cfg.dim, cfg.ffn_dim
    L = math.prod(grid)
    ctx = text_len + image_len
    n_face_tokens = grid[0] * (cfg.face_encoder_num_heads + 1)
    per_block_linear = (12 * d * d + 4 * d * f) * L
    per_block_self_attn = 4 * L * L * d
    per_block_cross_attn = 4 * L * d * ctx + 2 * d * d * (2 * text_len + 2 * image_len)  # attn + k/v projections
    face_block = 4 * d * d * L + 4 * d * d * n_face_tokens + 4 * L * d * (cfg.face_encoder_num_heads + 1)
    embed = 2 * L * d * (cfg.in_dim + cfg.latent_channels) * math.prod(cfg.patch_size)
    embed += 2 * text_len * d * (cfg.text_dim + d) + 2 * image_len * (cfg.image_dim ** 2 + cfg.image_dim * d)
    head = 2 * L * d * cfg.out_dim * math.prod(cfg.patch_size)
    parts = {
        "blocks_linear": cfg.num_layers * per_block_linear,
        "self_attention": cfg.num_layers * per_block_self_attn,
        "cross_attention": cfg.num_layers * per_block_cross_attn,
        "face_adapter": cfg.num_face_blocks * face_block,
        "embed_head": embed + head,
    }
    return {k: v * batch for k, v in parts.items()}


# ------------------------------------------------------------------------------------------------
# Models and inputs
# ------------------------------------------------------------------------------------------------


def build_config(args) -> WanAnimateConfig:
    overrides = {}
    if args.layers is not None:
        overrides["num_layers"] = args.layers
    if args.dim is not None:  # keep the preset's head_dim (14b: 128) and ffn/dim ratio
        base = WanAnimateConfig.preset(args.preset)
        heads = max(1, args.dim // base.head_dim)
        overrides.update(dim=args.dim, num_heads=heads, ffn_dim=round(base.ffn_dim * args.dim / base.dim))
    period = WanAnimateConfig.preset(args.preset).face_adapter_period
    layers = overrides.get("num_layers", WanAnimateConfig.preset(args.preset).num_layers)
    if layers < period:  # keep one face block in a shortened model
        overrides["face_adapter_period"] = layers
    cfg = WanAnimateConfig.preset(args.preset, **overrides)
    if cfg.num_layers % cfg.face_adapter_period:
        raise SystemExit(f"--layers {cfg.num_layers} must be a multiple of face_adapter_period={cfg.face_adapter_period}.")
    return cfg


def build_models(cfg: WanAnimateConfig, dtype: torch.dtype, device: torch.device, checkpointing: bool):
    from diffusers import WanAnimateTransformer3DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the fp32-module cast below is deliberate

    kwargs = cfg.to_diffusers_config()
    kwargs.pop("_class_name")
    with torch.device(device):
        peer = WanAnimateTransformer3DModel(**kwargs)
        ours = WanAnimateDiT(cfg)
    ours.load_state_dict(diffusers_to_official(peer.state_dict(), cfg), strict=True)
    # What each library gives a user asking for `dtype`: ours keeps its fp32 tables; diffusers'
    # from_pretrained(torch_dtype=...) keeps its `_keep_in_fp32_modules` in fp32.
    set_precision(ours, dtype)
    peer.to(dtype)
    if dtype != torch.float32:
        keep = set(peer._keep_in_fp32_modules)
        for name, tensor in [*peer.named_parameters(), *peer.named_buffers()]:
            if keep & set(name.split(".")):
                tensor.data = tensor.data.float()
    if checkpointing:
        apply_activation_checkpointing(ours)
        peer.enable_gradient_checkpointing()
    return ours.train(), peer.train()


def make_inputs(cfg, args, device, dtype):
    t_lat = (args.frames - 1) // 4 + 1  # target latent frames
    h, w = args.height // 8, args.width // 8
    s = cfg.motion_encoder_size
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    inputs = dict(
        x=rand(args.batch, cfg.out_dim, t_lat + 1, h, w),
        t=(torch.rand(args.batch, generator=g) * 1000).to(device),
        context=rand(args.batch, 512, cfg.text_dim),
        clip_fea=rand(args.batch, 257, cfg.image_dim),
        y=rand(args.batch, cfg.in_dim - cfg.out_dim, t_lat + 1, h, w),
        pose_latents=rand(args.batch, cfg.latent_channels, t_lat, h, w),
        face_pixel_values=(torch.rand(args.batch, 3, args.frames, s, s, generator=g) * 2 - 1).to(device),
    )
    target = rand(args.batch, cfg.out_dim, t_lat + 1, h, w)
    grid = (t_lat + 1, h // cfg.patch_size[1], w // cfg.patch_size[2])
    return inputs, target, grid


def ours_step(model, inputs, target, dtype):
    out = model(**inputs)
    loss = torch.nn.functional.mse_loss(out, target)
    loss.backward()
    return loss


def peer_step(model, inputs, target, dtype):
    out = model(
        hidden_states=torch.cat([inputs["x"], inputs["y"]], dim=1).to(dtype),
        timestep=inputs["t"],
        encoder_hidden_states=inputs["context"].to(dtype),
        encoder_hidden_states_image=inputs["clip_fea"].to(dtype),
        pose_hidden_states=inputs["pose_latents"].to(dtype),
        face_pixel_values=inputs["face_pixel_values"].to(dtype),
        return_dict=False,
    )[0]
    loss = torch.nn.functional.mse_loss(out.float(), target)
    loss.backward()
    return loss


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fns: dict, warmup: int, iters: int, device: torch.device):
    """Wall-clock and process CPU seconds per step for each contender.

    The contenders alternate every iteration so drift (clocks, other load) hits both alike. The CPU
    time (``time.process_time``) is reported as well because on a shared CPU machine it is far
    less disturbed by other processes than the wall clock.
    """
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + iters):
        for name, fn in fns.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            if i >= warmup:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return wall, cpu


def saved_activation_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd keeps for backward during one step."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def peak_cuda_bytes(fn, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="config preset (default: 14b on CUDA, tiny on CPU)")
    p.add_argument("--layers", type=int, default=None,
                   help="number of DiT blocks (CUDA default 3, which fits both models on an 80 GB GPU; "
                        "fewer than face_adapter_period keeps one face block)")
    p.add_argument("--dim", type=int, default=None,
                   help="model width; heads = dim // preset head_dim, ffn scaled with it")
    p.add_argument("--frames", type=int, default=None, help="pixel frames, 4n+1 (CUDA default 77)")
    p.add_argument("--height", type=int, default=None, help="pixel height (CUDA default 480)")
    p.add_argument("--width", type=int, default=None, help="pixel width (CUDA default 832)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None)
    p.add_argument("--compile", action="store_true",
                   help="regional torch.compile of both models' repeated blocks (ours: compile_blocks, "
                        "diffusers: compile_repeated_blocks)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in both models")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s of the device for MFU")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    defaults = (
        dict(preset="14b", layers=3, frames=77, height=480, width=832, batch=1, dtype="bf16", warmup=3, iters=10)
        if gpu else
        dict(preset="tiny", layers=None, frames=17, height=128, width=128, batch=2, dtype="fp32", warmup=3, iters=15)
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)

    cfg = build_config(args)
    ours, peer = build_models(cfg, dtype, device, args.checkpointing)
    inputs, target, grid = make_inputs(cfg, args, device, dtype)
    if args.compile:  # regional compilation of the repeated blocks, the same for both
        compile_blocks(ours)
        peer.compile_repeated_blocks()
        for face_block in peer.face_adapter:
            face_block.compile()

    fns = {
        "ours": lambda: (ours_step(ours, inputs, target, dtype), ours.zero_grad(set_to_none=True)),
        "diffusers": lambda: (peer_step(peer, inputs, target, dtype), peer.zero_grad(set_to_none=True)),
    }
    try:
        # (saved-tensor hooks do not see inside compiled regions: measured in eager runs only)
        saved = {k: None if args.compile else saved_activation_bytes(fn) for k, fn in fns.items()}
        peak = {k: peak_cuda_bytes(fn, device) for k, fn in fns.items()}
        times, cpu_times = time_steps(fns, args.warmup, args.iters, device)
    except torch.cuda.OutOfMemoryError as err:
        raise SystemExit(
            f"out of GPU memory ({err}); both models are resident: use fewer --layers, a smaller "
            "--frames/--height/--width, or --checkpointing."
        ) from err
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_times.items()}
    spread = {k: (min(v), max(v)) for k, v in times.items()}

    flops = forward_flops(cfg, args.batch, grid, args.frames)
    step_flops = 3 * sum(flops.values())
    peak_tflops = args.peak_tflops
    if peak_tflops is None and gpu and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)

    def tflops(sec: float) -> float:
        return step_flops / sec / 1e12

    def mfu(sec: float) -> str:
        return f"{100 * tflops(sec) / peak_tflops:.1f}%" if peak_tflops else "n/a"

    def gib(n: int | None) -> str:
        return "n/a" if n is None else f"{n / 2**30:.3f}"

    cmd = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    tokens = math.prod(grid)
    lines = [
        "# DiT training step: ours vs diffusers",
        "",
        f"- device: {device_name(device)}, torch {torch.__version__}",
        f"- command: `{cmd}`",
        f"- config: preset {args.preset}, dim {cfg.dim}, heads {cfg.num_heads}, ffn {cfg.ffn_dim}, "
        f"layers {cfg.num_layers}, face blocks {cfg.num_face_blocks}; dtype {args.dtype}; compile {args.compile}; "
        f"activation checkpointing {args.checkpointing}",
        f"- input: batch {args.batch}, {args.frames} frames {args.height}x{args.width} -> latent grid "
        f"{grid[0]}x{grid[1]}x{grid[2]} = {tokens} tokens/sample; {args.warmup} warmup + {args.iters} timed steps each, alternating",
        f"- model FLOPs per step (3x forward): {step_flops / 1e12:.4g} TFLOP "
        f"(forward: " + ", ".join(f"{k} {v / 1e12:.3g}" for k, v in flops.items()) + " TFLOP)",
        f"- peak for MFU: {f'{peak_tflops:g} TFLOP/s' if peak_tflops else 'n/a (no --peak-tflops given)'}",
        "",
        "| model | median step (ms) | min-max (ms) | median process CPU time (ms) | TFLOP/s | MFU "
        "| saved for backward (GiB) | peak CUDA memory over weights (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in ("ours", "diffusers"):
        lo, hi = spread[k]
        lines.append(f"| {k} | {1e3 * med[k]:.2f} | {1e3 * lo:.2f}-{1e3 * hi:.2f} | {1e3 * cpu_med[k]:.2f} | "
                     f"{tflops(med[k]):.4g} | {mfu(med[k])} | {gib(saved[k])} | {gib(peak[k])} |")
    lines += [
        "",
        f"**speed-up ours vs diffusers: {med['diffusers'] / med['ours']:.2f}x** (ratio of median wall-clock "
        f"steps, same run); by process CPU time {cpu_med['diffusers'] / cpu_med['ours']:.2f}x",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
