"""LoRA in the compute dtype.

peft's ``lora.Linear.forward`` casts the layer input to the LoRA weight dtype before ``lora_A``
(``x = self._cast_input_dtype(x, lora_A.weight.dtype)``). With fp32 LoRA factors (fp32 master
weights) over a bf16 block that is an fp32 copy of every targeted block activation, kept for
backward without autocast, and a second bf16 copy with autocast. peft's documented switch
``cast_input_dtype_enabled = False`` (what ``peft.helpers.disable_input_dtype_casting`` sets) turns
the input cast off; the factors are then cast to the input's dtype instead (rank x width, tiny),
so ``lora_A`` saves the same activation tensor the base layer already saved. Gradients flow back
to the fp32 factors through the cast. Under autocast this is exactly what autocast computes anyway.
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
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return 0
    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        module.cast_input_dtype_enabled = False
        for factor in (*module.lora_A.values(), *module.lora_B.values()):
            if isinstance(factor, nn.Linear) and not getattr(factor, "_input_dtype_forward", False):
                factor.forward = types.MethodType(_linear_in_input_dtype, factor)  # deepcopy rebinds it
                factor._input_dtype_forward = True
        count += 1
    return count
