"""Training-step benchmark: step time, samples/s, MFU and peak memory of one optimizer step.

It times exactly the trainer's pieces (``train.modes.setup_trainable`` for the trainable set,
``wan_animate.objective.flow_matching_loss``, AdamW, ``apply_activation_checkpointing``, ``set_precision``,
the MFU formula of ``train.metrics``) on random conditioned batches, so encoders and data loading
are excluded. Two cases:

* ``--case quickstart`` (CPU default): the quick start's tiny model at its clip size
  (9 frames, 32x32 -> latent 3+1 x 4 x 4), full and LoRA;
* ``--case 14b_width`` (CUDA): the 14B trunk width (dim 5120, 40 heads, ffn 13824, real adapter
  sizes) with fewer blocks (``--layers``, default 5 = one face block), 480x832x77 clips
  (latent 21 x 60 x 104, 32,760 tokens), bf16 with per-block activation checkpointing, LoRA
  (rank 128) and full.

    python bench/train_step.py                      # CPU quick-start table
    python bench/train_step.py --case 14b_width     # on a GPU
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from train.config import Config, LoraSettings, OptimConfig, TrainSettings  # noqa: E402
from wan_animate.objective import LossConfig, flow_matching_loss  # noqa: E402
from train.modes import make_optimizer, setup_trainable  # noqa: E402
from train.metrics import peak_flops, peak_memory_gib  # noqa: E402
from wan_animate.config import dit_forward_flops  # noqa: E402
from wan_animate.config import WanAnimateConfig  # noqa: E402
from wan_animate.model import WanAnimateDiT, apply_activation_checkpointing, set_precision  # noqa: E402


def make_batch(cfg: WanAnimateConfig, batch: int, frames: int, height: int, width: int, device, dtype):
    t_lat = (frames - 1) // 4 + 1
    h, w = height // 8, width // 8
    g = torch.Generator().manual_seed(0)
    s = cfg.motion_encoder_size

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    return {
        "latents": r(batch, cfg.out_dim, t_lat + 1, h, w),
        "context": r(batch, cfg.text_len, cfg.text_dim),
        "clip_fea": r(batch, cfg.num_image_tokens, cfg.image_dim),
        "y": r(batch, cfg.in_dim - cfg.out_dim, t_lat + 1, h, w),
        "pose_latents": r(batch, cfg.out_dim, t_lat, h, w),
        "face_pixel_values": (torch.rand(batch, 3, frames, s, s, generator=g) * 2 - 1).to(device, dtype),
    }


def bench_one(model_cfg: WanAnimateConfig, mode: str, *, device, precision: str, checkpointing: bool,
              frames: int, height: int, width: int, batch: int, steps: int, warmup: int, lora_rank: int) -> dict:
    torch.manual_seed(0)
    with torch.device(device):
        dit = WanAnimateDiT(model_cfg)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    cfg = Config(train=TrainSettings(mode=mode, checkpoint_every=0), optim=OptimConfig(lr=1e-5),
                 lora=LoraSettings(rank=lora_rank, alpha=lora_rank), loss=LossConfig())
    if mode == "lora" and dtype != torch.float32:
        set_precision(dit, dtype)  # frozen trunk in bf16; LoRA factors are created in fp32 below
    elif dtype != torch.float32:
        set_precision(dit, dtype)  # full: bf16 weights (DeepSpeed would keep fp32 masters)
    groups, summary = setup_trainable(dit, cfg)
    if mode == "lora":
        for g in groups:
            for p in g["params"]:
                p.data = p.data.float()
    if checkpointing:
        apply_activation_checkpointing(dit)
    dit.train()
    opt = make_optimizer(groups, cfg.optim)
    data = make_batch(model_cfg, batch, frames, height, width, device, dtype)
    gen = torch.Generator().manual_seed(0)
    cuda = device.type == "cuda"
    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
            if i == warmup:
                torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = flow_matching_loss(dit, data, cfg.loss, generator=gen)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    flops = 3.0 * dit_forward_flops(model_cfg, tuple(data["latents"].shape[2:])) * batch
    peak, basis = peak_flops(device, precision)
    return {
        "mode": mode, "params": summary["total_params"], "trainable": summary["trainable_params"],
        "step_s": step, "samples_s": batch / step, "mfu": flops / step / peak, "peak_gib": peak_memory_gib(device),
        "tflops_s": flops / step / 1e12, "mfu_basis": basis,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=["quickstart", "14b_width"], default="quickstart")
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--layers", type=int, default=5, help="blocks of the 14B-width case")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the markdown table here")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if args.case == "quickstart":
        model_cfg = WanAnimateConfig.preset("tiny")
        shape = dict(frames=9, height=32, width=32)
        precision, ckpt, rank = ("bf16" if cuda else "fp32"), False, 16
    else:
        if not cuda:
            print("14b_width needs a CUDA device (it allocates ~40 GB); use --case quickstart on CPU.")
            return 2
        model_cfg = WanAnimateConfig.preset("14b", num_layers=args.layers, face_adapter_period=args.layers)
        shape = dict(frames=77, height=480, width=832)
        precision, ckpt, rank = "bf16", True, 128
    rows = []
    for mode in args.modes.split(","):
        rows.append(bench_one(model_cfg, mode, device=device, precision=precision, checkpointing=ckpt,
                              batch=args.batch, steps=args.steps, warmup=args.warmup, lora_rank=rank, **shape))
        if cuda:
            torch.cuda.empty_cache()
    dev = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
                                                        f"{torch.get_num_threads()} threads)"
    cmd = "python bench/train_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"# Training step benchmark: {args.case}",
        "",
        f"- device: {dev}; torch {torch.__version__}; precision {precision}; activation checkpointing {ckpt}",
        f"- model: dim {model_cfg.dim}, {model_cfg.num_layers} blocks, clip {shape['frames']}x{shape['height']}x"
        f"{shape['width']}, batch {args.batch}; median of {args.steps} steps after {args.warmup} warm-up",
        f"- MFU = 3 x forward FLOPs (facts section 4 formula) / step time / peak ({rows[0]['mfu_basis']})",
        f"- command: `{cmd.strip()}`",
        "",
        "| mode | params | trainable | step (s) | samples/s | TFLOP/s | MFU | peak mem (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['params']:,} | {r['trainable']:,} | {r['step_s']:.4f} | {r['samples_s']:.2f} | "
                     f"{r['tflops_s']:.4f} | {r['mfu']:.2%} | {r['peak_gib']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
