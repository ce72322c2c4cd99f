"""The memory planner's result: the plan dict, the printed table and the options worth trying."""

from __future__ import annotations

import dataclasses
from typing import Any

from train.config import Config
from wan_animate.family import get_family

GIB = 1024**3


def plan_result(cfg: Config, tracker, **kw) -> dict[str, Any]:
    enc, summary = kw["enc"], kw["summary"]
    by_cat = {k: round(v / GIB, 4) for k, v in sorted(tracker.peak_by_category.items(), key=lambda kv: -kv[1])}
    peak = tracker.peak / GIB
    budget = cfg.train.plan_budget_gib
    host_encoders = tracker.host.get("frozen_encoders", 0.0) / GIB  # constant over the step
    bf16 = cfg.train.precision == "bf16"
    load_copy = summary["total_params"] * (2 if bf16 else 4) / GIB
    # Steady state: the checkpoint-offload pool keeps its buffers between steps, so they are also
    # held while the next batch encodes (the planned step is a first one: the pool fills later).
    pool = tracker.host.get("activations", 0.0)
    step_host = max(tracker.host_peak, tracker.host_peak_by_phase.get("encode", 0.0) + pool) / GIB
    host_ram = max(step_host, load_copy)
    fits_host = None if cfg.train.plan_host_gib is None else host_ram <= cfg.train.plan_host_gib
    return {
        "peak_device_gib": round(peak, 3),
        "by_category": by_cat,
        "peak_phase": tracker.peak_phase,
        "peak_by_phase_gib": {k: round(v / GIB, 3) for k, v in tracker.peak_by_phase.items()},
        "host_pinned_gib": round(tracker.host_pinned_peak / GIB, 3),
        "host_encoders_gib": round(host_encoders, 3),
        "host_ram_gib": round(host_ram, 3),
        "host_ram_by_phase_gib": {"load": round(load_copy, 3), "step": round(step_host, 3)},
        "host_ram_note": "the larger of loading (computed: the DiT read on the CPU in its load dtype, "
                         f"{load_copy:.1f} GiB, before any other model or buffer is on the host) and the step "
                         "(measured: host tensors at their peak: pinned block-swap weights and offloaded "
                         "checkpoint inputs as held, host encoders and their activations); tensors only "
                         "(no CUDA context, libraries or data workers)",
        "host_pinned_note": "page-locked bytes as allocated: exact-size registered buffers of block swap "
                            "and checkpoint offload; pin_memory() copies at the caching host allocator's "
                            "power-of-two size",
        "world_size": kw["world"], "engine": kw["engine"], "zero_stage": kw["stage"],
        "tokens_per_sample": kw["tokens"], "micro_batch_size": cfg.train.micro_batch_size,
        "bucket_hw": list(kw["shape"]), "clip_len": cfg.data.clip_len, "precision": cfg.train.precision,
        "mode": cfg.train.mode, "data_source": cfg.data.source, "experiment": cfg.experiment_name,
        "activation_checkpointing": cfg.model.activation_checkpointing, "memory_options": kw["options"],
        "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
        "encoder_params": enc.params if enc else {}, "encoders_resident": False,  # never on the device in the DiT step
        "encoders_placement": _encoders_placement(cfg, enc),
        "sources": {"model": kw["model_source"], **(enc.sources if enc else {}),
                    "measured": "live storages of a full step on FakeTensorMode (LiveBytes)", **kw["notes"]},
        "budget_gib": budget, "host_budget_gib": cfg.train.plan_host_gib,
        "fits_device": peak <= budget, "fits_host": fits_host, "fits": peak <= budget and fits_host is not False,
        "seconds": kw["seconds"], "ops": tracker.ops,
    }


