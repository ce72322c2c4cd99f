"""Benchmark the generation path.

Two modes:

* ``--mode pipeline`` (default): one full ``AnimatePipeline.generate`` on a tiny random model folder
  (made on the fly): total seconds, DiT seconds per sampling step, the rest (VAE, encoders),
  peak memory.
* ``--mode dit-steps``: sampling steps of a DiT alone on conditioning of the real shapes
  (e.g. ``--preset 14b --layers 5 --height 480 --width 832 --clip-len 77``: a reduced-layer
  14B-width DiT at 480x832), seconds per step and peak memory. The default on CUDA.

    python bench/generate.py                                   # CPU, tiny pipeline
    python bench/generate.py --mode dit-steps --device cuda    # GPU, 5-layer 14B width, 480x832, bf16
    python bench/generate.py --out bench/results/generate-cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class TimedDiT(torch.nn.Module):
    """Times every forward of the wrapped DiT (synchronising on CUDA)."""

    def __init__(self, dit):
        super().__init__()
        self.inner = dit
        self.config = dit.config
        self.seconds: list[float] = []

    @property
    def patch_embedding(self):
        return self.inner.patch_embedding

    def forward(self, *args):
        dev = args[0].device
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        out = self.inner(*args)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        self.seconds.append(time.perf_counter() - t0)
        return out


def bench_pipeline(args, device, dtype) -> dict:
    from wan_animate.pipeline import AnimatePipeline
    from wan_animate.testing import make_tiny_model_folder

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_model_folder(Path(tmp) / "tiny", layout="diffusers", seed=0, config_preset=args.preset)
        pipe = AnimatePipeline.from_pretrained(folder, dtype=dtype, device=device)
    timed = TimedDiT(pipe.dit)
    pipe = AnimatePipeline(timed, pipe.vae, pipe.text_encoder, pipe.image_encoder, device=device)
    rng = np.random.default_rng(0)
    n = args.frames or args.clip_len
    inputs = dict(
        ref_image=rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8),
        pose_video=rng.integers(0, 256, (n, args.height, args.width, 3), dtype=np.uint8),
        face_video=rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8),
    )
    kw = dict(steps=args.steps, clip_len=args.clip_len, refert_num=args.refert_num, solver=args.solver,
              guide_scale=args.guide_scale, progress=False)
    pipe.generate(**inputs, **{**kw, "steps": 1})  # warm-up
    timed.seconds.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = pipe.generate(**inputs, **kw)
    total = time.perf_counter() - t0
    steps_run = len(timed.seconds) // (2 if args.guide_scale != 1 else 1)
    dit_total = sum(timed.seconds)
    return {
        "frames out": out.shape[0],
        "size": f"{args.width}x{args.height}",
        "segments x steps": steps_run,
        "total s": total,
        "DiT s/step": dit_total / max(steps_run, 1),
        "rest s (VAE, encoders, scheduler)": total - dit_total,
        "peak memory MiB": peak_memory_mib(device),
    }


def bench_dit_steps(args, device, dtype) -> dict:
    from wan_animate.config import WanAnimateConfig
    from wan_animate.conditioning import num_latent_frames
    from wan_animate.model import WanAnimateDiT, set_precision
    from wan_animate.sampling import sample

    overrides = {"num_layers": args.layers} if args.layers else {}
    cfg = WanAnimateConfig.preset(args.preset, **overrides)
    with torch.device(device):
        dit = WanAnimateDiT(cfg)
    set_precision(dit, dtype)
    dit.eval().requires_grad_(False)
    n_params = sum(p.numel() for p in dit.parameters())
    t_lat, h, w = num_latent_frames(args.clip_len), args.height // 8, args.width // 8
    g = torch.Generator("cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    context = rand(1, cfg.text_len, cfg.text_dim).to(dtype)
    clip_fea = rand(1, cfg.num_image_tokens, cfg.image_dim).to(dtype)
    y = rand(1, 20, t_lat + 1, h, w).to(dtype)
    pose = rand(1, 16, t_lat, h, w).to(dtype)
    s = cfg.motion_encoder_size
    face = (torch.rand(1, 3, args.clip_len, s, s, generator=g) * 2 - 1).to(device, dtype)
    timed = TimedDiT(dit)

    def denoise(x, t, uncond):
        return timed(x.to(dtype), t, context, clip_fea, y, pose, face)

    noise = rand(1, 16, t_lat + 1, h, w)
    with torch.no_grad():
        sample(denoise, noise, steps=1, shift=args.shift, solver=args.solver)  # warm-up
        timed.seconds.clear()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        sample(denoise, noise, steps=args.steps, shift=args.shift, solver=args.solver)
        total = time.perf_counter() - t0
    tokens = (t_lat + 1) * (h // 2) * (w // 2)
    return {
        "DiT": f"{args.preset} width (dim {cfg.dim}), {cfg.num_layers} layers, {n_params / 1e6:.1f}M params",
        "size": f"{args.width}x{args.height}, {args.clip_len} frames ({tokens} tokens)",
        "steps": args.steps,
        "s/step (DiT forward)": float(np.mean(timed.seconds)),
        "s/step (with scheduler)": total / args.steps,
        "peak memory MiB": peak_memory_mib(device),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["pipeline", "dit-steps"], default=None,
                   help="default: pipeline on CPU, dit-steps on CUDA")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--preset", default=None, help="DiT preset (pipeline: tiny; dit-steps: 14b on CUDA)")
    p.add_argument("--layers", type=int, default=None, help="dit-steps: number of DiT blocks (default 5 for 14b)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--clip-len", type=int, default=None)
    p.add_argument("--frames", type=int, default=None, help="pipeline: driving length (default clip_len)")
    p.add_argument("--refert-num", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--shift", type=float, default=5.0)
    p.add_argument("--solver", default="unipc")
    p.add_argument("--guide-scale", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="write a markdown table here")
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    big = device.type == "cuda"
    args.mode = args.mode or ("dit-steps" if big else "pipeline")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if big else torch.float32)
    if args.mode == "dit-steps":
        args.preset = args.preset or ("14b" if big else "tiny")
        args.layers = args.layers if args.layers is not None else (5 if args.preset == "14b" else None)
        args.height, args.width = args.height or (480 if big else 64), args.width or (832 if big else 64)
        args.clip_len = args.clip_len or (77 if big else 17)
        result = bench_dit_steps(args, device, dtype)
    else:
        args.preset = args.preset or "tiny"
        args.height, args.width = args.height or 64, args.width or 64
        args.clip_len = args.clip_len or 17
        result = bench_pipeline(args, device, dtype)

    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"
    cmd = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    lines = [f"# generate benchmark ({args.mode})", "", f"- device: {dev_name}", f"- dtype: {dtype}",
             f"- torch {torch.__version__}", f"- command: `{cmd}`", f"- solver {args.solver}, shift {args.shift}",
             "", "| metric | value |", "|---|---|"]
    for k, v in result.items():
        lines.append(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        mode = "a" if Path(args.out).exists() else "w"
        with open(args.out, mode) as f:
            f.write(("\n" if mode == "a" else "") + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
