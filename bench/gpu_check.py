"""What a one-GPU machine should confirm first, in one command (``bash bench/gpu_check.sh``).

One line per check, ``PASS|FAIL|SKIP <name> <figure> (<reason>)``, and a JSON summary
(``--json``; default ``$OUT/gpu_check.json`` when ``OUT`` is set, else
``bench/results/gpu_check-<cuda|cpu>.json``). Exit status 1 when a check FAILs. docs/gpu.md says
how to run it on a machine without internet.

On CUDA the DiT checks use the real width (dim 5120, 40 heads, ffn 13824), 3 blocks (one face
block) and the real token count of a 480x832x77 clip (21 x 30 x 52 = 32,760 tokens), inside an
SDPA context that forbids the math kernel (a fallback to it raises instead of silently using
O(L^2) memory). On the CPU the same code runs on 2 tiny blocks at 12 tokens; checks that need
CUDA SKIP with the reason, and the slow subprocess checks (gpu-marked pytest, the DeepSpeed
trainer runs) SKIP unless ``--cpu-all``.

Budgets are estimates for one H100 (no GPU has run this yet); a check running past twice its
budget FAILs. Figures from a run are measured; the planner's are computed on fake tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import dit_step  # noqa: E402

TOKENS_480x832x77 = 21 * 30 * 52  # (77 - 1) / 4 + 1 target latent frames + reference, 60x104 latents / patch 2x2
MEMORY_TOLERANCE = 0.10  # planner vs measured, relative to measured
MIN_SPEEDUP = 0.90  # ours vs diffusers (median step time ratio): FAIL below
MAX_SWAP_SLOWDOWN = 1.20  # step time with block swap / without: FAIL above (copies not hidden)


# ------------------------------------------------------------------------------------------------
# Checks: registry, results
# ------------------------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    status: str  # PASS | FAIL | SKIP
    figure: str
    reason: str = ""
    seconds: float = 0.0
    budget_s: int = 0
    data: dict = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.status} {self.name} {self.figure}" + (f" ({self.reason})" if self.reason else "")


class Skip(Exception):
    def __init__(self, reason: str, figure: str = "-", **data):
        super().__init__(reason)
        self.figure, self.data = figure, data


class Fail(Exception):
    def __init__(self, reason: str, figure: str = "-", **data):
        super().__init__(reason)
        self.figure, self.data = figure, data


CHECKS: list[tuple[str, int, object]] = []  # (name, budget in seconds on one H100 (estimate), function)


def check(name: str, budget_s: int):
    def register(fn):
        CHECKS.append((name, budget_s, fn))
        return fn
    return register


@dataclass
class Context:
    device: torch.device
    cpu_all: bool
    work: Path
    keep: dict = field(default_factory=dict)  # objects one check leaves for the next (the timed models)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    def dit_args(self) -> SimpleNamespace:
        """dit_step's arguments: full width / real tokens on CUDA, the tiny preset on the CPU."""
        if self.gpu:
            return SimpleNamespace(preset="14b", layers=3, dim=None, frames=77, height=480, width=832, batch=1)
        return SimpleNamespace(preset="tiny", layers=2, dim=None, frames=5, height=32, width=32, batch=1)

    def slow_skip(self, what: str) -> None:
        if not self.gpu and not self.cpu_all:
            raise Skip(f"no CUDA device; {what} on the CPU only with --cpu-all")


