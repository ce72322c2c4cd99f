"""DiT transformer block, output head and the CLIP image-token projection.

The residual stream ``x`` is float32 everywhere; adaLN modulation is computed in fp32 from the
per-block learned table plus the time projection; sub-layers run in the compute dtype (the dtype
of their weights) and their outputs are added back in fp32. This is the official model's
precision recipe (diffusers' port instead rounds the residual stream to the model dtype).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from wan_animate.config import WanAnimateConfig
from wan_animate.model.attention import CrossAttention, FP32LayerNorm, SelfAttention, compute_dtype
from wan_animate.model.norms import modulated_layer_norm

# ---- Transformer block


class DiTBlock(nn.Module):
    def __init__(self, config: WanAnimateConfig):
        super().__init__()
        dim = config.dim
        self.eps = config.eps
        # norm1 (before self-attention) and norm2 (before the FFN) are affine-free LayerNorms and
        # have no parameters; norm3 (before cross-attention) is affine. Names follow the official model.
        self.self_attn = SelfAttention(dim, config.num_heads, config.qk_norm, config.eps)
        self.norm3 = (
            FP32LayerNorm(dim, eps=config.eps, elementwise_affine=True)
            if config.cross_attn_norm
            else nn.Identity()
        )
        self.cross_attn = CrossAttention(dim, config.num_heads, config.qk_norm, config.eps)
        self.ffn = nn.Sequential(
            nn.Linear(dim, config.ffn_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(config.ffn_dim, dim),
        )
        # Learned adaLN offsets added to the time projection: shift, scale, gate (self-attention),
        # shift, scale, gate (FFN). Kept in fp32 by set_precision.
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        time_mod: torch.Tensor,
        text: torch.Tensor,
        image: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, L, dim] fp32, time_mod [B, 6, dim] fp32, text/image tokens [B, *, dim] -> x fp32."""
        return self.run(x, time_mod, text, image, lambda h: self.self_attn(h, rope_cos, rope_sin))

    def run(
        self,
        x: torch.Tensor,
        time_mod: torch.Tensor,
        text: torch.Tensor,
        image: torch.Tensor,
        self_attention: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The block with another self-attention: ``self_attention(h)`` maps the modulated, normed
        stream [B, L, dim] (compute dtype) to the update [B, L, dim] before its gate (Animate-2's
        driving and in-context attentions use this)."""
        dtype = compute_dtype(self.ffn[0])
        shift, scale, gate, ffn_shift, ffn_scale, ffn_gate = (
            self.modulation.float() + time_mod
        ).chunk(6, dim=1)  # each [B, 1, dim]

        h = modulated_layer_norm(x, scale, shift, self.eps, dtype)
        # addcmul promotes the compute-dtype update to fp32 inside one kernel (no fp32 copy kept)
        x = torch.addcmul(x, self_attention(h), gate)

        h = self.norm3(x).to(dtype) if not isinstance(self.norm3, nn.Identity) else x.to(dtype)
        x = x + self.cross_attn(h, text, image)  # fp32 + compute dtype -> fp32

        h = modulated_layer_norm(x, ffn_scale, ffn_shift, self.eps, dtype)
        x = torch.addcmul(x, self.ffn(h), ffn_gate)
        return x


# ---- Output head


class Head(nn.Module):
    """Modulated affine-free LayerNorm, then Linear(dim -> out_dim * prod(patch)); fp32 by design."""

    def __init__(self, config: WanAnimateConfig):
        super().__init__()
        self.eps = config.eps
        dim = config.dim
        self.head = nn.Linear(dim, config.out_dim * math.prod(config.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim] fp32, time_emb [B, dim] fp32 -> [B, L, out_dim * prod(patch)] fp32."""
        shift, scale = (self.modulation.float() + time_emb.float().unsqueeze(1)).chunk(2, dim=1)
        h = modulated_layer_norm(x, scale, shift, self.eps, self.head.weight.dtype)
        with torch.autocast(x.device.type, enabled=False):  # fp32 also inside a bf16 autocast region
            return self.head(h).float()


# ---- CLIP image tokens -> model width


class ImageEmbedding(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear -> LayerNorm (names ``proj.{0,1,3,4}``)."""

    def __init__(self, image_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            FP32LayerNorm(image_dim),
            nn.Linear(image_dim, image_dim),
            nn.GELU(),
            nn.Linear(image_dim, dim),
            FP32LayerNorm(dim),
        )

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        """clip_fea [B, L_img, image_dim] -> [B, L_img, dim] in the compute dtype."""
        norm_in, fc1, act, fc2, norm_out = self.proj
        dtype = fc1.weight.dtype
        h = fc2(act(fc1(norm_in(clip_fea).to(dtype))))
        return norm_out(h).to(dtype)
