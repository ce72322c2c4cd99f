"""End-of-run exports under ``<output_dir>/export/``: the DiT in the requested layouts, the LoRA
community file, and the EMA variant (when ``optim.ema_decay > 0``)."""

from __future__ import annotations

from pathlib import Path

import torch

from train.config import Config

_DESCRIBE = {  # name under export/ (or export/ema/) -> what it is
    "official": "DiT in the Wan-AI/Wan2.2-Animate-14B layout (wan_animate.checkpoint.load_dit)",
    "diffusers": "WanAnimateTransformer3DModel.from_pretrained folder",
    "lora.safetensors": "community LoRA layout (diffusers load_lora_weights, ComfyUI, eval.generate --lora)",
    "adapters.safetensors": "trained pose/face adapter weights, official names",
}


def readme_text(out: Path, written: dict[str, str]) -> str:
    """``export/README.txt``: one line per file or folder this export wrote, nothing else."""
    lines = []
    for path in sorted(set(written.values())):
        rel = Path(path).relative_to(out)
        ema = rel.parts[0] == "ema" and len(rel.parts) > 1
        desc = _DESCRIBE.get(Path(*rel.parts[1:]).as_posix() if ema else rel.as_posix(), "")
        if ema:
            desc = f"EMA of the trained weights (optim.ema_decay): {desc}"
        lines.append(f"{rel.as_posix()}{'/' if Path(path).is_dir() else ''} : {desc}")
    return "".join(line + "\n" for line in lines)


class _StateHolder:
    """Minimal object ``save_dit`` accepts: a state dict and the config."""

    def __init__(self, state: dict[str, torch.Tensor], config):
        self._state, self.config = state, config

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def _lora_alpha(cfg: Config) -> float:
    return float(cfg.lora.alpha if cfg.lora.alpha is not None else cfg.lora.rank)


def export(cfg: Config, acc, model, raw_dit, ema: dict[str, torch.Tensor] | None) -> dict[str, str]:
    """Collective (the state gather is, under ZeRO-3); rank 0 writes. ``ema``: name -> fp32 tensor
    of the trainable parameters (``train.state.EMA.state_dict()``). Returns what was written.

    ``lora`` / ``adapters_only``: only the trained tensors are gathered and written (small files);
    the merged full model only with ``train.export_merged`` (``train.checkpoint.export_trainable``)."""
    from train.checkpoint.export_trainable import trainable_state, write_trainable_only
    from train.checkpoint.trainable import is_trainable_only

    written: dict[str, str] = {}
    if is_trainable_only(cfg.train.mode):
        state = acc.get_state_dict(model) if cfg.train.export_merged else trainable_state(acc, model)
        if acc.is_main_process:
            written = write_trainable_only(cfg, raw_dit, state, ema)
            out = Path(cfg.train.output_dir) / "export"
            (out / "README.txt").write_text(readme_text(out, written))
        acc.wait_for_everyone()
        return written
    state = acc.get_state_dict(model)
    if acc.is_main_process:
        written = _write(cfg, raw_dit.config, state, ema)
    acc.wait_for_everyone()
    return written


def _write(cfg: Config, dit_config, state: dict[str, torch.Tensor], ema) -> dict[str, str]:
    from wan_animate.checkpoint import save_dit
    from wan_animate.lora import save_lora, strip_lora_state_dict

    out = Path(cfg.train.output_dir) / "export"
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    meta = {"train_mode": cfg.train.mode, "experiment": str(cfg.experiment_name)}
    base = {k: v.detach().float().cpu() for k, v in strip_lora_state_dict(state).items()}
    if cfg.train.mode != "lora" or cfg.lora.train_adapters:
        for layout in cfg.train.export_layouts:
            save_dit(_StateHolder(base, dit_config), out / layout, layout=layout, metadata=meta)
            written[layout] = str(out / layout)
    if cfg.train.mode == "lora":
        lora_state = {k: v for k, v in state.items() if ".lora_" in k}
        save_lora(lora_state, out / "lora.safetensors", alpha=_lora_alpha(cfg),
                  metadata={"rank": cfg.lora.rank, "alpha": _lora_alpha(cfg), "train_mode": "lora"})
        written["lora"] = str(out / "lora.safetensors")
    if ema is not None:
        # EMA of the trained tensors on top of the final frozen ones (peft names -> plain names)
        ema_state = dict(base)
        for name, value in ema.items():
            if ".lora_" not in name:
                ema_state[name.replace(".base_layer.", ".")] = value
        save_dit(_StateHolder(ema_state, dit_config), out / "ema" / "official", layout="official",
                 metadata={**meta, "ema_decay": str(cfg.optim.ema_decay)})
        written["ema"] = str(out / "ema" / "official")
        ema_lora = {k: v for k, v in ema.items() if ".lora_" in k}
        if cfg.train.mode == "lora" and ema_lora:
            save_lora(ema_lora, out / "ema" / "lora.safetensors", alpha=_lora_alpha(cfg))
            written["ema/lora"] = str(out / "ema" / "lora.safetensors")
    (out / "README.txt").write_text(readme_text(out, written))
    return written