def no_math_sdpa():
    """SDPA may pick flash, memory-efficient or cuDNN kernels, never the math fallback."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])


def sync(ctx: Context) -> None:
    if ctx.gpu:
        torch.cuda.synchronize()


def release(ctx: Context) -> None:
    ctx.keep.clear()
    gc.collect()
    if ctx.gpu:
        torch.cuda.empty_cache()


def gib(n: float) -> float:
    return n / 2**30


def rel(a: float, b: float) -> float:
    return (a - b) / b if b else math.inf


# ------------------------------------------------------------------------------------------------
# The checks (in run order)
# ------------------------------------------------------------------------------------------------

NEEDED = ["diffusers", "deepspeed", "hydra", "omegaconf", "webdataset", "peft", "accelerate", "torchao", "av", "ftfy",
          "transformers", "safetensors", "einops", "cv2"]


@check("deps", 10)
def deps(ctx: Context) -> tuple[str, str, dict]:
    import importlib

    missing, versions = [], {}
    for name in NEEDED:
        try:
            module = importlib.import_module(name)
        except Exception as e:  # a broken wheel as well as a missing one
            missing.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
            continue
        versions[name] = str(getattr(module, "__version__", "present"))
    flash = f"flash-attn {getattr(importlib.import_module('flash_attn'), '__version__', '?')}" \
        if _flash_available() else "no flash-attn"
    cuda = f"cuda {torch.version.cuda}, {torch.cuda.get_device_name()}" if ctx.gpu else "cpu"
    figure = f"torch {torch.__version__} ({cuda}); {flash}"
    if missing:
        raise Fail("not importable: " + ", ".join(missing) + "; build the wheels with scripts/gpu_wheelhouse.sh "
                   "and carry .whl (docs/gpu.md)", figure, versions=versions)
    key = ", ".join(f"{k} {versions[k]}" for k in ("diffusers", "deepspeed", "accelerate", "peft", "transformers")
                    if k in versions)
    return figure, f"{len(versions)} packages import: {key}", {"versions": versions}


@check("gpu_tests", 45)
def gpu_tests(ctx: Context):
    """The gpu-marked tests, deterministic kernels (tests/conftest.py sets them for that marker)."""
    ctx.slow_skip("the gpu-marked tests skip themselves")
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "pytest.mark.gpu" in p.read_text())
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8", PYTHONPATH=_pythonpath())
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *files],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    tail = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error")}
    for n, word in re.findall(r"(\d+) (passed|failed|skipped|error)", tail):
        counts[word] = int(n)
    figure = f"{counts['passed']} passed, {counts['failed'] + counts['error']} failed, {counts['skipped']} skipped"
    if p.returncode not in (0, 5) or counts["failed"] or counts["error"]:
        raise Fail(f"pytest exit {p.returncode}: {_tail(p.stdout + p.stderr)}", figure, **counts)
    if not counts["passed"]:
        raise Skip(f"nothing ran in {', '.join(files)}: {tail}", figure, **counts)
    return figure, f"{', '.join(files)}, deterministic algorithms", counts


@check("blocks_speed", 60)
def blocks_speed(ctx: Context):
    """Ours vs diffusers' WanAnimateTransformer3DModel, same blocks and inputs, fwd + bwd, no math SDPA."""
    args = ctx.dit_args()
    cfg = dit_step.build_config(args)
    dtype = torch.bfloat16 if ctx.gpu else torch.float32
    ours, peer = dit_step.build_models(cfg, dtype, ctx.device, checkpointing=False)
    inputs, target, grid = dit_step.make_inputs(cfg, args, ctx.device, dtype)
    tokens = math.prod(grid)
    if ctx.gpu and tokens != TOKENS_480x832x77:
        raise Fail(f"{tokens} tokens, expected {TOKENS_480x832x77} for 480x832x77")
    fns = {
        "ours": lambda: (dit_step.ours_step(ours, inputs, target, dtype), ours.zero_grad(set_to_none=True)),
        "diffusers": lambda: (dit_step.peer_step(peer, inputs, target, dtype), peer.zero_grad(set_to_none=True)),
    }
    warmup, iters = (2, 5) if ctx.gpu else (1, 2)
    with no_math_sdpa():
        wall, _ = dit_step.time_steps(fns, warmup, iters, ctx.device)
    med = {k: statistics.median(v) for k, v in wall.items()}
    step_flops = 3 * sum(dit_step.forward_flops(cfg, args.batch, grid, args.frames).values())
    peak = next((v for k, v in dit_step.PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name()), None) \
        if ctx.gpu else None
    mfu = {k: step_flops / t / 1e12 / peak if peak else None for k, t in med.items()}
    speedup = med["diffusers"] / med["ours"]
    data = {"tokens": tokens, "dim": cfg.dim, "blocks": cfg.num_layers, "dtype": str(dtype), "median_s": med,
            "step_tflop": step_flops / 1e12, "mfu": mfu, "peak_tflops": peak, "speedup": speedup,
            "warmup": warmup, "iters": iters}
    mfu_txt = f"MFU ours {100 * mfu['ours']:.1f}%, diffusers {100 * mfu['diffusers']:.1f}%" if peak else "MFU n/a"
    figure = (f"speed-up {speedup:.2f}x (ours {1e3 * med['ours']:.0f} ms, diffusers {1e3 * med['diffusers']:.0f} ms "
              f"per step; {mfu_txt})")
    ctx.keep["blocks"] = (ours, inputs, target, dtype)
    del peer
    if ctx.gpu and speedup < MIN_SPEEDUP:
        raise Fail(f"ours is slower than diffusers beyond {MIN_SPEEDUP}x", figure, **data)
    where = f"{tokens} tokens, dim {cfg.dim}, {cfg.num_layers} blocks, no math SDPA"
    return figure, where if ctx.gpu else where + "; CPU timing, not judged", data


