"""Attention layers of the DiT: the attention kernel, fp32 norms, self- and cross-attention.

Activations enter and leave these modules in the compute dtype (the dtype of the projection
weights, bf16 in training). Norms are computed in fp32 and RoPE is applied in fp32 before the
result is rounded to the compute dtype, as in the official model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wan_animate.model.norms import rms_norm
from wan_animate.model.rope import apply_rope


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a linear layer computes in, read without materialising its weight: a layer stored
    in another format says so with ``compute_dtype`` (fp8 storage), a wrapper (LoRA) through its
    ``base_layer``; a plain layer by its weight's dtype."""
    while getattr(layer, "compute_dtype", None) is None and getattr(layer, "base_layer", None) is not None:
        layer = layer.base_layer
    dtype = getattr(layer, "compute_dtype", None)
    return dtype if dtype is not None else layer.weight.dtype


# ---- Attention kernel

_BACKENDS = ("sdpa", "flash")
_backend = "sdpa"

try:  # optional; never required
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore[import-not-found]
except Exception:  # pragma: no cover - depends on the machine
    _flash_attn_func = None


def set_attention_backend(name: str) -> None:
    """Choose the attention kernel: "sdpa" (default, torch's scaled_dot_product_attention) or
    "flash" (the flash-attn package; used for fp16/bf16 CUDA tensors, SDPA otherwise)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}; choose one of {_BACKENDS}.")
    if name == "flash" and _flash_attn_func is None:
        raise ValueError(
            "attention backend 'flash' needs the flash-attn package (pip install flash-attn); "
            "it is not importable here. Use 'sdpa' (the default), which picks flash kernels itself on GPUs."
        )
    _backend = name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention without mask. q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]."""
    if _backend == "flash" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return _flash_attn_func(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)  # [B, Lq, H, D]


# ---- Norms (fp32 compute whatever the parameter dtype)


class RMSNorm(nn.Module):
    """RMSNorm with an affine weight; returns float32 (callers round to their compute dtype)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (with fp32 affine parameters); returns float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Affine-free LayerNorm over the last dim in fp32."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


def _maybe_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return norm(x) if not isinstance(norm, nn.Identity) else x.float()


# ---- Self-attention with 3D RoPE


class _QKVOAttention(nn.Module):
    """The q/k/v/o projections and q/k norms both attention kinds share (official names)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        # RMSNorm over the full width (all heads together), as the official model.
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()


class SelfAttention(_QKVOAttention):
    # The kernel over the whole sequence; sequence parallelism (wan_animate.parallel) sets a
    # per-instance one that exchanges heads for tokens around it. Same signature as ``attention``.
    attention_fn = staticmethod(attention)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, dim] -> q, k (normed, before RoPE, fp32), v (compute dtype), each [B, L, H, D]."""
        heads = (self.num_heads, -1)
        q = _maybe_norm(self.norm_q, self.q(x)).unflatten(-1, heads)
        k = _maybe_norm(self.norm_k, self.k(x)).unflatten(-1, heads)
        return q, k, self.v(x).unflatten(-1, heads)

    def forward(self, x: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim] (compute dtype) -> [B, L, dim] (compute dtype)."""
        dtype = x.dtype
        q, k, v = self.project(x)
        q, k = apply_rope(q, rope_cos, rope_sin), apply_rope(k, rope_cos, rope_sin)
        out = self.attention_fn(q.to(dtype), k.to(dtype), v)
        return self.o(out.flatten(2))


# ---- Cross-attention to text tokens and CLIP image tokens


class CrossAttention(_QKVOAttention):
    """Attends separately to text tokens (q/k/v) and image tokens (k_img/v_img); the two results
    are summed before the output projection."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__(dim, num_heads, qk_norm, eps)
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_k_img = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim], text [B, L_text, dim], image [B, L_img, dim] -> [B, L, dim]."""
        dtype = x.dtype
        heads = (self.num_heads, -1)
        q = _maybe_norm(self.norm_q, self.q(x)).to(dtype).unflatten(-1, heads)
        k = _maybe_norm(self.norm_k, self.k(text)).to(dtype).unflatten(-1, heads)
        v = self.v(text).unflatten(-1, heads)
        k_img = _maybe_norm(self.norm_k_img, self.k_img(image)).to(dtype).unflatten(-1, heads)
        v_img = self.v_img(image).unflatten(-1, heads)
        out = attention(q, k, v) + attention(q, k_img, v_img)  # [B, L, H, D]
        return self.o(out.flatten(2))
