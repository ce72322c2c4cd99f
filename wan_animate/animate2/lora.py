"""Animate-2 LoRA files in diffusers' layout, for ``WanAnimate2Transformer3DModel.load_lora_adapter``.

Training writes the community layout (``diffusion_model.blocks.N.block.self_attn.q.lora_A.weight``,
official module names; ``wan_animate.lora``), which this project, ComfyUI and the official code
read. diffusers 0.42.1 has no LoRA loader that converts Animate-2's official names, so an
Animate-2 LoRA export also writes the diffusers layout::

    transformer.blocks.N.self_attn.to_q.lora_A.weight   [rank, in_features]
    transformer.blocks.N.self_attn.to_q.lora_B.weight   [out_features, rank]

with the peft ``LoraConfig`` (rank, alpha, target modules; keys under ``transformer.``) in the
safetensors metadata ``lora_adapter_metadata``, where ``load_lora_adapter`` reads it (so alpha !=
rank is kept):

    transformer = WanAnimate2Transformer3DModel.from_pretrained(folder, subfolder="transformer")
    transformer.load_lora_adapter("export", weight_name="lora_diffusers.safetensors", prefix="transformer")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from wan_animate.animate2.keymap import official_to_diffusers
from wan_animate.lora import read_lora
from wan_animate.weights.files import save_safetensors

PREFIX = "transformer."
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


def diffusers_module_name(official: str) -> str:
    """``blocks.N.block.self_attn.q`` -> ``blocks.N.self_attn.to_q`` (through the weight-name map)."""
    (name,) = official_to_diffusers({f"{official}.weight": None}).keys()
    return name[: -len(".weight")]


def diffusers_lora_state(path_or_state: str | Path | Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """A community-layout LoRA (file or state dict) -> (diffusers-named tensors with ``PREFIX``,
    the peft ``LoraConfig`` dict). One rank and one alpha over all modules (what training writes)."""
    factors = read_lora(path_or_state)  # official module name -> (A, B, alpha or None)
    tensors, ranks, alphas, modules = {}, set(), set(), []
    for official, (a, b, alpha) in sorted(factors.items()):
        name = diffusers_module_name(official)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous()
        ranks.add(int(a.shape[0]))
        alphas.add(float(alpha) if alpha is not None else float(a.shape[0]))
        modules.append(name)
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"a diffusers LoRA config holds one rank and one alpha; this LoRA has ranks {sorted(ranks)} "
                         f"and alphas {sorted(alphas)}")
    config = {"r": ranks.pop(), "lora_alpha": alphas.pop(), "target_modules": modules}
    return tensors, config


def save_diffusers_lora(path_or_state, path: str | Path) -> Path:
    """Write the diffusers-layout file of a community-layout LoRA; returns its path."""
    tensors, config = diffusers_lora_state(path_or_state)
    # diffusers keys the config by the component prefix, as its pipelines' save_lora_weights do
    packed = {f"{PREFIX}{k}": v for k, v in config.items()}
    return save_safetensors(tensors, path, metadata={"format": "pt", METADATA_KEY: json.dumps(packed)})
