"""Resuming with changed settings: each changed key is applied visibly, or refused before any
model loads.

Refused (``refusals``, against the run's ``config.json``): what a saved state cannot follow (``_WHY``
says why for each key). Applied (``snapshot`` before the state loads, ``reapply`` after): the
restored optimizer / scheduler carry the old hyper-parameters, so the configured ``lr``,
``adapter_lr``, ``betas``, ``eps`` and ``weight_decay`` are put back, each group's LR is the schedule
at the restored step on the configured base, and every change is printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from train.config import Config, ConfigError, config_to_dict

_HYPER = ("betas", "eps", "weight_decay")
_WHY = {
    "lora.rank": "the checkpoint's LoRA factors have the saved rank",
    "lora.targets": "the checkpoint holds factors for the saved target layers",
    "lora.train_adapters": "the trainable set and its optimizer state would differ from the checkpoint's",
    "lora.alpha": "the factors were trained at scale alpha/rank: another alpha would rescale what was learnt",
    "optim.name": "the optimizer state in the checkpoint belongs to the saved optimizer",
    "train.micro_batch_size": "the saved data position counts batches of the saved size",
}


def _get(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return KeyError
        tree = tree[part]
    return tree


def _lora_scale(lora: dict) -> float | None:
    try:
        return float(lora.get("alpha") or lora["rank"]) / float(lora["rank"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def refusals(saved: dict, cfg: Config) -> list[str]:
    """``key (old -> new)`` for every changed key a resume cannot apply."""
    now = config_to_dict(cfg)
    keys = ["optim.name", "train.micro_batch_size"]
    if cfg.train.mode == "lora":
        keys = ["lora.rank", "lora.targets", "lora.train_adapters", *keys]
    out = [key for key in keys if _get(saved, key) is not KeyError and _get(saved, key) != _get(now, key)]
    if cfg.train.mode == "lora" and "lora.rank" not in out:  # alpha: its effect, alpha/rank (null alpha = rank)
        old, new = _lora_scale(saved.get("lora") or {}), _lora_scale(now["lora"])
        if old is not None and abs(old - new) > 1e-12 * max(abs(old), 1.0):
            out.append("lora.alpha")
    return [f"{k} ({_get(saved, k)} -> {_get(now, k)}: {_WHY[k]})" for k in out]


def check_resume_settings(cfg: Config, saved: dict | None) -> None:
    """``ConfigError`` (one line) when the resume changes a key it cannot apply; ``saved`` is the
    run's ``config.json`` (None: unknown, nothing to compare)."""
    if not isinstance(saved, dict):
        return
    refused = refusals(saved, cfg)
    if refused:
        raise ConfigError(
            f"train.output_dir={Path(cfg.train.output_dir)} is resumed with settings its checkpoint cannot follow: "
            f"{'; '.join(refused)}. Resume with the saved values, or start a new train.output_dir (lora.init_from=<its "
            "export/lora.safetensors> continues from the trained LoRA).")


def snapshot(optimizer, scheduler) -> dict[str, list]:
    """The configured hyper-parameters, taken before a checkpoint's state overwrites them."""
    return {"base_lrs": list(scheduler.base_lrs),
            "groups": [{k: g[k] for k in _HYPER if k in g} for g in optimizer.param_groups]}


def _same(a, b) -> bool:
    return tuple(a) == tuple(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b


def reapply(configured: dict[str, list], optimizer, scheduler, main: bool = True) -> list[str]:
    """After loading: the configured values win; returns (and rank 0 prints) what changed."""
    changes = []
    groups = optimizer.param_groups
    for i, (group, want, old_base, base) in enumerate(
            zip(groups, configured["groups"], scheduler.base_lrs, configured["base_lrs"])):
        name = group.get("name", f"group {i}")
        if old_base != base:
            changes.append(f"{name} lr {old_base:g} -> {base:g}")
        for key, value in want.items():
            if not _same(group[key], value):
                changes.append(f"{name} {key} {group[key]} -> {value}")
                group[key] = value
        group["initial_lr"] = base
    scheduler.base_lrs = list(configured["base_lrs"])
    lrs = [base * factor(scheduler.last_epoch) for factor, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, lr in zip(groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports until the next step
    if changes and main:
        print(f"[train] resume: optimizer settings from this launch applied over the checkpoint's: "
              f"{'; '.join(changes)} (LR now {lrs[0]:g} at scheduler step {scheduler.last_epoch})", flush=True)
    return changes