@check("flash_attn", 20)
def flash_attn(ctx: Context):
    """Our blocks with the flash-attn package vs SDPA: step time ratio and output agreement."""
    from wan_animate.model import set_attention_backend

    if not ctx.gpu:
        raise Skip("no CUDA device (flash-attn runs on CUDA bf16 only)")
    if not _flash_available():
        raise Skip("flash-attn is not installed (SDPA picks its own flash kernel)")
    if "blocks" not in ctx.keep:
        raise Skip("blocks_speed did not leave its model")
    ours, inputs, target, dtype = ctx.keep.pop("blocks")
    with torch.no_grad(), no_math_sdpa():
        ref = ours(**inputs).float()
        set_attention_backend("flash")
        try:
            out = ours(**inputs).float()
        finally:
            set_attention_backend("sdpa")
    err = ((out - ref).norm() / ref.norm()).item()
    fns = {}
    for backend in ("sdpa", "flash"):
        def step(backend=backend):
            set_attention_backend(backend)
            try:
                dit_step.ours_step(ours, inputs, target, dtype)
            finally:
                set_attention_backend("sdpa")
            ours.zero_grad(set_to_none=True)
        fns[backend] = step
    with no_math_sdpa():
        wall, _ = dit_step.time_steps(fns, 1, 3, ctx.device)
    ratio = statistics.median(wall["sdpa"]) / statistics.median(wall["flash"])
    figure = f"flash vs SDPA speed-up {ratio:.2f}x, output rel. diff {err:.1e}"
    if err > 2e-2:  # two bf16 attention kernels: ~1e-3 expected
        raise Fail("flash-attn output differs from SDPA beyond bf16 rounding", figure, rel_diff=err)
    return figure, "same blocks as blocks_speed", {"speedup": ratio, "rel_diff": err}


# -- memory planner vs the allocator ------------------------------------------------------------


def _plan_overrides(ctx: Context, extra: list[str]) -> list[str]:
    """animate14b_lora on the blocks of dit_args (a model folder holding only config.json)."""
    from wan_animate.config import WanAnimateConfig

    args = ctx.dit_args()
    layers = args.layers or WanAnimateConfig.preset(args.preset).num_layers
    mcfg = WanAnimateConfig.preset(args.preset, num_layers=layers, face_adapter_period=layers)
    folder = ctx.work / f"model-{args.preset}-{layers}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(mcfg.to_official_config()))
    return ["experiment=animate14b_lora", f"model.path={folder}", "data.urls=[unused]",
            f"data.clip_len={args.frames}", "data.refert_nums=[1]", f"data.buckets=[[{args.height},{args.width}]]",
            "train.precision=bf16", "train.grad_accum=1", "lora.train_adapters=false", "optim.name=adamw",
            "model.motion_encoder_chunk=0", f"train.output_dir={ctx.work / 'plan'}", *extra]


