"""The in-context self-attention of Animate-2's generation stream.

Layout (one segment; ``hw`` tokens per latent frame, both streams on the same spatial grid):

    queries : generation tokens, frames 0..Fg-1 (frame 0 = the reference-image slot)
    keys    : [ generation tokens (Fg * hw) | driving tokens (Fd * hw) ]

Every generation token attends to every generation token, plus the driving tokens of the aligned
frame: generation frame ``f >= 1`` sees driving frame ``f - 1`` (the reference slot sees none).
With ``log_scale != 0`` the scores of the keys of generation frame 1 (the first video frame, at key
positions ``[hw, 2 hw)``) get ``log_scale`` added (the official distilled model's score modification).

Three kernels compute exactly this (``set_incontext_backend``):

* ``"dense"``: one SDPA call with an additive mask (-inf / log_scale). No compilation, any device;
  memory O(Lq x Lk): the CPU path and the reference of the others.
* ``"split"``: two unmasked attentions (all queries x generation keys; each frame's queries x its
  driving frame, as a batch of frames) merged through their log-sum-exps. Nothing quadratic beyond
  the kernels themselves; with flash / memory-efficient kernels on a GPU it never builds the mask.
* ``"flex"``: ``flex_attention`` with a ``BlockMask`` (and a ``score_mod`` for ``log_scale``), compiled
  on CUDA (the official kernel); eager elsewhere (materialises the scores: for tests), or compiled
  for the CPU too with ``COMPILE_FLEX_ON_CPU`` (torch 2.13 compiles it; ~20 s per shape).

``"auto"`` (default): ``flex`` on CUDA, ``dense`` otherwise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["InContextLayout", "incontext_attention", "incontext_bias", "set_incontext_backend",
           "get_incontext_backend", "BACKENDS"]

BACKENDS = ("auto", "dense", "split", "flex")
_backend = "auto"
# flex on a CPU runs eagerly (no compile wait); True compiles it there too (inductor's CPU kernels)
COMPILE_FLEX_ON_CPU = False


def set_incontext_backend(name: str) -> None:
    """Choose the in-context attention kernel: one of ``BACKENDS`` (see the module docstring)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"Unknown in-context attention backend {name!r}; choose one of {BACKENDS}.")
    _backend = name


def get_incontext_backend() -> str:
    return _backend


@dataclass(frozen=True)
class InContextLayout:
    """Token counts of one in-context attention: generation frames, driving frames, tokens per frame."""

    gen_frames: int
    drv_frames: int
    hw: int

    @property
    def gen_len(self) -> int:
        return self.gen_frames * self.hw

    @property
    def drv_len(self) -> int:
        return self.drv_frames * self.hw

    @property
    def aligned_frames(self) -> int:
        """Generation frames 1..n that have a driving frame (n = min(Fg - 1, Fd))."""
        return max(0, min(self.gen_frames - 1, self.drv_frames))


# ------------------------------------------------------------------------------------------------
# dense: SDPA with an additive mask
# ------------------------------------------------------------------------------------------------


def incontext_bias(layout: InContextLayout, log_scale: float, device, dtype=torch.float32) -> torch.Tensor:
    """Additive mask [Lq, Lq + Ld]: 0 where attended, -inf where not, plus ``log_scale`` on frame 1's keys."""
    hw, lg = layout.hw, layout.gen_len
    q_frame = torch.arange(lg, device=device) // hw  # [Lq]
    drv_frame = torch.arange(layout.drv_len, device=device) // hw  # [Ld]
    allowed_drv = drv_frame[None, :] == (q_frame[:, None] - 1)  # [Lq, Ld]
    allowed = torch.cat([torch.ones(lg, lg, dtype=torch.bool, device=device), allowed_drv], dim=1)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))
    if log_scale != 0.0 and layout.gen_frames > 1:
        bias[:, hw:2 * hw] += log_scale
    return bias


def _dense(q, k, v, kd, vd, layout, log_scale):
    keys = torch.cat([k, kd], dim=1).transpose(1, 2)  # [B, H, Lq+Ld, D]
    values = torch.cat([v, vd], dim=1).transpose(1, 2)
    bias = incontext_bias(layout, log_scale, q.device, q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=bias)
    return out.transpose(1, 2)


# ------------------------------------------------------------------------------------------------
# split: unmasked attentions merged through their log-sum-exps
# ------------------------------------------------------------------------------------------------


def _attention_lse(q, k, v):
    """Unmasked attention returning (out [B, Lq, H, D], lse [B, H, Lq] fp32).

    CUDA without gradients: the fused kernels' own log-sum-exp (flash for fp16/bf16, memory-efficient
    otherwise). Else the math formulation (differentiable through both outputs).
    """
    if q.is_cuda and not torch.is_grad_enabled():
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        if q.dtype in (torch.float16, torch.bfloat16):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)[:2]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True)[:2]
        return out.transpose(1, 2), lse[..., :q.shape[1]].float()  # the fp32 kernel pads lse to 32 rows
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Lq]
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v.float())
    return out.to(q.dtype), lse


