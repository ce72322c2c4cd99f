"""Face encoder (motion vectors -> per-latent-frame face tokens) and the face adapter blocks.

Face encoder: causal temporal convs turn the per-pixel-frame motion vectors ``[B, F, C]`` into
``num_heads`` token streams at latent frame rate (two stride-2 convs: 77 -> 39 -> 20), projects them
to the model width and appends a learned padding token: ``[B, T, num_heads + 1, dim]``.

Face adapter: after every ``face_adapter_period``-th DiT block, a cross-attention residual where the
video tokens of each latent frame attend only to that frame's face tokens (batched by folding the
frame axis into the batch: ``[B*T, H*W, ...]`` queries vs ``[B*T, N, ...]`` keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wan_animate.config import WanAnimateConfig
from wan_animate.model.attention import RMSNorm, attention, compute_dtype, layer_norm

# ---- Face encoder

# The released face encoder uses eps 1e-6 for its LayerNorms regardless of the trunk's eps.
_FACE_ENCODER_EPS = 1e-6


class CausalConv1d(nn.Module):
    """Conv1d over time with replicate padding on the left only (output t sees inputs <= t)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.left_pad = kernel_size - 1
        self.conv = nn.Conv1d(in_ch, out_ch, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, T] -> [B, C_out, T_out]."""
        return self.conv(F.pad(x, (self.left_pad, 0), mode="replicate"))


class FaceEncoder(nn.Module):
    def __init__(self, config: WanAnimateConfig):
        super().__init__()
        hidden = config.face_encoder_hidden_dim
        self.num_heads = config.face_encoder_num_heads
        self.conv1_local = CausalConv1d(config.motion_encoder_dim, hidden * self.num_heads, 3)
        self.conv2 = CausalConv1d(hidden, hidden, 3, stride=2)
        self.conv3 = CausalConv1d(hidden, hidden, 3, stride=2)
        self.out_proj = nn.Linear(hidden, config.dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, config.dim))

    @staticmethod
    def num_latent_frames(num_pixel_frames: int) -> int:
        """Frames left after the two stride-2 causal convs (77 -> 39 -> 20): (n - 1) // 2 + 1, twice."""
        return (num_pixel_frames - 1) // 4 + 1

    def forward(self, motion: torch.Tensor) -> torch.Tensor:
        """motion [B, F, motion_encoder_dim] -> face tokens [B, T, num_heads + 1, dim]."""
        batch = motion.shape[0]
        dtype = self.out_proj.weight.dtype

        def norm_act(h: torch.Tensor) -> torch.Tensor:  # [N, C, T] -> [N, T, C]
            return F.silu(layer_norm(h.transpose(1, 2), _FACE_ENCODER_EPS)).to(dtype)

        h = self.conv1_local(motion.to(dtype).transpose(1, 2))  # [B, heads*hidden, F]
        h = h.unflatten(1, (self.num_heads, -1)).flatten(0, 1)  # [B*heads, hidden, F]
        h = norm_act(h)
        h = norm_act(self.conv2(h.transpose(1, 2)))  # [B*heads, T', hidden]
        h = norm_act(self.conv3(h.transpose(1, 2)))  # [B*heads, T, hidden]
        h = self.out_proj(h)  # [B*heads, T, dim]
        h = h.unflatten(0, (batch, self.num_heads)).transpose(1, 2)  # [B, T, heads, dim]
        pad = self.padding_tokens.to(dtype).expand(batch, h.shape[1], 1, -1)
        return torch.cat([h, pad], dim=2)  # [B, T, heads + 1, dim]


# ---- Face adapter


class FaceBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.eps = eps
        head_dim = dim // num_heads
        self.linear1_kv = nn.Linear(dim, 2 * dim)  # k and v packed along the output dim (k first)
        self.linear1_q = nn.Linear(dim, dim)
        self.linear2 = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(head_dim, eps)  # per head
        self.k_norm = RMSNorm(head_dim, eps)

    def forward(self, x: torch.Tensor, face_tokens: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim] (fp32 residual), face_tokens [B, T, N, dim] -> update [B, L, dim].

        L must be T * (tokens per latent frame); each frame's tokens attend to its N face tokens.
        """
        dtype = compute_dtype(self.linear1_q)
        batch, frames, n_face, _ = face_tokens.shape
        q = self.linear1_q(layer_norm(x, self.eps).to(dtype)).unflatten(-1, (self.num_heads, -1))
        kv = self.linear1_kv(layer_norm(face_tokens, self.eps).to(dtype))
        k, v = kv.unflatten(-1, (2, self.num_heads, -1)).unbind(-3)  # each [B, T, N, H, D]
        q = self.q_norm(q).to(dtype).unflatten(1, (frames, -1)).flatten(0, 1)  # [B*T, HW, H, D]
        k = self.k_norm(k).to(dtype).flatten(0, 1)  # [B*T, N, H, D]
        v = v.flatten(0, 1)
        out = attention(q, k, v)  # [B*T, HW, H, D]
        out = out.unflatten(0, (batch, frames)).flatten(1, 2).flatten(2)  # [B, L, dim]
        return self.linear2(out)


class FaceAdapter(nn.Module):
    def __init__(self, config: WanAnimateConfig):
        super().__init__()
        self.fuser_blocks = nn.ModuleList(
            [FaceBlock(config.dim, config.num_heads, config.eps) for _ in range(config.num_face_blocks)]
        )