def _cached_examples(cfg, mcfg, device: torch.device) -> list[dict]:
    """One micro-batch of cached examples at the planned shape, on ``device`` as the planner counts them."""
    (h, w), n = cfg.data.buckets[0], cfg.data.clip_len
    t, lh, lw = (n - 1) // 4 + 1, h // 8, w // 8
    face = cfg.data.face_size or mcfg.motion_encoder_size
    with torch.device(device):
        return [dict(cached=True, num_given=max(cfg.data.refert_nums), mode="animate", noise_seed=i, key=f"check-{i}",
                     face=torch.rand(3, n, face, face) * 2 - 1, ref_latent=torch.randn(16, 1, lh, lw),
                     temporal_latent=torch.randn(16, t, lh, lw), latents_target=torch.randn(16, t, lh, lw),
                     pose_latents=torch.randn(16, t, lh, lw), context=torch.randn(mcfg.text_len, mcfg.text_dim),
                     clip_fea=torch.randn(mcfg.num_image_tokens, mcfg.image_dim))
                for i in range(cfg.train.micro_batch_size)]


class TrainerStep:
    """The trainer's model set-up and one optimizer step (train.modes + wan_animate.memory), on real tensors."""

    def __init__(self, cfg, mcfg, device: torch.device):
        from train.modes import make_optimizer, prepare_model
        from wan_animate.family import get_family
        from wan_animate.model import WanAnimateDiT, set_precision

        self.cfg, self.mcfg, self.device = cfg, mcfg, device
        with torch.device("meta"):
            dit = WanAnimateDiT(mcfg)
        dit.to_empty(device="cpu")
        with torch.no_grad():
            for t in [*dit.parameters(), *dit.buffers()]:
                t.normal_(0.0, 0.02)
        set_precision(dit, torch.bfloat16)
        groups, _, self.memory = prepare_model(dit, cfg, get_family(cfg.model.family), deepspeed=False, device=device)
        if not hasattr(dit, "hf_device_map"):  # block swap placed it already
            dit.to(device)
        self.dit, self.optimizer = dit, make_optimizer(groups, cfg.optim)
        self.trainable = [p for p in dit.parameters() if p.requires_grad]

    def __call__(self) -> float:
        from wan_animate.batch import build_dit_inputs
        from wan_animate.objective import flow_matching_loss

        batch = build_dit_inputs(_cached_examples(self.cfg, self.mcfg, self.device), None, self.device,
                                 torch.float32, self.cfg.data.clip_len)
        with no_math_sdpa():  # the checkpointed blocks recompute in backward
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                out = flow_matching_loss(self.dit, batch, self.cfg.loss)
            out.loss.backward()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out.loss.detach().item()

    @property
    def misses(self) -> int:
        swap = self.memory.block_swap
        return swap.misses if swap is not None else 0


