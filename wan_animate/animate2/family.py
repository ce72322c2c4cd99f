"""Wan-Animate-2 as a model family (``wan_animate.family``): ``model.family=animate2``.

What the trainer, the memory planner, validation and eval need to know about Animate-2:

* the model: ``Animate2Config`` presets (``14b``, ``tiny``), ``Animate2DiT``, loading the official
  file / folder and the diffusers folder (``wan_animate.animate2.weights``), ``Animate2Pipeline``;
* its data: one driving stream, ``driving.mp4`` (shard schema version 2), cropped like the target
  clip; batches from ``wan_animate.animate2.batch`` (generation + driving streams);
* its loss input: ``predict`` runs the joint pass (both streams through each block, so activation
  checkpointing, block swap and fp8 base weights act per block on both passes, and gradients reach
  the driving stream); the flow-matching loss is the shared one, over the generation stream's
  target frames (the reference-image slot is dropped, as for Wan-Animate-14B; docs/animate2.md);
* what trains: no adapters; default LoRA targets = each block's self-attention q, k, v, o;
  ``train.mode=self_attn`` trains the self-attention weights (``self_attention``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

# official names: blocks.N.block.self_attn.{q,k,v,o}
SELF_ATTN_LORA_TARGETS = (r"blocks\.\d+\.block\.self_attn\.(q|k|v|o)",)


class Animate2Family:
    """Wan-Animate-2: the raw driving video attended in context (no pose / face streams)."""

    name = "animate2"
    streams = {"driving": None}  # driving.mp4, cropped like the target clip
    adapter_prefixes: tuple[str, ...] = ()
    lora_targets = SELF_ATTN_LORA_TARGETS
    # parameters ``train.mode=self_attn`` trains: q, k, v, o and the q / k norms of each block
    self_attention = r"blocks\.\d+\.block\.self_attn\."

    @property
    def presets(self) -> tuple[str, ...]:
        from wan_animate.animate2.config import PRESETS

        return tuple(PRESETS)

    @property
    def pipeline_class(self) -> type:
        from wan_animate.animate2.pipeline import Animate2Pipeline

        return Animate2Pipeline

    def config(self, preset: str | None = None, folder: str | Path | None = None):
        from wan_animate.animate2.config import Animate2Config
        from wan_animate.animate2.weights import config_from_dict

        for sub in ("config.json", "transformer/config.json"):
            f = Path(folder) / sub if folder else None
            if f is not None and f.is_file():
                return config_from_dict(json.loads(f.read_text())), str(f)
        if preset is None:
            raise ValueError(f"{folder}: no config.json (or transformer/config.json) and no preset given.")
        return Animate2Config.preset(preset), f"preset {preset!r}"

    def build(self, config) -> nn.Module:
        from wan_animate.animate2.model import Animate2DiT

        return Animate2DiT(config)

    def owns(self, names: Iterable[str]) -> bool:
        from wan_animate.animate2.keymap import is_animate2_names
        from wan_animate.weights.source import detect_layout

        names = list(names)
        return is_animate2_names(names, detect_layout(names)[0] if names else "")

    def dit_path(self, model_folder: str | Path) -> Path:
        folder = Path(model_folder)
        return folder / "transformer" if self.pipeline_class.detect_layout(folder) == "diffusers" else folder

    def load(self, path, *, dtype, device, config=None) -> nn.Module:
        from wan_animate.animate2.weights import load_animate2

        return load_animate2(path, dtype=dtype, device=device, config=config)

    def set_precision(self, model, dtype):
        from wan_animate.model import set_precision

        return set_precision(model, dtype)

    def save(self, model, path, *, layout, metadata=None, config=None):
        from wan_animate.animate2.weights import save_animate2

        return save_animate2(model, path, layout=layout, metadata=metadata, config=config)

    def export_lora(self, lora_file: Path) -> dict[str, str]:
        """The diffusers-layout copy (``WanAnimate2Transformer3DModel.load_lora_adapter`` reads it)."""
        from wan_animate.animate2.lora import save_diffusers_lora

        path = Path(lora_file).with_name(Path(lora_file).stem + "_diffusers.safetensors")
        save_diffusers_lora(lora_file, path)
        return {"lora_diffusers": str(path)}

    def apply_sequence_parallel(self, model, group):
        from wan_animate.animate2.parallel import apply_sequence_parallel

        return apply_sequence_parallel(model, group)

    def stream_sizes(self, config) -> dict[str, int | None]:
        return dict(self.streams)

    def build_inputs(self, examples, encoders, device, dtype, clip_len) -> dict[str, Any]:
        from wan_animate.animate2.batch import build_inputs

        return build_inputs(examples, encoders, device, dtype, clip_len)

    def predict(self, model, noisy: torch.Tensor, timesteps: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        from wan_animate.animate2.batch import predict

        return predict(model, noisy, timesteps, batch)


ANIMATE2 = Animate2Family()
