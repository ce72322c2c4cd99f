"""Exports of ``train.mode=lora|adapters_only``: the small files, and the merged model on request.

* ``lora.safetensors``: the LoRA factors in the community layout (``wan_animate.lora.save_lora``);
* ``adapters.safetensors``: the trained pose/face adapter tensors under their official names, in
  the dtype they trained in (a few hundred MB at 14B);
* with ``train.export_merged=true`` only: the full DiT with the LoRA merged into its base weights
  and the trained adapters, in ``train.export_layouts``, in the released dtype (bf16, the
  fp32-by-design tensors in fp32: ``wan_animate.model.set_precision``'s rule). The frozen weights
  are never written in fp32, and only one merged tensor at a time is computed in fp32.

An EMA run writes the same files from the averages under ``export/ema/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from train.config import Config
from train.modes import is_adapter


def trainable_state(acc, model) -> dict[str, torch.Tensor]:
    """Collective: name -> CPU copy of every trainable parameter of the prepared ``model`` (gathered
    from the ranks' partitions under ZeRO-3)."""
    from train.parallel import zero_stage

    raw = acc.unwrap_model(model)
    named = [(n, p) for n, p in raw.named_parameters() if p.requires_grad]
    if zero_stage(acc) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in named}
    return {n: p.detach().cpu().clone() for n, p in named}


def _alpha(cfg: Config) -> float:
    return float(cfg.lora.alpha if cfg.lora.alpha is not None else cfg.lora.rank)


def _adapter_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trained adapter tensors under official names (a LoRA-wrapped adapter linear stores its
    weight under ``.base_layer.``)."""
    from wan_animate.lora import is_lora_key

    return {k.replace(".base_layer.", "."): v for k, v in state.items() if is_adapter(k) and not is_lora_key(k)}


def _lora_scalings(raw_dit: torch.nn.Module) -> dict[str, float]:
    """Module name -> alpha / rank of every peft LoRA layer (what a merge multiplies B @ A by)."""
    from peft.tuners.lora import LoraLayer

    from wan_animate.lora import ADAPTER_NAME

    return {name: float(m.scaling[ADAPTER_NAME]) for name, m in raw_dit.named_modules()
            if isinstance(m, LoraLayer) and ADAPTER_NAME in m.scaling}


@torch.no_grad()
def merged_state(state: Mapping[str, torch.Tensor], scalings: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Plain official-named DiT state from a peft-wrapped one: ``W + scaling * B @ A`` for every LoRA
    layer, every tensor in the released dtype (bf16 except the fp32-by-design ones)."""
    from wan_animate.lora import ADAPTER_NAME, is_lora_key
    from wan_animate.model import is_fp32_by_design

    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if is_lora_key(key):
            continue
        name = key.replace(".base_layer.", ".")
        dtype = torch.float32 if is_fp32_by_design(name) else torch.bfloat16
        module = key[: -len(".base_layer.weight")] if key.endswith(".base_layer.weight") else None
        if module is not None and module in scalings:
            a = state[f"{module}.lora_A.{ADAPTER_NAME}.weight"].float()
            b = state[f"{module}.lora_B.{ADAPTER_NAME}.weight"].float()
            value = value.float().addmm_(b, a, alpha=scalings[module])
        out[name] = value.detach().to("cpu", dtype) if value.is_floating_point() else value.detach().cpu()
    return out


def write_trainable_only(cfg: Config, raw_dit, state: dict[str, torch.Tensor],
                         ema: dict[str, torch.Tensor] | None) -> dict[str, str]:
    """Rank 0. ``state``: the trainables (or, with ``train.export_merged``, the whole peft-wrapped
    state). Returns what was written."""
    out = Path(cfg.train.output_dir) / "export"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"train_mode": cfg.train.mode, "experiment": str(cfg.experiment_name)}
    trained = {n for n, p in raw_dit.named_parameters() if p.requires_grad}
    written = _write_small(cfg, out, {k: v for k, v in state.items() if k in trained}, meta)
    if cfg.train.export_merged:
        merged = merged_state(state, _lora_scalings(raw_dit))
        for layout in cfg.train.export_layouts:
            _save_dit(merged, raw_dit.config, out / layout, layout, {**meta, "merged": "true"})
            written[layout] = str(out / layout)
    if ema is not None:
        written.update({f"ema/{k}": v for k, v in _write_small(cfg, out / "ema", ema, meta).items()})
        if cfg.train.export_merged:
            averaged = merged_state({**state, **ema}, _lora_scalings(raw_dit))
            _save_dit(averaged, raw_dit.config, out / "ema" / "official", "official",
                      {**meta, "merged": "true", "ema_decay": str(cfg.optim.ema_decay)})
            written["ema"] = str(out / "ema" / "official")
    return written


def _write_small(cfg: Config, out: Path, state: Mapping[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, str]:
    from wan_animate.lora import save_lora
    from wan_animate.weights.files import save_safetensors

    written: dict[str, str] = {}
    lora = {k: v for k, v in state.items() if ".lora_" in k}
    if cfg.train.mode == "lora" and lora:
        save_lora(lora, out / "lora.safetensors", alpha=_alpha(cfg),
                  metadata={"rank": cfg.lora.rank, "alpha": _alpha(cfg), "train_mode": "lora"})
        written["lora"] = str(out / "lora.safetensors")
    adapters = _adapter_tensors(state)
    if adapters:
        save_safetensors(adapters, out / "adapters.safetensors", metadata={**meta, "names": "official"})
        written["adapters"] = str(out / "adapters.safetensors")
    return written


def _save_dit(state: dict[str, torch.Tensor], config, path: Path, layout: str, meta: dict[str, Any]) -> None:
    from wan_animate.checkpoint import save_dit

    save_dit(state, path, layout=layout, metadata=meta, config=config)