def _memory_check(ctx: Context, label: str, extra: list[str]):
    from train.config import compose
    from train.plan.planner import plan_memory
    from wan_animate.config import WanAnimateConfig

    cfg = compose(_plan_overrides(ctx, extra))
    plan = plan_memory(cfg, write=False)
    planned, planned_pin = plan["peak_device_gib"], plan["host_pinned_gib"]
    data = {"options": label, "planned_device_gib": planned, "planned_pinned_gib": planned_pin,
            "plan_peak_phase": plan.get("peak_phase"), "plan_by_category": plan.get("by_category")}
    mcfg = WanAnimateConfig.from_official_config(json.loads((Path(cfg.model.path) / "config.json").read_text()))
    release(ctx)
    if not ctx.gpu:  # the same step runs; nothing can measure it
        loss = TrainerStep(cfg, mcfg, ctx.device)()
        raise Skip(f"no CUDA device to measure against; the step ran (loss {loss:.4f})",
                   f"planned {planned:.3f} GiB device, {planned_pin:.3f} GiB pinned", **data)
    _host_empty_cache()
    base = torch.cuda.memory_allocated()
    cached_base = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    torch.cuda.reset_peak_host_memory_stats()
    with RegisteredHostBytes() as registered:
        step = TrainerStep(cfg, mcfg, ctx.device)
        step()  # step 1 creates the optimizer states: step 2 is the steady state the planner plans
        sync(ctx)
        torch.cuda.reset_peak_memory_stats()
        loss = step()
        sync(ctx)
        measured = gib(torch.cuda.max_memory_allocated() - base)
        cached = gib(torch.cuda.host_memory_stats().get("allocated_bytes.peak", 0) - cached_base)
        pinned = gib(registered.peak) + cached  # (the two peaks need not coincide: an upper bound)
    data.update(measured_device_gib=measured, measured_pinned_gib=pinned, pinned_registered_gib=gib(registered.peak),
                pinned_caching_allocator_gib=cached, loss=loss, misses=step.misses,
                device_error=rel(planned, measured),
                pinned_error=rel(planned_pin, pinned) if max(planned_pin, pinned) > 0.01 else None)
    del step
    release(ctx)
    figure = f"device planned {planned:.2f} / measured {measured:.2f} GiB ({100 * rel(planned, measured):+.1f}%)"
    if data["pinned_error"] is not None:
        figure += (f"; pinned planned {planned_pin:.2f} / measured {pinned:.2f} GiB "
                   f"({100 * data['pinned_error']:+.1f}%: registered {gib(registered.peak):.2f}"
                   f" + caching allocator {cached:.2f})")
    if not math.isfinite(loss):
        raise Fail(f"loss {loss}", figure, **data)
    bad = [k for k in ("device_error", "pinned_error") if data[k] is not None and abs(data[k]) > MEMORY_TOLERANCE]
    if bad:
        raise Fail(f"planner off by more than {100 * MEMORY_TOLERANCE:.0f}%: {', '.join(bad)}", figure, **data)
    return figure, (f"{label}; max_memory_allocated; pinned = cudaHostRegister'ed bytes + host_memory_stats "
                    "allocated_bytes.peak"), data


@check("memory_plain", 45)
def memory_plain(ctx: Context):
    return _memory_check(ctx, "LoRA bf16, no memory options", ["model.activation_checkpointing=false",
                                                               "model.checkpoint_dtype=fp32"])


@check("memory_options", 60)
def memory_options(ctx: Context):
    return _memory_check(ctx, "LoRA bf16 + fp8 base + block swap (all) + bf16 checkpoint offload", [
        "model.activation_checkpointing=true", "model.base_dtype=fp8", f"model.block_swap={_layers(ctx)}",
        "model.checkpoint_offload=true", "model.checkpoint_dtype=bf16"])


@check("block_swap", 45)
def block_swap(ctx: Context):
    """Step time with every block swapped / without (both checkpointed), and prefetch misses after warm-up."""
    from train.config import compose
    from wan_animate.config import WanAnimateConfig

    base = _plan_overrides(ctx, ["model.activation_checkpointing=true", "model.checkpoint_dtype=fp32"])
    steps = {}
    for name, extra in (("plain", []), ("swap", [f"model.block_swap={_layers(ctx)}"])):
        cfg = compose(base + extra)
        mcfg = WanAnimateConfig.from_official_config(json.loads((Path(cfg.model.path) / "config.json").read_text()))
        steps[name] = TrainerStep(cfg, mcfg, ctx.device)
    warm_misses = None
    wall: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(4 if ctx.gpu else 2):  # 1 warm-up, then timed, alternating
        for name, step in steps.items():
            sync(ctx)
            t0 = time.perf_counter()
            step()
            sync(ctx)
            if i:
                wall[name].append(time.perf_counter() - t0)
        if i == 0:
            warm_misses = steps["swap"].misses
    misses = steps["swap"].misses - warm_misses
    ratio = statistics.median(wall["swap"]) / statistics.median(wall["plain"])
    host = steps["swap"].memory.host_weight_bytes
    del steps
    release(ctx)
    figure = f"with/without swap {ratio:.2f}x, {misses} misses in {len(wall['swap'])} steps after warm-up"
    data = {"ratio": ratio, "misses": misses, "warmup_misses": warm_misses, "median_s": {k: statistics.median(v)
            for k, v in wall.items()}, "host_weight_gib": gib(host)}
    if misses:
        raise Fail("a block was not prefetched (synchronous copy) after warm-up", figure, **data)
    if ctx.gpu and ratio > MAX_SWAP_SLOWDOWN:
        raise Fail(f"copies not hidden behind compute (above {MAX_SWAP_SLOWDOWN}x)", figure, **data)
    where = f"{gib(host):.3g} GiB of frozen weights swapped"
    return figure, where if ctx.gpu else where + "; CPU timing, not judged", data