def candidate_options(cfg: Config) -> list[dict[str, Any]]:
    """Overrides ({"model.key": value}) worth trying for this config."""
    frozen_base = cfg.train.mode in ("lora", "adapters_only")
    c: list[dict[str, Any]] = []
    if not cfg.model.activation_checkpointing:
        c.append({"model.activation_checkpointing": True})
    c.append({"model.checkpoint_dtype": "bf16"})
    c.append({"model.checkpoint_offload": True})
    if frozen_base:
        c.append({"model.base_dtype": "fp8"})
    if not cfg.model.motion_encoder_chunk and "face" in get_family(cfg.model.family).streams:
        c.append({"model.motion_encoder_chunk": 8})
    if cfg.optim.name == "adamw":
        c.append({"optim.name": "adamw8bit"})
    if frozen_base:
        c += [{"model.block_swap": n} for n in (20, 40)]
    if len(c) > 1:
        c.append({k: v for o in c for k, v in o.items()})  # all of them at once
    return c


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    sections: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        sec, name = key.split(".", 1)
        sections.setdefault(sec, {})[name] = value
    return dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in sections.items()})


def verdict_line(plan: dict[str, Any]) -> str:
    """Device memory and host RAM against the preset's target machine (train.plan_budget_gib /
    train.plan_host_gib)."""
    device = (f"device {plan['peak_device_gib']:.1f} GiB {'fits' if plan['fits_device'] else 'does NOT fit'} in "
              f"train.plan_budget_gib={plan['budget_gib']:g}")
    host_budget = plan.get("host_budget_gib")
    if host_budget is None:
        host = f"host RAM {plan['host_ram_gib']:.1f} GiB not judged (set train.plan_host_gib to the machine's RAM)"
    else:
        host = (f"host RAM {plan['host_ram_gib']:.1f} GiB {'fits' if plan['fits_host'] else 'does NOT fit'} in "
                f"train.plan_host_gib={host_budget:g}")
    return f"[plan] verdict: {'fits' if plan['fits'] else 'does NOT fit'}: {device}; {host}"


def format_plan(plan: dict[str, Any]) -> str:
    lines = [(f"[plan] {plan['experiment']}: mode={plan['mode']} {plan['precision']} engine={plan['engine']}"
              f" zero={plan['zero_stage']} rank 1 of {plan['world_size']}; {plan['bucket_hw'][0]}x{plan['bucket_hw'][1]}"
              f" x {plan['clip_len']} frames = {plan['tokens_per_sample']:,} tokens x {plan['micro_batch_size']}"),
             f"{'category':<28}{'GiB at peak':>12}"]
    lines += [f"{k:<28}{v:>12.2f}" for k, v in plan["by_category"].items()]
    lines += [f"{'peak device':<28}{plan['peak_device_gib']:>12.2f}   (phase: {plan['peak_phase']})",
              f"{'host pinned':<28}{plan['host_pinned_gib']:>12.2f}",
              f"{'host RAM (incl. load)':<28}{plan['host_ram_gib']:>12.2f}"]
    lines.append(verdict_line(plan))
    for t in plan.get("options_tried", []):
        opts = " ".join(f"{k}={v}" for k, v in t["overrides"].items())
        lines.append(f"  with {opts}: {t['peak_device_gib']:.1f} GiB -> {'fits' if t['fits'] else 'does not fit'}")
    if not plan["fits"] and "options_tried" in plan and not any(t["fits"] for t in plan["options_tried"]):
        lines.append("  no single option makes it fit: plan more ranks (train.plan_world_size) or a smaller bucket")
    return "\n".join(lines)


def _encoders_placement(cfg: Config, enc) -> str:
    """Where the trainer keeps the frozen encoders (train/frozen_encoders.py)."""
    if not enc:
        return "none"
    if cfg.data.source == "cached":
        return "not loaded for training (cached shards); host when validation loads them"
    if cfg.model.encoders_device == "cpu":
        return "host, encoding on the host (model.encoders_device=cpu)"
    return "host, on the device only while encoding a batch (model.encoders_device=device)"
