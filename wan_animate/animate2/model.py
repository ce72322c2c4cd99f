"""The Wan-Animate-2 diffusion transformer (official parameter names, ``blocks.N.block.*``).

    model = Animate2DiT(Animate2Config.preset("14b"))
    # inference: the driving segment once, then every denoising step against its K/V cache
    cache = model.extract(driving, context_ref, clip_ref)                       # per-block K/V
    v = model.generate(x, t, context, clip_fea, y, cache)                       # velocity
    # training: both streams through every block in one pass (gradients through both)
    v = model(x, t, context, clip_fea, y, driving, context_ref, clip_ref)

Two token streams share the blocks' weights:

* driving stream (extract pass): [driving latents | ones mask + driving latents] (36 ch), timestep
  fixed at 1, the reference prompt and the CLIP tokens of driving frame 0. Plain self-attention
  among its tokens with RoPE offset by ``refer_offset_*``; each block's K (normed, before RoPE) and V
  are what the generation stream reads.
* generation stream: [noisy latents | mask + condition] for the reference-image slot + F frames.
  Its self-attention is the in-context one (``wan_animate.animate2.attention``): all generation
  tokens plus the driving tokens of the aligned frame, the driving keys rotated at their offset
  positions.

The rest of each block (modulation, cross-attention to text + CLIP tokens, FFN, fp32 residual
stream) is Animate v1's ``DiTBlock`` (``wan_animate.model.blocks``); this file only supplies the two
self-attentions. Precision helpers (``set_precision``, ``apply_activation_checkpointing``,
``compile_blocks``) from ``wan_animate.model`` apply unchanged: checkpointing wraps each block's
``forward``, which is the joint (training) pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from wan_animate.animate2.attention import InContextLayout, incontext_attention
from wan_animate.animate2.config import Animate2Config
from wan_animate.model.blocks import DiTBlock, Head, ImageEmbedding
from wan_animate.model.dit import PatchEmbedding, timestep_sinusoid
from wan_animate.model.rope import RopeCache, apply_rope

__all__ = ["Animate2DiT", "Animate2Block", "KVCache", "driving_condition", "EXTRACT_TIMESTEP"]

# The extract pass runs at this fixed timestep whatever the denoising step (official: t * 0 + 1).
EXTRACT_TIMESTEP = 1.0


def driving_condition(driving: torch.Tensor) -> torch.Tensor:
    """The extract pass' condition for driving latents [B, C, F, H, W]: [ones mask (4 ch) | latents]."""
    ones = driving.new_ones(driving.shape[0], 4, *driving.shape[2:])
    return torch.cat([ones, driving], dim=1)


@dataclass
class KVCache:
    """Per-block driving-stream K (normed, before RoPE) and V, each [B, Ld, H, D], + the driving grid."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    grid: tuple[int, int, int]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass
class _Stream:
    """One token stream's per-call inputs to the blocks."""

    x: torch.Tensor          # [B, L, dim] fp32 residual stream
    time_mod: torch.Tensor   # [B, 6, dim] fp32
    time_emb: torch.Tensor   # [B, dim] fp32 (head modulation)
    text: torch.Tensor       # [B, L_text, dim]
    image: torch.Tensor      # [B, L_img, dim]
    grid: tuple[int, int, int]


class Animate2Block(nn.Module):
    """``block``: Animate v1's DiT block (official names ``blocks.N.block.*``), run with Animate-2's
    two self-attentions."""

    # the token streams' hidden states among forward's positional arguments (x_gen, x_drv): what
    # wan_animate.memory stores in bf16 / offloads for activation checkpointing
    hidden_state_args = (0, 1)

    def __init__(self, config: Animate2Config):
        super().__init__()
        self.block = DiTBlock(config)  # type: ignore[arg-type]  # the fields DiTBlock reads are shared

    # -------------------------------------------------------------------------------------------- driving
    def extract(self, x, time_mod, text, image, rope_drv) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Driving stream x [B, Ld, dim] fp32 -> (x, k, v); k normed before RoPE, both compute dtype."""
        sa = self.block.self_attn
        kv: list[torch.Tensor] = []

        def attend(h: torch.Tensor) -> torch.Tensor:
            dtype = h.dtype
            q, k, v = sa.project(h)
            kv.extend((k.to(dtype), v))
            q, k = apply_rope(q, *rope_drv), apply_rope(k, *rope_drv)
            return sa.o(sa.attention_fn(q.to(dtype), k.to(dtype), v).flatten(2))

        x = self.block.run(x, time_mod, text, image, attend)
        return x, kv[0], kv[1]

    # -------------------------------------------------------------------------------------------- generation
    def generate(self, x, time_mod, text, image, rope_gen, rope_drv, k_drv, v_drv, layout: InContextLayout,
                 log_scale: float) -> torch.Tensor:
        """Generation stream x [B, Lg, dim] fp32 with the driving K/V of this block -> x."""
        sa = self.block.self_attn

        def attend(h: torch.Tensor) -> torch.Tensor:
            dtype = h.dtype
            q, k, v = sa.project(h)
            q, k = apply_rope(q, *rope_gen), apply_rope(k, *rope_gen)
            kd = apply_rope(k_drv, *rope_drv)
            out = incontext_attention(q.to(dtype), k.to(dtype), v, kd.to(dtype), v_drv.to(dtype), layout, log_scale)
            return sa.o(out.flatten(2))

        return self.block.run(x, time_mod, text, image, attend)

    # -------------------------------------------------------------------------------------------- joint
    def forward(self, x_gen, x_drv, gen_args: tuple, drv_args: tuple, rope_gen, rope_drv,
                layout: InContextLayout, log_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Both streams through this block (training): the driving stream first, its fresh K/V then
        feed the generation stream; gradients reach the driving stream through them.
        ``*_args`` = (time_mod, text, image) of each stream."""
        x_drv, k, v = self.extract(x_drv, *drv_args, rope_drv)
        x_gen = self.generate(x_gen, *gen_args, rope_gen, rope_drv, k, v, layout, log_scale)
        return x_gen, x_drv


