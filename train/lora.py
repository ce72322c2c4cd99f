"""What learns: the trainable parameter set and optimizer groups for each ``train.mode``.

* ``full``: every DiT parameter (trunk at ``optim.lr``, pose/face adapters at ``optim.adapter_lr``);
* ``adapters_only``: only ``wan_animate.model.ADAPTER_PREFIXES`` modules; the trunk is frozen and
  stays bit-identical;
* ``lora``: peft LoRA factors on the block linears (``optim.lr``), plus the adapters trained fully
  (``optim.adapter_lr``) when ``lora.train_adapters``.

The frozen VAE / text / image encoders are never passed here: they get ``requires_grad=False``
in ``wan_animate.encoders`` and never enter the optimizer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from train.config import Config
from wan_animate.lora import add_lora, is_lora_key, load_lora_into_peft
from wan_animate.model import ADAPTER_PREFIXES


def is_adapter(name: str) -> bool:
    return name.split(".", 1)[0] in ADAPTER_PREFIXES


def setup_trainable(dit: nn.Module, cfg: Config) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Set ``requires_grad`` for ``cfg.train.mode`` and return (optimizer param groups, summary)."""
    mode = cfg.train.mode
    lr = cfg.optim.lr
    adapter_lr = cfg.optim.adapter_lr if cfg.optim.adapter_lr is not None else lr
    lora_targets: list[str] = []
    if mode == "lora":
        lora_targets = add_lora(dit, rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=cfg.lora.targets or None,
                                dropout=cfg.lora.dropout)
        if cfg.lora.init_from:
            load_lora_into_peft(dit, cfg.lora.init_from)
    trunk, adapters, lora = [], [], []
    for name, p in dit.named_parameters():
        if mode == "full":
            p.requires_grad_(True)
        elif mode == "adapters_only":
            p.requires_grad_(is_adapter(name))
        else:
            p.requires_grad_(is_lora_key(name) or (cfg.lora.train_adapters and is_adapter(name)))
        if not p.requires_grad:
            continue
        if is_lora_key(name):
            lora.append(p)
        elif is_adapter(name):
            adapters.append(p)
        else:
            trunk.append(p)
    groups = []
    if trunk:
        groups.append({"params": trunk, "lr": lr, "name": "trunk"})
    if lora:
        groups.append({"params": lora, "lr": lr, "name": "lora"})
    if adapters:
        groups.append({"params": adapters, "lr": adapter_lr, "name": "adapters"})
    if not groups:
        raise RuntimeError(f"train.mode={mode} left no trainable parameter.")
    summary = {
        "trainable_params": sum(p.numel() for g in groups for p in g["params"]),
        "total_params": sum(p.numel() for p in dit.parameters()),
        "groups": {g["name"]: sum(p.numel() for p in g["params"]) for g in groups},
        "lora_targets": len(lora_targets),
    }
    return groups, summary


def make_optimizer(groups: list[dict[str, Any]], cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    for g in groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    import math

    o, total = cfg.optim, cfg.train.max_steps

    def factor(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        if o.scheduler == "cosine":
            shape = 0.5 * (1 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