@check("sequence_parallel", 35)
def sequence_parallel(ctx: Context):
    """torchrun --nproc_per_node 1 (NCCL on CUDA, gloo on CPU): Ulysses on a group of one equals the
    plain model, and the first-batch check runs with the batch on the device."""
    out = ctx.work / "sp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(_free_port()),
           str(Path(__file__)), "--sp-worker", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=_pythonpath(), OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=70 if ctx.gpu else 600)
    if p.returncode or not out.is_file():
        raise Fail(f"torchrun exit {p.returncode}: {_tail(p.stderr + p.stdout)}")
    r = json.loads(out.read_text())
    figure = f"{r['backend']}: output rel. error {r['out']:.1e}, worst gradient {r['grad']:.1e}"
    if r["error"]:
        raise Fail(r["error"], figure, **r)
    if max(r["out"], r["grad"]) > 1e-5:
        raise Fail("the sequence-parallel model differs from the plain one", figure, **r)
    return figure, "fp32 tiny model; check_same_sample on device tensors + CPU generator state", r


def sp_worker(out: str) -> None:
    import torch.distributed as dist

    from wan_animate.config import WanAnimateConfig
    from wan_animate.model import WanAnimateDiT
    from wan_animate.parallel import apply_sequence_parallel, check_same_sample

    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group("nccl" if cuda else "gloo")
    result = {"backend": dist.get_backend(), "world": dist.get_world_size(), "out": math.inf, "grad": math.inf,
              "error": ""}
    try:
        cfg = WanAnimateConfig.preset("tiny")
        torch.manual_seed(0)
        plain = WanAnimateDiT(cfg).to(device)
        parallel = WanAnimateDiT(cfg).to(device)
        parallel.load_state_dict(plain.state_dict())
        apply_sequence_parallel(parallel, dist.group.WORLD)
        args = SimpleNamespace(frames=9, height=48, width=80, batch=1)  # 4 x 3 x 5 tokens, 15 a frame
        inputs, _, _ = dit_step.make_inputs(cfg, args, device, torch.float32)
        noise = torch.Generator().manual_seed(0)  # the trainer's noise generator lives on the CPU
        check_same_sample({**inputs, "noise_generator_state": noise.get_state()}, dist.group.WORLD)
        outs, grads = [], []
        for model in (plain, parallel):
            with no_math_sdpa():
                y = model(**inputs)
                (y * torch.linspace(-1, 1, y.numel(), device=device).view_as(y)).sum().backward()
            outs.append(y.detach())
            grads.append({n: p.grad for n, p in model.named_parameters()})
        result["out"] = ((outs[1] - outs[0]).norm() / outs[0].norm()).item()
        result["grad"] = max(((grads[1][n] - g).norm() / g.norm().clamp_min(1e-30)).item()
                             for n, g in grads[0].items() if g is not None)
    except Exception as e:  # reported by the parent
        result["error"] = f"{type(e).__name__}: {e}"[:500]
    finally:
        dist.destroy_process_group()
    Path(out).write_text(json.dumps(result))