class Animate2DiT(nn.Module):
    family = "animate2"

    def __init__(self, config: Animate2Config):
        super().__init__()
        self.config = config
        dim = config.dim
        patch = tuple(config.patch_size)
        self.patch_embedding = PatchEmbedding(config.in_dim, dim, kernel_size=patch, stride=patch)
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList([Animate2Block(config) for _ in range(config.num_layers)])
        self.head = Head(config)  # type: ignore[arg-type]
        self.img_emb = ImageEmbedding(config.image_dim, dim)
        self.rope = RopeCache(config.rope_split, config.rope_theta)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Xavier linears with zero biases, small normal text/time embeddings (no zero head, so a
        fresh model exercises every path). Real use loads a checkpoint."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.view(self.patch_embedding.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embedding.bias)
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)

    # -------------------------------------------------------------------------------------------- inputs
    def _grid(self, latents: torch.Tensor, name: str) -> tuple[int, int, int]:
        cfg = self.config
        if latents.ndim != 5 or latents.shape[1] != cfg.out_dim:
            raise ValueError(f"{name} must be [B, {cfg.out_dim}, F, H, W] latents, got {tuple(latents.shape)}.")
        f, h, w = latents.shape[2:]
        pt, ph, pw = cfg.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"{name} frames/height/width {(f, h, w)} must be multiples of patch_size {cfg.patch_size}.")
        return f // pt, h // ph, w // pw

    def _stream(self, latents, cond, t, context, clip_fea, name: str) -> _Stream:
        cfg = self.config
        grid = self._grid(latents, name)
        b = latents.shape[0]
        if tuple(cond.shape) != (b, cfg.in_dim - cfg.out_dim, *latents.shape[2:]):
            raise ValueError(f"the condition of {name} must be [B, {cfg.in_dim - cfg.out_dim}, F, H, W] = "
                             f"{(b, cfg.in_dim - cfg.out_dim, *latents.shape[2:])}, got {tuple(cond.shape)}.")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.text_dim:
            raise ValueError(f"the text embeddings of {name} must be [B={b}, L, {cfg.text_dim}], got {tuple(context.shape)}.")
        if clip_fea.ndim != 3 or clip_fea.shape[0] != b or clip_fea.shape[2] != cfg.image_dim:
            raise ValueError(f"the CLIP tokens of {name} must be [B={b}, L, {cfg.image_dim}], got {tuple(clip_fea.shape)}.")
        video = torch.cat([latents, cond], dim=1).to(self.patch_embedding.weight.dtype)
        x = self.patch_embedding(video).permute(0, 2, 3, 4, 1).float().flatten(1, 3)  # [B, L, dim]
        time_dtype = self.time_embedding[0].weight.dtype
        t = t.to(latents.device).float().expand(b) if t.ndim == 0 else t.float()
        with torch.autocast(latents.device.type, enabled=False):  # fp32 by design, also under bf16 autocast
            e = self.time_embedding(timestep_sinusoid(t, cfg.freq_dim).to(time_dtype)).float()  # [B, dim]
            time_mod = self.time_projection(e.to(self.time_projection[1].weight.dtype)).float()
        time_mod = time_mod.unflatten(1, (6, cfg.dim))
        text = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))
        return _Stream(x, time_mod, e, text, self.img_emb(clip_fea), grid)

    def _driving_stream(self, driving, context_ref, clip_ref, driving_cond) -> _Stream:
        cond = driving_condition(driving) if driving_cond is None else driving_cond
        t = torch.full((driving.shape[0],), EXTRACT_TIMESTEP, device=driving.device)
        return self._stream(driving, cond, t, context_ref, clip_ref, "the driving latents")

    def _rope_drv(self, grid, device):
        return self.rope(grid, device, offsets=self.config.refer_offsets(grid), time_stride=self.config.refer_stride)

    def _layout(self, gen_grid, drv_grid) -> InContextLayout:
        if gen_grid[1:] != drv_grid[1:]:
            raise ValueError(f"the driving latents' token grid {drv_grid[1:]} (height, width) differs from the "
                             f"generation grid {gen_grid[1:]}: encode the driving video at the output size.")
        return InContextLayout(gen_grid[0], drv_grid[0], gen_grid[1] * gen_grid[2])

    def _log_scale(self, log_scale: float | None) -> float:
        return self.config.log_scale if log_scale is None else float(log_scale)

    def _output(self, s: _Stream, batch: int) -> torch.Tensor:
        cfg = self.config
        pt, ph, pw = cfg.patch_size
        out = self.head(s.x, s.time_emb)  # [B, L, out_dim * pt*ph*pw] fp32
        out = out.view(batch, *s.grid, pt, ph, pw, cfg.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
        f, h, w = s.grid
        return out.reshape(batch, cfg.out_dim, f * pt, h * ph, w * pw)

    # -------------------------------------------------------------------------------------------- passes
    def extract(self, driving: torch.Tensor, context_ref: torch.Tensor, clip_ref: torch.Tensor,
                driving_cond: torch.Tensor | None = None) -> KVCache:
        """The extract pass: driving latents [B, 16, Fd, H, W], reference-prompt embeddings
        [B, L_text, text_dim], CLIP tokens of driving frame 0 [B, 257, image_dim] -> per-block K/V.
        ``driving_cond`` [B, 20, Fd, H, W] defaults to ``driving_condition(driving)``."""
        s = self._driving_stream(driving, context_ref, clip_ref, driving_cond)
        rope = self._rope_drv(s.grid, driving.device)
        keys, values = [], []
        x = s.x
        for block in self.blocks:
            x, k, v = block.extract(x, s.time_mod, s.text, s.image, rope)
            keys.append(k)
            values.append(v)
        return KVCache(keys, values, s.grid)

    def generate(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor,
                 y: torch.Tensor, cache: KVCache, *, log_scale: float | None = None,
                 skip_blocks: Sequence[int] = ()) -> torch.Tensor:
        """A denoising step against ``cache``: x [B, 16, F+1, H, W] (slot 0 = reference image),
        t [B] in [0, 1000], context [B, L_text, text_dim], clip_fea [B, 257, image_dim] (reference
        image), y [B, 20, F+1, H, W] (mask + condition) -> float32 velocity of x's shape.
        ``skip_blocks``: blocks left out (the unconditional CFG branch: ``config.uncond_skip_blocks``)."""
        if len(cache.keys) != len(self.blocks):
            raise ValueError(f"the K/V cache holds {len(cache.keys)} blocks, the model has {len(self.blocks)}.")
        s = self._stream(x, y, t, context, clip_fea, "x")
        layout = self._layout(s.grid, cache.grid)
        rope_gen, rope_drv = self.rope(s.grid, x.device), self._rope_drv(cache.grid, x.device)
        scale = self._log_scale(log_scale)
        h = s.x
        for i, block in enumerate(self.blocks):
            if i in skip_blocks:
                continue
            h = block.generate(h, s.time_mod, s.text, s.image, rope_gen, rope_drv, cache.keys[i], cache.values[i],
                               layout, scale)
        s.x = h
        return self._output(s, x.shape[0])

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor,
                y: torch.Tensor, driving: torch.Tensor, context_ref: torch.Tensor, clip_ref: torch.Tensor,
                driving_cond: torch.Tensor | None = None, *, log_scale: float | None = None,
                skip_blocks: Sequence[int] = ()) -> torch.Tensor:
        """The joint pass (training): both streams through each block in turn; equal to
        ``generate(..., extract(...))`` (a skipped block is skipped in the generation stream only,
        as at inference). Arguments as in ``extract`` and ``generate``."""
        g = self._stream(x, y, t, context, clip_fea, "x")
        d = self._driving_stream(driving, context_ref, clip_ref, driving_cond)
        layout = self._layout(g.grid, d.grid)
        rope_gen, rope_drv = self.rope(g.grid, x.device), self._rope_drv(d.grid, x.device)
        scale = self._log_scale(log_scale)
        gen_args, drv_args = (g.time_mod, g.text, g.image), (d.time_mod, d.text, d.image)
        xg, xd = g.x, d.x
        for i, block in enumerate(self.blocks):
            if i in skip_blocks:
                xd, _, _ = block.extract(xd, *drv_args, rope_drv)
                continue
            xg, xd = block(xg, xd, gen_args, drv_args, rope_gen, rope_drv, layout, scale)
        g.x = xg
        return self._output(g, x.shape[0])