def _merge(parts):
    """Softmax-weighted merge of partial attentions [(out [B, L, H, D], lse [B, H, L]), ...]."""
    lse = torch.stack([p[1] for p in parts])  # [P, B, H, L]
    total = torch.logsumexp(lse, dim=0)  # [B, H, L]
    weights = torch.exp(lse - total).nan_to_num(0.0)  # rows a part does not reach: lse = -inf -> 0
    out = sum(p[0].float() * w.permute(0, 2, 1).unsqueeze(-1) for p, w in zip(parts, weights))
    return out


def _split(q, k, v, kd, vd, layout, log_scale):
    b, lq, h, d = q.shape
    hw, n = layout.hw, layout.aligned_frames
    parts = []
    if log_scale != 0.0 and layout.gen_frames > 1:  # frame 1's keys separately, their lse shifted
        rest = torch.cat([k[:, :hw], k[:, 2 * hw:]], dim=1), torch.cat([v[:, :hw], v[:, 2 * hw:]], dim=1)
        parts.append(_attention_lse(q, *rest))
        out_1, lse_1 = _attention_lse(q, k[:, hw:2 * hw], v[:, hw:2 * hw])
        parts.append((out_1, lse_1 + log_scale))
    else:
        parts.append(_attention_lse(q, k, v))
    if n > 0:
        # generation frames 1..n against driving frames 0..n-1, one frame per batch entry
        q_f = q[:, hw:(n + 1) * hw].reshape(b * n, hw, h, d)
        out_f, lse_f = _attention_lse(q_f, kd[:, :n * hw].reshape(b * n, hw, h, d),
                                      vd[:, :n * hw].reshape(b * n, hw, h, d))
        out_d = q.new_zeros(b, lq, h, d, dtype=out_f.dtype)
        lse_d = torch.full((b, h, lq), float("-inf"), device=q.device)
        out_d[:, hw:(n + 1) * hw] = out_f.reshape(b, n * hw, h, d)
        lse_d[:, :, hw:(n + 1) * hw] = lse_f.reshape(b, n, h, hw).permute(0, 2, 1, 3).reshape(b, h, n * hw)
        parts.append((out_d, lse_d))
    return _merge(parts).to(q.dtype)


# ------------------------------------------------------------------------------------------------
# flex: BlockMask (+ score_mod), compiled on CUDA
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _block_mask(layout: InContextLayout, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    hw, lg = layout.hw, layout.gen_len

    def mask_mod(b, h, q_idx, kv_idx):
        is_gen = kv_idx < lg
        aligned = (kv_idx - lg) // hw == q_idx // hw - 1
        return is_gen | aligned

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=lg, KV_LEN=lg + layout.drv_len, device=device,
                             _compile=device.startswith("cuda"))


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, kd, vd, layout, log_scale):
    from torch.nn.attention.flex_attention import flex_attention

    hw = layout.hw
    score_mod = None
    if log_scale != 0.0 and layout.gen_frames > 1:
        def score_mod(score, b, h, q_idx, kv_idx):
            first = (kv_idx >= hw) & (kv_idx < 2 * hw)
            return torch.where(first, score + log_scale, score)

    block_mask = _block_mask(layout, str(q.device))
    kernel = _compiled_flex() if q.is_cuda or COMPILE_FLEX_ON_CPU else flex_attention
    out = kernel(q.transpose(1, 2), torch.cat([k, kd], 1).transpose(1, 2), torch.cat([v, vd], 1).transpose(1, 2),
                 score_mod=score_mod, block_mask=block_mask)
    return out.transpose(1, 2)


_KERNELS = {"dense": _dense, "split": _split, "flex": _flex}


def incontext_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kd: torch.Tensor,
    vd: torch.Tensor,
    layout: InContextLayout,
    log_scale: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """q/k/v [B, Lq, H, D] generation stream, kd/vd [B, Ld, H, D] driving stream (after RoPE, one
    dtype) -> [B, Lq, H, D]. ``backend`` overrides the process-wide choice."""
    if q.shape[1] != layout.gen_len or kd.shape[1] != layout.drv_len:
        raise ValueError(f"in-context attention: {q.shape[1]} generation / {kd.shape[1]} driving tokens do not "
                         f"match the layout {layout} ({layout.gen_len} / {layout.drv_len}).")
    name = backend or _backend
    if name == "auto":
        name = "flex" if q.is_cuda else "dense"
    if name not in _KERNELS:
        raise ValueError(f"Unknown in-context attention backend {name!r}; choose one of {BACKENDS}.")
    return _KERNELS[name](q, k, v, kd, vd, layout, float(log_scale))
