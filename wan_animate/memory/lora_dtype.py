"""LoRA in the compute dtype.

peft's ``lora.Linear.forward`` casts the layer input to the LoRA weight dtype before ``lora_A``:
with fp32 factors over a bf16 block, an fp32 copy of every targeted activation kept for backward.
peft's documented switch ``cast_input_dtype_enabled = False`` turns that off; the factors are then
cast to the input's dtype instead (rank x width, tiny), so ``lora_A`` saves the activation the base
layer already saved. Gradients reach the fp32 factors through the cast; under autocast this is what
autocast computes anyway.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def _linear_in_input_dtype(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = layer.bias.to(x.dtype) if layer.bias is not None else None
    return F.linear(x, layer.weight.to(x.dtype), bias)


def lora_in_compute_dtype(model: nn.Module) -> int:
    """Make every peft LoRA layer of ``model`` compute in its input's dtype. Returns the layer count."""
    from peft.tuners.lora import LoraLayer

    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    for module in layers:
        module.cast_input_dtype_enabled = False
        for factor in (*module.lora_A.values(), *module.lora_B.values()):
            if isinstance(factor, nn.Linear) and not getattr(factor, "_input_dtype_forward", False):
                factor.forward = types.MethodType(_linear_in_input_dtype, factor)  # deepcopy rebinds it
                factor._input_dtype_forward = True
    return len(layers)
