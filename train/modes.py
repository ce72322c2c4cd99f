"""What learns, and how fast: the trainable set and optimizer groups of each ``train.mode``
(docs/training.md), the fp32 upcast of what trains, the optimizer and the LR schedule.

``prepare_model`` is the build order after the model exists, written once for the trainer and the
memory planner: pure functions of a model and the config (no ``Accelerator``), so the planner calls
them on a fake-tensor model.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import torch
from torch import nn

from train.config import Config, OptimConfig
from wan_animate.family import DEFAULT_FAMILY, ModelFamily, get_family
from wan_animate.lora import add_lora, is_lora_key, load_lora_into_peft
from wan_animate.memory import apply_memory_options


def is_adapter(name: str, family: ModelFamily | None = None) -> bool:
    """Whether parameter ``name`` belongs to the family's adapters (default: Wan-Animate-14B's)."""
    prefixes = (family or get_family(DEFAULT_FAMILY)).adapter_prefixes
    return name.split(".", 1)[0] in prefixes


def _mark_trainable(dit: nn.Module, cfg: Config, family: ModelFamily) -> None:
    mode = cfg.train.mode
    for name, p in dit.named_parameters():
        if mode == "full":
            p.requires_grad_(True)
        elif mode == "adapters_only":
            p.requires_grad_(is_adapter(name, family))
        elif mode == "self_attn":
            p.requires_grad_(re.match(family.self_attention, name) is not None)
        else:
            p.requires_grad_(is_lora_key(name) or (cfg.lora.train_adapters and is_adapter(name, family)))


def setup_trainable(dit: nn.Module, cfg: Config, family: ModelFamily | None = None,
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Add LoRA factors (lora mode), set ``requires_grad`` for ``cfg.train.mode`` and return
    (optimizer param groups ``{"params", "lr", "name"}``, summary of parameter counts)."""
    family = family or get_family(cfg.model.family)
    mode = cfg.train.mode
    lr = cfg.optim.lr
    adapter_lr = cfg.optim.adapter_lr if cfg.optim.adapter_lr is not None else lr
    lora_targets: list[str] = []
    if mode == "lora":
        targets = cfg.lora.targets or family.lora_targets
        lora_targets = add_lora(dit, rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=list(targets) if targets else None,
                                dropout=cfg.lora.dropout)
        if cfg.lora.init_from:
            load_lora_into_peft(dit, cfg.lora.init_from)
    _mark_trainable(dit, cfg, family)
    by_group: dict[str, list] = {"trunk": [], "lora": [], "adapters": []}
    for name, p in dit.named_parameters():
        if p.requires_grad:
            by_group["lora" if is_lora_key(name) else "adapters" if is_adapter(name, family) else "trunk"].append(p)
    groups = [{"params": params, "lr": adapter_lr if name == "adapters" else lr, "name": name}
              for name, params in by_group.items() if params]
    if not groups:
        raise RuntimeError(f"train.mode={mode} left no trainable parameter.")
    summary = {
        "trainable_params": sum(p.numel() for g in groups for p in g["params"]),
        "total_params": sum(p.numel() for p in dit.parameters()),
        "groups": {g["name"]: sum(p.numel() for p in g["params"]) for g in groups},
        "lora_targets": len(lora_targets),
    }
    return groups, summary


def prepare_model(dit: nn.Module, cfg: Config, family: ModelFamily, *, deepspeed: bool, device):
    """A built (or loaded) model before the optimizer exists, for the trainer and the planner alike:
    training mode, the trainable set, fp32 master copies of the trainables (autocast still runs the
    matmuls in bf16; not under DeepSpeed, whose optimizer keeps its own), the memory options of
    ``cfg.model``. Returns (param groups, summary, memory state)."""
    dit.train()
    groups, summary = setup_trainable(dit, cfg, family)
    if not deepspeed:  # (diffusers' cast_training_params, whose module imports every diffusers model: ~5 s)
        for p in dit.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    memory = apply_memory_options(dit, cfg.model, device=device)
    return groups, summary, memory


def make_optimizer(groups: list[dict[str, Any]], optim: OptimConfig) -> torch.optim.Optimizer:
    """``adamw`` (torch) or ``adamw8bit`` (torchao's ``AdamW8bit``: block-wise 8-bit moments)."""
    kw = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if optim.name == "adamw8bit":
        from torchao.optim import AdamW8bit  # a dependency (pyproject)

        return AdamW8bit(groups, **kw)
    return torch.optim.AdamW(groups, **kw)


def lr_factor_fn(cfg: Config) -> Callable[[int], float]:
    """Multiplier of each group's LR after ``step`` scheduler steps.

    Warmup: ``(step + 1) / warmup_steps`` (the first update already runs at ``lr / warmup_steps``,
    where diffusers' schedules start at 0). After it, over ``progress`` in [0, 1] of the steps after
    warmup: constant 1, linear ``1 - progress``, cosine ``(1 + cos(pi progress)) / 2`` (the decay
    shapes of diffusers' schedules), lifted onto the floor ``optim.min_lr_ratio`` (diffusers decays to 0).
    """
    o, total = cfg.optim, cfg.train.max_steps

    def factor(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if total <= o.warmup_steps or o.scheduler == "constant":  # a run ending inside its warmup: no decay
            return 1.0
        progress = (min(step, total) - o.warmup_steps) / (total - o.warmup_steps)
        shape = (1 + math.cos(math.pi * progress)) / 2 if o.scheduler == "cosine" else 1 - progress
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * shape

    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per applied (not skipped) update; its state travels in checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_fn(cfg))