def _zero_run(ctx: Context, stage: int):
    """The real trainer entry point through accelerate + DeepSpeed, 1 process: tiny LoRA, bf16 (fp32 on CPU,
    which DeepSpeed's CPU accelerator needs), activation checkpointing, 2 steps, a checkpoint at step 2."""
    ctx.slow_skip("a DeepSpeed trainer run takes minutes")
    out = ctx.work / f"zero{stage}"
    launch = f"launch/accelerate/{'8gpu' if ctx.gpu else 'cpu_2proc'}_zero{stage}.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / launch),
           "--num_processes", "1", "--main_process_port", str(_free_port()), str(ROOT / "train/main.py"),
           f"train.output_dir={out}", f"train.cache_dir={ctx.work / 'train-cache'}", "train.mode=lora",
           f"train.precision={'bf16' if ctx.gpu else 'fp32'}", "model.activation_checkpointing=true",
           "train.max_steps=2", "train.checkpoint_every=2", "train.progress=false", "train.validation=false",
           "train.export=false", "data.synthetic_clips=2", "data.synthetic_frames=9", "data.clip_len=9"]
    env = dict(os.environ, PYTHONPATH=_pythonpath(), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    if not ctx.gpu:
        env["DS_ACCELERATOR"] = "cpu"
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600 if not ctx.gpu else 120)
    if p.returncode:
        raise Fail(f"exit {p.returncode}: {_tail(p.stderr + p.stdout)}")
    losses = [json.loads(l)["loss/train"] for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    summary = json.loads((out / "summary.json").read_text())
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
    figure = f"losses {', '.join(f'{l:.4f}' for l in losses)}; checkpoint {', '.join(ckpts) or 'none'}"
    data = {"losses": losses, "zero_stage": summary.get("zero_stage"), "checkpoints": ckpts,
            "peak_gib": summary.get("peak_gib")}
    problems = [s for s, bad in ((f"{len(losses)} steps logged", len(losses) != 2),
                                 ("a loss is not finite", not all(map(math.isfinite, losses))),
                                 (f"zero_stage {summary.get('zero_stage')}", summary.get("zero_stage") != stage),
                                 ("no checkpoint at step 2", "step-2" not in ckpts)) if bad]
    if problems:
        raise Fail("; ".join(problems), figure, **data)
    return figure, f"ZeRO-{stage}, train/main.py via accelerate launch, 1 process", data


@check("zero2_lora", 60)
def zero2_lora(ctx: Context):
    return _zero_run(ctx, 2)


@check("zero3_lora", 60)
def zero3_lora(ctx: Context):
    return _zero_run(ctx, 3)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _layers(ctx: Context) -> int:
    from wan_animate.config import WanAnimateConfig

    args = ctx.dit_args()
    return args.layers or WanAnimateConfig.preset(args.preset).num_layers


def _flash_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


class RegisteredHostBytes:
    """Counts host memory page-locked with ``cudaHostRegister`` (what ``wan_animate.memory.pinned``
    uses; CUDA's caching host allocator, seen by ``torch.cuda.host_memory_stats``, holds none of it):
    wraps ``torch.cuda.cudart()``'s register/unregister calls while the context is open."""

    def __enter__(self):
        self.rt = torch.cuda.cudart()
        self.register, self.unregister = self.rt.cudaHostRegister, self.rt.cudaHostUnregister
        self.sizes: dict[int, int] = {}
        self.current = self.peak = 0

        def register(ptr, nbytes, flags):
            err = self.register(ptr, nbytes, flags)
            if int(err) == 0:
                self.sizes[int(ptr)] = int(nbytes)
                self.current += int(nbytes)
                self.peak = max(self.peak, self.current)
            return err

        def unregister(ptr):
            self.current -= self.sizes.pop(int(ptr), 0)
            return self.unregister(ptr)

        self.rt.cudaHostRegister, self.rt.cudaHostUnregister = register, unregister
        return self

    def __exit__(self, *exc):
        self.rt.cudaHostRegister, self.rt.cudaHostUnregister = self.register, self.unregister


def _host_empty_cache() -> None:
    """Return cached pinned blocks to CUDA so the pinned peak counts this check only (private API; best effort)."""
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


def _pythonpath() -> str:
    return os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(text: str, n: int = 400) -> str:
    """The error a subprocess died of (not its launcher's summary), else its last lines."""
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    errors = [l for l in lines if re.match(r"(\[train\] configuration error|[\w.]*(Error|Exception)\b)", l)
              and "ChildFailedError" not in l]
    return (errors[-1] if errors else " | ".join(lines[-4:]))[-n:]


@contextlib.contextmanager
def _deadline(seconds: int):
    """Raise TimeoutError in the check once it runs ``seconds`` (main thread, POSIX)."""
    def on_alarm(*_):
        raise TimeoutError(f"ran past its limit of {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_check(ctx: Context, name: str, budget: int, fn) -> Result:
    t0, crashed = time.perf_counter(), False
    try:
        with _deadline(2 * budget if ctx.gpu else 10 * budget):
            figure, reason, data = fn(ctx)
        result = Result(name, "PASS", figure, reason, data=data)
    except Skip as s:
        result = Result(name, "SKIP", s.figure, str(s), data=s.data)
    except Fail as f:
        result = Result(name, "FAIL", f.figure, str(f), data=f.data)
    except Exception as e:  # noqa: BLE001 - any error is this check's FAIL, the others still run
        where = traceback.extract_tb(e.__traceback__)[-1]
        result = Result(name, "FAIL", "-", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''} "
                        f"at {Path(where.filename).name}:{where.lineno}")
        crashed = True
        traceback.print_exc()  # the whole story on stderr: a GPU run is rare
    if crashed:  # free what the failed check left (its exception and frames are gone by now)
        release(ctx)
    result.seconds, result.budget_s = round(time.perf_counter() - t0, 1), budget
    if ctx.gpu and result.seconds > budget and result.status != "FAIL":
        result.reason += f"; {result.seconds:.0f} s, over its {budget} s budget"
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="summary file (default $OUT/gpu_check.json, else bench/results/)")
    p.add_argument("--only", nargs="*", default=None, help="run these checks only (the others are not listed)")
    p.add_argument("--cpu-all", action="store_true", help="on the CPU, also run the slow subprocess checks")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--sp-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sp_worker:
        sp_worker(args.sp_worker)
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kind = device.type
    if kind == "cpu":  # tiny sizes: more threads only contend (seconds per step on a busy 2-core machine)
        torch.set_num_threads(1)
    if args.json:
        out = Path(args.json)
    elif os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "gpu_check.json"
    else:
        out = ROOT / "bench" / "results" / f"gpu_check-{kind}.json"
    unknown = set(args.only or []) - {c[0] for c in CHECKS}
    if unknown:
        p.error(f"--only {' '.join(sorted(unknown))}: no such check; choose from {' '.join(c[0] for c in CHECKS)}")
    selected = [c for c in CHECKS if args.only is None or c[0] in args.only]
    total_budget = sum(b for _, b, _ in selected)
    name = torch.cuda.get_device_name(device) if kind == "cuda" else f"CPU {platform.machine()}"
    print(f"gpu_check on {name}, torch {torch.__version__}: {len(selected)} checks, budget ~{total_budget} s "
          "on one H100 (estimate)", flush=True)
    t0 = time.perf_counter()
    results: list[Result] = []

    def write_summary() -> dict:  # after every check: a run cut short still leaves what it found
        summary = {"device": name, "device_type": kind, "torch": torch.__version__,
                   "seconds": round(time.perf_counter() - t0, 1), "budget_s": total_budget,
                   "budget_note": "estimated for one H100", "failed": [r.name for r in results if r.status == "FAIL"],
                   "checks": [asdict(r) for r in results]}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1, default=str))
        return summary

    summary = write_summary()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as work:
        ctx = Context(device, args.cpu_all, Path(work))
        for check_name, budget, fn in selected:
            results.append(run_check(ctx, check_name, budget, fn))
            print(results[-1].line(), flush=True)
            summary = write_summary()
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in {summary['seconds']:.0f} s; "
          f"summary: {out}", flush=True)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
