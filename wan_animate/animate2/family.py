"""Wan-Animate-2 as a model family (``wan_animate.family``): ``model.family=animate2``.

* the model: ``Animate2Config`` presets (``14b``, ``tiny``), ``Animate2DiT``, the official file /
  folder and the diffusers folder (``wan_animate.animate2.weights``), ``Animate2Pipeline``;
* its data: one driving stream, ``driving.mp4`` (shard schema version 2), cropped like the target
  clip; batches from ``wan_animate.animate2.batch`` (generation + driving streams);
* its loss input: ``predict`` runs the joint pass (both streams through each block, so activation
  checkpointing, block swap and fp8 base weights act per block on both passes, and gradients reach
  the driving stream); the loss is the shared one over the generation stream's target frames;
* what trains: no adapters; default LoRA targets = each block's self-attention q, k, v, o;
  ``train.mode=self_attn`` trains the self-attention weights (``self_attention``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from wan_animate.family import FamilyBase

# official names: blocks.N.block.self_attn.{q,k,v,o}
SELF_ATTN_LORA_TARGETS = (r"blocks\.\d+\.block\.self_attn\.(q|k|v|o)",)
_A2 = "wan_animate.animate2."


class Animate2Family(FamilyBase):
    """Wan-Animate-2: the raw driving video attended in context (no pose / face streams)."""

    name = "animate2"
    streams = {"driving": None}  # driving.mp4, cropped like the target clip
    conditions = {"driving": ("driving", "clip_ref"), "ref": ("clip_fea",)}
    lora_targets = SELF_ATTN_LORA_TARGETS
    # parameters ``train.mode=self_attn`` trains: q, k, v, o and the q / k norms of each block
    self_attention = r"blocks\.\d+\.block\.self_attn\."
    _presets, _config_class = _A2 + "config:PRESETS", _A2 + "config:Animate2Config"
    _read_config, _model = _A2 + "weights:config_from_dict", _A2 + "model:Animate2DiT"
    _pipeline = _A2 + "pipeline:Animate2Pipeline"
    _load, _save = _A2 + "weights:load_animate2", _A2 + "weights:save_animate2"
    _convert, _inspect = _A2 + "weights:convert_animate2", _A2 + "weights:inspect_animate2"
    _sequence_parallel = _A2 + "parallel:apply_sequence_parallel"
    _build_inputs, _predict = _A2 + "batch:build_inputs", _A2 + "batch:predict"

    def owns(self, names: Iterable[str]) -> bool:
        from wan_animate.animate2.keymap import is_animate2_names
        from wan_animate.weights.source import detect_layout

        names = list(names)
        return is_animate2_names(names, detect_layout(names)[0] if names else "")

    def export_lora(self, lora_file: Path) -> dict[str, str]:
        """The diffusers-layout copy (``WanAnimate2Transformer3DModel.load_lora_adapter`` reads it)."""
        from wan_animate.animate2.lora import save_diffusers_lora

        path = Path(lora_file).with_name(Path(lora_file).stem + "_diffusers.safetensors")
        save_diffusers_lora(lora_file, path)
        return {"lora_diffusers": str(path)}


ANIMATE2 = Animate2Family()
