"""The Wan-Animate diffusion transformer (Wan2.2-Animate-14B architecture, official names).

    velocity = WanAnimateDiT(config)(x, t, context, clip_fea, y, pose_latents, face_pixel_values)

Data flow (one resolution per batch):
  [x | y] (36 ch) --patch_embedding--> tokens; pose latents --pose_patch_embedding--> added to the
  tokens of latent frames 1..T (never the reference slot 0); face crops --motion_encoder-->
  motion vectors --face_encoder--> per-frame face tokens; t --sinusoid, time_embedding--> e
  --time_projection--> 6 modulation vectors; text/CLIP tokens --text_embedding/img_emb--> context.
  Blocks 0..L-1 (self-attn with 3D RoPE, cross-attn, FFN), a face block after every
  ``face_adapter_period``-th block, then the modulated head and unpatchify.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from wan_animate.config import WanAnimateConfig
from wan_animate.model.blocks import DiTBlock, Head, ImageEmbedding
from wan_animate.model.face import FaceAdapter, FaceEncoder
from wan_animate.model.motion_encoder import MotionEncoder
from wan_animate.model.rope import RopeCache

# ---- Helpers


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] timesteps -> [B, dim] float32 embedding, cos half first (the Wan convention)."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / half)
    angle = t.float()[:, None] * freqs[None, :]  # [B, half]
    emb = torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class PatchEmbedding(nn.Conv3d):
    """Conv3d with kernel = stride, computed as one matmul over the flattened patches.

    Same parameters and output layout as ``nn.Conv3d`` (so checkpoints and adapter libraries
    that wrap Conv3d treat it as one); a non-overlapping conv is a linear map of the patches,
    and a single GEMM is faster than a generic conv kernel. Runs through ``forward`` so sharding
    hooks (FSDP, ZeRO-3) see the weight used.
    """

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, C, F, H, W] -> [B, dim, F/pt, H/ph, W/pw] (a permuted view of [B, F', H', W', dim])."""
        b, c, f, h, w = video.shape
        pt, ph, pw = self.kernel_size
        patches = video.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4)  # [B, F', H', W', C*pt*ph*pw]
        tokens = F.linear(patches.to(self.weight.dtype), self.weight.flatten(1), self.bias)
        return tokens.permute(0, 4, 1, 2, 3)


# ---- Model


