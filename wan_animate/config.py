"""Typed configuration of the Wan-Animate DiT.

One dataclass describes every size of the model (DiT, pose embedding, face encoder, face adapter,
LIA-style motion encoder) so that tiny variants of every part can be built for tests. It converts
to and from the two public ``config.json`` flavours: the official ``WanAnimateModel`` one and the
diffusers ``WanAnimateTransformer3DModel`` one.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from typing import Any

# The official default prompt ("the person in the video is doing actions") and negative prompt.
DEFAULT_PROMPT = "视频中的人在做动作"
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

# Motion-encoder channel count at each feature-map resolution (LIA appearance encoder).
# Keys are resolutions as strings because that is how the diffusers config serialises them.
DEFAULT_MOTION_ENCODER_CHANNELS: dict[str, int] = {
    "4": 512, "8": 512, "16": 512, "32": 512, "64": 256, "128": 128, "256": 64, "512": 32, "1024": 16,
}


class DiTTrunk:
    """What every Wan DiT config shares (Wan-Animate-14B's below, Animate-2's): the derived sizes, the
    trunk checks (``check_trunk``, from ``__post_init__``), presets (the ``PRESETS`` of the config's
    module) and the dict round-trip."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def latent_channels(self) -> int:
        return self.out_dim

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Channels of head_dim given to the (t, h, w) RoPE axes (44/42/42 for head_dim 128)."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    def check_trunk(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries (t, h, w), got {self.patch_size}.")
        if self.dim % self.num_heads != 0:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}; "
                             "choose dim = num_heads * head_dim.")
        if self.head_dim % 2 != 0 or any(c % 2 for c in self.rope_split):
            raise ValueError(f"head_dim={self.head_dim} gives RoPE split {self.rope_split}; every part must be "
                             "even. Use a head_dim that is a multiple of 12 or 32 (e.g. 32, 64, 128).")
        if self.in_dim != 2 * self.out_dim + 4:
            raise ValueError(f"in_dim={self.in_dim} must equal 2 * out_dim + 4 = {2 * self.out_dim + 4} "
                             "(noisy latent + 4 mask channels + condition latent).")

    @classmethod
    def preset(cls, name: str, **overrides: Any):
        presets = sys.modules[cls.__module__].PRESETS
        if name not in presets:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(presets)}.")
        return dataclasses.replace(presets[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} fields {unknown}; known: {sorted(names)}.")
        return cls(**d)


@dataclass
class WanAnimateConfig(DiTTrunk):
    # ---- DiT trunk
    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    freq_dim: int = 256
    text_dim: int = 4096
    image_dim: int = 1280
    in_dim: int = 36
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    num_image_tokens: int = 257
    window_size: tuple[int, int] = (-1, -1)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_max_seq_len: int = 1024
    # ---- motion encoder (LIA)
    motion_encoder_size: int = 512
    motion_style_dim: int = 512
    motion_dim: int = 20
    motion_encoder_dim: int = 512
    motion_encoder_channel_sizes: dict[str, int] = field(
        default_factory=lambda: dict(DEFAULT_MOTION_ENCODER_CHANNELS)
    )
    # Face frames pushed through the motion encoder at once; bounds activation memory.
    motion_encoder_batch_size: int = 8
    # ---- face encoder / adapter
    face_encoder_hidden_dim: int = 1024
    face_encoder_num_heads: int = 4
    # A face block follows every `face_adapter_period`-th DiT block (0, 5, 10, ...).
    face_adapter_period: int = 5

    @property
    def num_face_blocks(self) -> int:
        return self.num_layers // self.face_adapter_period

    # ---- validation
    def __post_init__(self) -> None:
        self.check_trunk()
        self.window_size = tuple(int(w) for w in self.window_size)  # type: ignore[assignment]
        self.motion_encoder_channel_sizes = {
            str(k): int(v) for k, v in dict(self.motion_encoder_channel_sizes).items()
        }
        if self.face_adapter_period < 1 or self.num_layers % self.face_adapter_period != 0:
            raise ValueError(
                f"num_layers={self.num_layers} must be a positive multiple of face_adapter_period="
                f"{self.face_adapter_period} (a face block follows blocks 0, period, 2*period, ...); "
                f"for a reduced-depth model set face_adapter_period to a divisor of num_layers."
            )
        size = self.motion_encoder_size
        if size < 8 or 2 ** int(round(math.log2(size))) != size:
            raise ValueError(f"motion_encoder_size={size} must be a power of two >= 8.")
        needed = [str(2**i) for i in range(2, int(math.log2(size)) + 1)]
        missing = [k for k in needed if k not in self.motion_encoder_channel_sizes]
        if missing:
            raise ValueError(
                f"motion_encoder_channel_sizes lacks resolutions {missing} needed for "
                f"motion_encoder_size={size}; add them (resolution -> channels)."
            )
        if self.motion_encoder_batch_size < 1:
            raise ValueError("motion_encoder_batch_size must be >= 1.")

    def to_official_config(self) -> dict[str, Any]:
        """The official ``config.json`` (``_class_name: WanAnimateModel``) plus our extra sizes.

        The official file only carries the trunk sizes; the sub-module sizes we add under keys
        the official loader ignores, so tiny variants round-trip through the official layout.
        """
        d = self.to_dict()
        return {"_class_name": "WanAnimateModel", **{k: d[k] for k in _OFFICIAL_KEYS}, "use_img_emb": True}

    @classmethod
    def from_official_config(cls, cfg: dict[str, Any]) -> "WanAnimateConfig":
        if cfg.get("use_img_emb") is False:
            raise ValueError("use_img_emb=false is not a Wan-Animate checkpoint (it needs CLIP image tokens).")
        return cls(**{k: cfg[k] for k in _OFFICIAL_KEYS if cfg.get(k) is not None})

    def to_diffusers_config(self) -> dict[str, Any]:
        """Keyword arguments of diffusers' ``WanAnimateTransformer3DModel``."""
        d = self.to_dict()
        return {
            "_class_name": "WanAnimateTransformer3DModel",
            **{theirs: d[ours] for ours, theirs in _DIFFUSERS_NAMES.items()},
            "num_attention_heads": self.num_heads,
            "attention_head_dim": self.head_dim,
            "in_channels": self.in_dim,
            "latent_channels": self.out_dim,
            "out_channels": self.out_dim,
            "qk_norm": "rms_norm_across_heads" if self.qk_norm else None,
            "added_kv_proj_dim": self.dim,
            "pos_embed_seq_len": None,
        }

    @classmethod
    def from_diffusers_config(cls, cfg: dict[str, Any]) -> "WanAnimateConfig":
        heads = int(cfg.get("num_attention_heads", 40))
        dim = heads * int(cfg.get("attention_head_dim", 128))
        if cfg.get("added_kv_proj_dim") not in (None, dim):
            raise ValueError(
                f"added_kv_proj_dim={cfg.get('added_kv_proj_dim')} differs from the model width {dim}; "
                "Wan-Animate projects image tokens at full width."
            )
        if cfg.get("added_kv_proj_dim") is None:
            raise ValueError(
                "diffusers config has added_kv_proj_dim=None, i.e. no image cross-attention; "
                f"set added_kv_proj_dim={dim} (Wan-Animate uses CLIP image tokens)."
            )
        latent = cfg.get("latent_channels") or (int(cfg.get("in_channels", 36)) - 4) // 2
        qk = cfg.get("qk_norm", "rms_norm_across_heads")
        if qk not in (None, "rms_norm_across_heads"):
            raise ValueError(f"qk_norm={qk!r} is not supported; Wan-Animate uses 'rms_norm_across_heads'.")
        # absent (or null) sizes keep our defaults, which are the 14B model's
        same = {ours: cfg[theirs] for ours, theirs in _DIFFUSERS_NAMES.items() if cfg.get(theirs) is not None}
        return cls(**same, dim=dim, num_heads=heads, in_dim=2 * int(latent) + 4,
                   out_dim=int(cfg.get("out_channels") or latent), qk_norm=qk is not None)


# The official config.json's keys (the trunk sizes), then the sub-module sizes it leaves implicit.
_OFFICIAL_KEYS = (
    "patch_size", "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "out_dim", "num_heads",
    "num_layers", "window_size", "qk_norm", "cross_attn_norm", "eps", "motion_encoder_dim",
    "image_dim", "motion_encoder_size", "motion_style_dim", "motion_dim", "motion_encoder_channel_sizes",
    "face_encoder_hidden_dim", "face_encoder_num_heads", "face_adapter_period", "motion_encoder_batch_size",
)

# Sizes diffusers stores under the same meaning: our name -> diffusers' name (ours but for one).
_DIFFUSERS_RENAMED = {"face_adapter_period": "inject_face_latents_blocks"}
_DIFFUSERS_NAMES = {name: _DIFFUSERS_RENAMED.get(name, name) for name in (
    "patch_size", "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "eps", "image_dim",
    "rope_max_seq_len", "motion_encoder_channel_sizes", "motion_encoder_size", "motion_style_dim", "motion_dim",
    "motion_encoder_dim", "face_encoder_hidden_dim", "face_encoder_num_heads", "face_adapter_period",
    "motion_encoder_batch_size")}

_TINY_CHANNELS = {"4": 32, "8": 32, "16": 16, "32": 8}

PRESETS: dict[str, WanAnimateConfig] = {
    "14b": WanAnimateConfig(),
    # Seconds on a CPU; every sub-module present at toy width.
    "tiny": WanAnimateConfig(
        dim=64, ffn_dim=128, num_heads=2, num_layers=4, freq_dim=32, text_dim=32, image_dim=32,
        motion_encoder_size=32, motion_style_dim=32, motion_dim=8, motion_encoder_dim=32,
        motion_encoder_channel_sizes=dict(_TINY_CHANNELS), motion_encoder_batch_size=4,
        face_encoder_hidden_dim=16, face_encoder_num_heads=4, face_adapter_period=2,
    ),
    # A second tiny shape for parity tests: other heads, layers and encoder sizes.
    "tiny_b": WanAnimateConfig(
        dim=96, ffn_dim=160, num_heads=4, num_layers=3, freq_dim=16, text_dim=24, image_dim=40,
        motion_encoder_size=16, motion_style_dim=24, motion_dim=6, motion_encoder_dim=20,
        motion_encoder_channel_sizes={"4": 24, "8": 16, "16": 8}, motion_encoder_batch_size=3,
        face_encoder_hidden_dim=12, face_encoder_num_heads=2, face_adapter_period=1,
    ),
}


def dit_forward_flops(cfg: WanAnimateConfig, latent_shape: tuple[int, int, int], text_len: int | None = None) -> float:
    """Forward FLOPs (2 per multiply-add) of the DiT trunk for one sample with latent
    ``(T+1, h, w)``: per block linear (12 d^2 + 4 d f) L, self-attention 4 L^2 d, cross-attention
    4 L d (L_text + L_img) plus its k/v projections (facts section 4). Animate-2 counts both streams."""
    t, h, w = latent_shape
    pt, ph, pw = cfg.patch_size
    hw = (h // ph) * (w // pw)
    tokens = (t // pt) * hw
    d, f = cfg.dim, cfg.ffn_dim
    ctx = (text_len or cfg.text_len) + getattr(cfg, "num_image_tokens", 257)  # 257: CLIP ViT-H/14 tokens

    def stream(n: int, keys: int) -> float:  # one token stream of n tokens, each attending to ``keys`` keys
        return (12 * d * d + 4 * d * f) * n + 4 * n * keys * d + 4 * n * d * ctx + 2 * 2 * ctx * d * d

    if getattr(cfg, "family", "") == "animate2":
        # Animate-2's joint pass: the driving stream (T - 1 frames, plain self-attention) and the
        # generation stream (its own tokens + the aligned driving frame's hw keys)
        drv = tokens - hw
        return float(cfg.num_layers * (stream(drv, drv) + stream(tokens, tokens + hw)))
    return float(cfg.num_layers * stream(tokens, tokens))
