"""The memory planner's model of one rank of a parallel job (``train.plan_world_size=N``).

Split from ``train.plan.planner`` (which runs the step); what each engine holds per rank is written
there, in the module docstring. These terms are *computed* from the parameter counts and
launch/deepspeed/*.json; the fake step measures everything else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from train.config import Config

DS_DEFAULTS = {"reduce_bucket_size": 5e8, "stage3_max_live_parameters": 1e9,
               "stage3_param_persistence_threshold": 1e6, "sub_group_size": 1e9}


def engine_of(cfg: Config, world: int) -> tuple[str, int]:
    """("single" | "ddp" | "deepspeed", zero stage) for one rank of ``world``."""
    stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0)
    from train.parallel import launched_with_deepspeed

    if cfg.train.distributed == "deepspeed" or launched_with_deepspeed():
        return "deepspeed", stage or 3
    return ("ddp" if world > 1 else "single"), 0


def _ds_settings() -> dict[str, float]:
    f = Path(__file__).resolve().parent.parent / "launch" / "deepspeed" / "zero3.json"
    out = dict(DS_DEFAULTS)
    if f.is_file():
        zero = json.loads(f.read_text()).get("zero_optimization", {})
        out.update({k: float(zero[k]) for k in DS_DEFAULTS if k in zero})
    return out


def parallel_terms(cfg: Config, dit, world: int, engine: str, stage: int) -> tuple[dict, dict, dict]:
    """(scale per measured category, constant per-rank extras in bytes, notes) for one rank."""
    trainable = [p for p in dit.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    scale: dict[str, float] = {}
    extra: dict[str, float] = {}
    notes: dict[str, str] = {}
    if engine == "ddp":
        extra["ddp_grad_buckets"] = float(sum(p.numel() * 4 for p in trainable))  # fp32 master grads
        notes["ddp_grad_buckets"] = "computed: one more copy of the gradients in DDP's buckets"
    if engine != "deepspeed":
        return scale, extra, notes
    ds = _ds_settings()
    bf16 = cfg.train.precision == "bf16"
    w_bytes = 2 if bf16 else 4
    # DeepSpeed reduces the full gradients into partitions: the measured full gradients are replaced
    scale.update(gradients=0.0, optimizer_states=0.0)
    extra["gradients"] = n_train * w_bytes / world + ds["reduce_bucket_size"] * w_bytes
    notes["gradients"] = (f"computed: 1/{world} partition ({w_bytes} B/param) + one reduce bucket "
                          f"({ds['reduce_bucket_size']:.0e} elements)")
    per_param = (12 if bf16 else 8)  # fp32 master (bf16 only) + Adam m + v, kept all the time
    extra["optimizer_states"] = n_train * per_param / world
    notes["optimizer_states"] = f"computed: {per_param} B/trainable param / {world} (fp32 master, Adam m+v)"
    # At the step DeepSpeed makes an fp32 copy of the gradient partition one sub-group at a time
    # (stage3 _prepare_fp32_grad_for_sub_group, freed by _release_sub_group): the planned step
    # allocates it in its optimizer phase (``_step``), so it only counts there.
    notes["ds_step_grad_elements"] = int(min(n_train / world, ds["sub_group_size"]))
    notes["ds_step_fp32_grad"] = (f"computed size, allocated at the step only: fp32 gradient of one optimizer "
                                  f"sub-group (min(partition, sub_group_size={ds['sub_group_size']:.0e}) elements) "
                                  "+ its bf16 flattened source")
    if stage >= 3:
        scale["frozen_weights"] = scale["trainable_weights"] = 1.0 / world
        thr = ds["stage3_param_persistence_threshold"]
        persistent = sum(p.numel() * p.element_size() for p in dit.parameters() if p.numel() < thr)
        block_bytes = sorted((sum(p.numel() * w_bytes for p in m.parameters()) for m in dit.blocks), reverse=True)
        live = min(sum(block_bytes[:2]), ds["stage3_max_live_parameters"] * w_bytes)
        extra["zero3_gathered_params"] = live + persistent * (1 - 1.0 / world)
        notes["zero3_gathered_params"] = ("computed: two largest blocks gathered (computing + prefetched), "
                                          "params below the persistence threshold kept whole")
        notes["weights"] = f"measured bytes x 1/{world} (ZeRO-3 partitions)"
    return scale, extra, notes