class WanAnimateDiT(nn.Module):
    # None: all tokens on this device. wan_animate.parallel.apply_sequence_parallel sets a plan
    # that splits the tokens after the embeddings and gathers them after the head.
    sequence_shard = None

    def __init__(self, config: WanAnimateConfig):
        super().__init__()
        self.config = config  # validated by WanAnimateConfig
        dim = config.dim
        patch = tuple(config.patch_size)

        # ---- embeddings
        self.patch_embedding = PatchEmbedding(config.in_dim, dim, kernel_size=patch, stride=patch)
        self.pose_patch_embedding = PatchEmbedding(config.latent_channels, dim, kernel_size=patch, stride=patch)
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.img_emb = ImageEmbedding(config.image_dim, dim)

        # ---- trunk
        self.blocks = nn.ModuleList([DiTBlock(config) for _ in range(config.num_layers)])
        self.head = Head(config)

        # ---- face / motion adapters
        self.motion_encoder = MotionEncoder(config)
        self.face_encoder = FaceEncoder(config)
        self.face_adapter = FaceAdapter(config)

        # Not a buffer: the tables are derived data, cached per (grid, device), never saved.
        self.rope = RopeCache(config.rope_split, config.rope_theta)
        self.init_weights()

    # ---- init
    @torch.no_grad()
    def init_weights(self) -> None:
        """Xavier linears with zero biases; small normal embeddings; LIA layers unit normal.

        Nothing is zero-initialised that would make the output independent of an input (the
        official code zeros the head; we do not, so a fresh model already exercises every path).
        Real use loads a checkpoint.
        """
        for name, module in self.named_modules():
            if name.startswith("motion_encoder"):
                continue  # equalised layers: unit-normal weights set in their constructors
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for conv in (self.patch_embedding, self.pose_patch_embedding):
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
            nn.init.zeros_(conv.bias)
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.face_encoder.padding_tokens, std=0.02)

    # ---- checks
    def _check_inputs(self, x, t, context, clip_fea, y, pose_latents, face_pixel_values) -> None:
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.out_dim:
            raise ValueError(f"x must be [B, {cfg.out_dim}, T+1, H, W], got {tuple(x.shape)}.")
        b, _, f, h, w = x.shape
        pt, ph, pw = cfg.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"x frames/height/width {(f, h, w)} must be multiples of patch_size {cfg.patch_size}.")
        expect = {
            "t": (t, (b,)),
            "y": (y, (b, cfg.in_dim - cfg.out_dim, f, h, w)),
            "pose_latents": (pose_latents, (b, cfg.latent_channels, f - pt, h, w)),
            "context": (context, (b, context.shape[1] if context.ndim == 3 else -1, cfg.text_dim)),
            "clip_fea": (clip_fea, (b, clip_fea.shape[1] if clip_fea.ndim == 3 else -1, cfg.image_dim)),
        }
        for name, (tensor, shape) in expect.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} for x of shape {tuple(x.shape)}, got {tuple(tensor.shape)}.")
        s = cfg.motion_encoder_size
        if face_pixel_values.ndim != 5 or face_pixel_values.shape[0] != b or face_pixel_values.shape[1] != 3:
            raise ValueError(f"face_pixel_values must be [B={b}, 3, F, {s}, {s}], got {tuple(face_pixel_values.shape)}.")
        n_face = FaceEncoder.num_latent_frames(face_pixel_values.shape[2])
        if n_face + 1 != f // pt:
            raise ValueError(
                f"face_pixel_values has {face_pixel_values.shape[2]} frames -> {n_face} latent frames, but x has "
                f"{f // pt - 1} target latent frames; pass 4*T-3 face frames for T target latents "
                f"(here {4 * (f // pt - 1) - 3})."
            )

    # ---- forward
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        clip_fea: torch.Tensor,
        y: torch.Tensor,
        pose_latents: torch.Tensor,
        face_pixel_values: torch.Tensor,
    ) -> torch.Tensor:
        """Velocity prediction.

        x [B, 16, T+1, H, W] noisy latents (slot 0 = reference), t [B] in [0, 1000],
        context [B, L_text, text_dim], clip_fea [B, 257, image_dim], y [B, 20, T+1, H, W]
        (4 mask + 16 condition-latent channels), pose_latents [B, 16, T, H, W],
        face_pixel_values [B, 3, F, S, S] in [-1, 1]  ->  float32 [B, 16, T+1, H, W].
        """
        self._check_inputs(x, t, context, clip_fea, y, pose_latents, face_pixel_values)
        cfg = self.config
        batch, _, frames, height, width = x.shape
        pt, ph, pw = cfg.patch_size
        grid = (frames // pt, height // ph, width // pw)

        # ---- video tokens (+ pose on the target frames), residual stream in fp32
        video = torch.cat([x, y], dim=1).to(self.patch_embedding.weight.dtype)
        tokens = self.patch_embedding(video).permute(0, 2, 3, 4, 1)  # [B, F', H', W', dim]
        pose = self.pose_patch_embedding(pose_latents.to(video.dtype)).permute(0, 2, 3, 4, 1)  # [B, F'-1, ...]
        tokens = tokens.float()
        h = torch.cat([tokens[:, :1], tokens[:, 1:] + pose.float()], dim=1).flatten(1, 3)  # [B, L, dim]

        # ---- time modulation (fp32 by design: also inside a bf16 autocast region)
        time_dtype = self.time_embedding[0].weight.dtype
        with torch.autocast(x.device.type, enabled=False):
            e = self.time_embedding(timestep_sinusoid(t, cfg.freq_dim).to(time_dtype)).float()  # [B, dim]
            time_mod = self.time_projection(e.to(self.time_projection[1].weight.dtype)).float()
        time_mod = time_mod.unflatten(1, (6, cfg.dim))  # [B, 6, dim]

        # ---- context tokens
        text = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))  # [B, L_text, dim]
        image = self.img_emb(clip_fea)  # [B, L_img, dim]

        # ---- face tokens: one motion vector per pixel frame, then per latent frame
        b, c, n_frames, s1, s2 = face_pixel_values.shape
        faces = face_pixel_values.transpose(1, 2).reshape(b * n_frames, c, s1, s2)
        motion = self.motion_encoder(faces).unflatten(0, (b, n_frames))  # [B, F, motion_encoder_dim]
        face_tokens = self.face_encoder(motion)  # [B, T, N, dim]
        # The reference slot gets all-zero face tokens.
        face_tokens = torch.cat([torch.zeros_like(face_tokens[:, :1]), face_tokens], dim=1)  # [B, T+1, N, dim]

        # ---- trunk
        rope_cos, rope_sin = self.rope(grid, x.device)
        shard = self.sequence_shard
        if shard is not None:  # sequence parallelism: this rank keeps its slice of the tokens
            h, rope_cos, rope_sin = shard.split(h, rope_cos, rope_sin, grid)
        period = cfg.face_adapter_period
        for i, block in enumerate(self.blocks):
            h = block(h, time_mod, text, image, rope_cos, rope_sin)
            if i % period == 0:
                h = h + self.face_adapter.fuser_blocks[i // period](h, face_tokens)  # -> fp32

        # ---- head (per token) and unpatchify
        out = self.head(h, e)  # [B, L, out_dim * pt*ph*pw] fp32
        if shard is not None:
            out = shard.gather(out)  # all tokens again, on every rank of the group
        out = out.view(batch, *grid, pt, ph, pw, cfg.out_dim)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, F', pt, H', ph, W', pw]
        return out.reshape(batch, cfg.out_dim, frames, height, width)
