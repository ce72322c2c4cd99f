"""Distributed setup: accelerate (DDP or DeepSpeed ZeRO-2/3), bf16, and the CPU quirks of
``accelerate launch`` + DeepSpeed without GPUs: accelerate would build one single-rank job per
process, so ``backend="gloo"`` (with ``DS_ACCELERATOR=cpu``) is passed and ``check_world`` verifies it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from train.config import Config, ConfigError
from wan_animate.parallel import skip_deepspeed_shm_op


def launched_with_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(cfg: Config):
    """The ``Accelerator`` for this run (mixed precision, grad accumulation, backend)."""
    t = cfg.train
    use_ds = launched_with_deepspeed()
    if t.distributed == "deepspeed" and not use_ds:
        raise ConfigError(
            "train.distributed=deepspeed but the job was not launched with a DeepSpeed accelerate config; "
            "use `accelerate launch --config_file launch/accelerate/<...zero...>.yaml train/main.py`.")
    if t.distributed in ("ddp", "none") and use_ds:
        raise ConfigError(f"train.distributed={t.distributed} but the accelerate config enables DeepSpeed; "
                          "pick a non-DeepSpeed launch config or set train.distributed=auto.")
    cuda = torch.cuda.is_available()
    if t.precision == "bf16" and not cuda and use_ds:
        raise ConfigError("train.precision=bf16 with DeepSpeed on CPU is not supported; use train.precision=fp32 on CPU.")
    handlers: list[Any] = []
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    if not use_ds and cfg.train.mode != "full":
        # frozen trunk parameters never receive gradients
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    if use_ds:
        skip_deepspeed_shm_op()
    acc = Accelerator(
        mixed_precision="bf16" if t.precision == "bf16" else "no",
        gradient_accumulation_steps=t.grad_accum,
        kwargs_handlers=handlers,
        cpu=not cuda and not use_ds,
    )
    if acc.state.deepspeed_plugin is not None:
        _fill_deepspeed_config(acc, cfg)
    return acc


def _fill_deepspeed_config(acc, cfg: Config) -> None:
    """Resolve the ``"auto"`` fields of the DeepSpeed JSON from our config (no data loader is passed
    to ``prepare``, so accelerate cannot infer them) and keep torch's AdamW on CPU."""
    ds = acc.state.deepspeed_plugin.deepspeed_config
    t = cfg.train
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["train_batch_size"] = t.micro_batch_size * t.grad_accum * acc.num_processes
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = cfg.optim.grad_clip
    for key, enabled in (("bf16", t.precision == "bf16"), ("fp16", False)):
        section = ds.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = enabled
    # A non-finite gradient must skip the update, never reach the weights. DeepSpeed skips it when
    # its global gradient norm is not finite (ZeRO-1/2/3, fp32) or its overflow check fires (bf16
    # ZeRO-2: bf16.check_grad_overflow); switching either off would let NaN/Inf into the weights.
    zero = ds.get("zero_optimization", {})
    if zero.get("compute_grad_norm") is False:
        raise ConfigError("the DeepSpeed JSON sets zero_optimization.compute_grad_norm=false: DeepSpeed would then "
                          "apply NaN/Inf gradients to the weights; remove that key.")
    if ds["bf16"]["enabled"] is True:
        if ds["bf16"].get("check_grad_overflow") is False:
            raise ConfigError("the DeepSpeed JSON sets bf16.check_grad_overflow=false: a NaN/Inf gradient would update "
                              "the weights; remove that key.")
        ds["bf16"]["check_grad_overflow"] = True
    # Our optimizer (torch AdamW with param groups) is used unless the JSON asks for offload,
    # where DeepSpeed's CPUAdam is required.
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    if not offload:
        ds["zero_force_ds_cpu_optimizer"] = False
    ds.setdefault("steps_per_print", 10**9)


def zero_stage(acc) -> int:
    plugin = acc.state.deepspeed_plugin
    if plugin is None:
        return 0
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


CPU_PROCESSES_WITHOUT_OPT_IN = 2  # the CPU launch files (launch/accelerate/cpu_2proc_*.yaml) start 2


def check_launch_devices(env: dict[str, str], cuda_devices: int) -> None:
    """Refuse a launch whose devices do not exist on this machine, before anything loads: more local
    processes than CUDA devices, or a GPU launch file (more than 2 processes) on a machine without
    CUDA. ``DS_ACCELERATOR=cpu`` (or accelerate's ``--cpu``) as set by the user asks for CPU ranks."""
    local = int(env.get("LOCAL_WORLD_SIZE", "1"))
    cpu_asked = env.get("DS_ACCELERATOR") == "cpu" or env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1")
    if local <= 1 or cpu_asked:
        return
    if cuda_devices == 0 and local > CPU_PROCESSES_WITHOUT_OPT_IN:
        raise ConfigError(
            f"the launch asks for {local} processes on this machine but it has no CUDA device; use "
            "launch/accelerate/1gpu.yaml (or python -m train.main) here, or set DS_ACCELERATOR=cpu to start "
            f"{local} CPU processes on purpose.")
    if cuda_devices and local > cuda_devices:
        raise ConfigError(
            f"the launch asks for {local} processes on this machine but it has {cuda_devices} CUDA device(s); "
            f"use a launch file with num_processes={cuda_devices} (or --num_processes {cuda_devices}).")


def check_world(acc) -> None:
    """Fail fast when the launcher started independent single-rank jobs instead of one group."""
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if acc.num_processes != expected:
        raise RuntimeError(
            f"accelerate reports world size {acc.num_processes} but the launcher started {expected} "
            "processes: the ranks did not join one process group (on CPU, DeepSpeed needs DS_ACCELERATOR=cpu "
            "and the gloo backend).")
    if expected > 1:
        t = torch.tensor([acc.process_index], dtype=torch.int64, device=acc.device)
        gathered = acc.gather(t)
        if sorted(gathered.tolist()) != list(range(expected)):
            raise RuntimeError(f"ranks {gathered.tolist()} do not form one group of {expected}.")


def all_ranks_true(acc, flag: bool) -> bool:
    """Logical OR of a per-rank flag over the group."""
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
    return bool(acc.reduce(t, reduction="sum").item() > 0)


@contextlib.contextmanager
def frozen_loading() -> Iterator[None]:
    """Load the frozen encoders as plain modules under ZeRO-3.

    With a ZeRO-3 config active, transformers builds every model inside ``deepspeed.zero.Init``,
    which would partition the frozen umT5/CLIP weights although no DeepSpeed engine ever owns them
    (their forward then fails). The DiT is partitioned by ``accelerate.prepare`` instead.
    """
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def write_rank_report(out_dir: Path, acc, raw_dit, keys: list[str], step: int) -> None:
    """Per-rank evidence for distributed tests: group size, weight digest, sample keys trained on."""
    h = hashlib.sha256()
    for name, p in sorted(raw_dit.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    report = {
        "rank": acc.process_index, "world_size": acc.num_processes, "step": step,
        "dist_world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "param_sha256": h.hexdigest(), "keys": keys,
    }
    path = Path(out_dir) / "ranks" / f"rank-{acc.process_index}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report))
