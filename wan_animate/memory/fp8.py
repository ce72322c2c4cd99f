"""fp8 storage of frozen linear weights: ``float8_e4m3fn`` with one fp32 scale per output channel.

``FP8Linear`` replaces a frozen ``nn.Linear`` (or the ``base_layer`` of a peft LoRA layer, so LoRA
composes unchanged): ``weight_fp8 = round_e4m3(W / s)``, ``s = max|W_row| / 448``, dequantized at
use in the original weight dtype. The autograd function keeps only the fp8 weight for backward.
Half the bytes of bf16; the error is measured in docs/memory.md, and a dequantized weight is *not*
the original (keep the base model folder as the source of truth).

Its state dict looks like the plain layer's (``weight`` dequantized, ``bias``), so exports need no
special case, and loading re-quantizes. Inside ``stored_state_dict()`` it holds the stored tensors
(``weight_fp8``, ``weight_scale``): trainable-only checkpoints would otherwise dequantize the whole
frozen model on every save. The model reads a layer's compute dtype from ``compute_dtype``
(``wan_animate.model.attention``), never through ``.weight``, which dequantizes.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] weight -> (float8_e4m3fn [out, in], fp32 scale [out]); per-output-channel absmax."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    w8 = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return w8, scale


def dequantize_fp8(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 weight * per-row scale in ``dtype`` (e4m3 values are exact in bf16/fp16/fp32)."""
    return w8.to(dtype) * scale.to(dtype)[:, None]


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w8, scale, bias, dtype):
        ctx.save_for_backward(w8, scale)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        b = bias.to(dtype) if bias is not None else None
        return F.linear(x.to(dtype), dequantize_fp8(w8, scale, dtype), b)

    @staticmethod
    def backward(ctx, grad):
        w8, scale = ctx.saved_tensors
        grad_x = grad.to(ctx.dtype) @ dequantize_fp8(w8, scale, ctx.dtype)
        return grad_x.to(ctx.x_dtype), None, None, None, None


class FP8Linear(nn.Module):
    """A frozen linear layer stored in fp8 (see the module docstring)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if not _frozen(linear):
            raise ValueError("FP8Linear stores frozen weights only; this linear layer is trainable.")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        w8, scale = quantize_fp8(linear.weight)
        self.weight_fp8 = nn.Parameter(w8, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.bias = linear.bias  # the same frozen parameter (or None)
        self.register_state_dict_post_hook(_state_dict_as_plain)
        self.register_load_state_dict_pre_hook(_load_plain_state_dict)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (compute dtype); the model reads ``.weight.dtype`` for its compute dtype."""
        return dequantize_fp8(self.weight_fp8, self.weight_scale, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FP8LinearFunction.apply(x, self.weight_fp8, self.weight_scale, self.bias, self.compute_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, storage=float8_e4m3fn, compute_dtype={self.compute_dtype}")


_stored_state = 0  # > 0 inside stored_state_dict()


@contextlib.contextmanager
def stored_state_dict() -> Iterator[None]:
    """Within: ``FP8Linear`` state dicts hold ``weight_fp8`` / ``weight_scale`` as stored."""
    global _stored_state
    _stored_state += 1
    try:
        yield
    finally:
        _stored_state -= 1


def _state_dict_as_plain(module: FP8Linear, state_dict, prefix, local_metadata) -> None:
    if _stored_state:
        return
    w8 = state_dict.pop(prefix + "weight_fp8")
    scale = state_dict.pop(prefix + "weight_scale")
    state_dict[prefix + "weight"] = dequantize_fp8(w8, scale, module.compute_dtype)


def _load_plain_state_dict(module: FP8Linear, state_dict, prefix, *args) -> None:
    key = prefix + "weight"
    if key in state_dict:
        w8, scale = quantize_fp8(state_dict.pop(key))
        state_dict[prefix + "weight_fp8"] = w8
        state_dict[prefix + "weight_scale"] = scale


def _frozen(linear: nn.Linear) -> bool:
    return not any(p.requires_grad for p in linear.parameters(recurse=False))


def quantize_frozen_linears(model: nn.Module, prefixes: tuple[str, ...] = ("blocks.", "face_adapter.")) -> list[str]:
    """Replace every frozen ``nn.Linear`` under ``prefixes`` (the DiT blocks and face blocks; peft
    base layers included) by an ``FP8Linear``, in place; returns their names."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
             and name.startswith(prefixes) and ".lora_" not in name and _frozen(module)]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, FP8Linear(getattr(parent, attr)))
    return names
