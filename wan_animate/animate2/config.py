"""Typed configuration of the Wan-Animate-2 DiT, and its two public ``config.json`` flavours.

The backbone is the Wan2.1-I2V-14B layout (40 blocks, width 5120, 40 heads, in_dim 36 = 16 noisy
+ 4 mask + 16 condition channels, CLIP image tokens through ``img_emb``) without Animate v1's pose
embedding, motion encoder and face adapter. What is new:

* ``refer_offset_t/h/w``: the RoPE position offsets of the driving stream (-1 = that axis' size of
  the driving grid, resolved per call); ``refer_stride``: the time stride of the driving stream.
* ``log_scale``: a score added to the keys of the first video latent frame in the in-context
  attention (0 for the base model; the official distilled configuration uses -1.3).

``to_official_config`` writes the keys of the official inference configuration (the
``transformer:`` section of its YAML); ``to_diffusers_config`` the ``WanAnimate2Transformer3DModel``
config of diffusers 0.42.1 (which has no ``log_scale`` and hard-codes the skipped block 9: both are
kept as private ``_``-keys, which diffusers ignores).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from wan_animate.config import DiTTrunk

# The prompt of the extract pass (the official pipelines' default reference prompt:
# "reference video of the person's motion").
REFERENCE_PROMPT = "人物动作的参考视频"

# The official class names of the two layouts (the official port's model class; diffusers' class).
OFFICIAL_CLASS_NAME = "WanAnimate2Transformer"
DIFFUSERS_CLASS_NAME = "WanAnimate2Transformer3DModel"
# The official distilled configuration's score modification.
DISTILLED_LOG_SCALE = -1.3


@dataclass
class Animate2Config(DiTTrunk):
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
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_theta: float = 10000.0
    # ---------------------------------------------------------------- the driving stream
    refer_offset_t: int = 1
    refer_offset_h: int = 0
    refer_offset_w: int = -1
    refer_stride: int = 1
    # ---------------------------------------------------------------- sampling-time model options
    log_scale: float = 0.0
    # Blocks the unconditional CFG branch skips (the official code skips block 9).
    uncond_skip_blocks: tuple[int, ...] = (9,)

    family = "animate2"  # class attribute, not a field: which model family this config describes

    def __post_init__(self) -> None:
        self.check_trunk()
        self.uncond_skip_blocks = tuple(int(b) for b in self.uncond_skip_blocks)  # type: ignore[assignment]
        for axis in "thw":
            if getattr(self, f"refer_offset_{axis}") < -1:
                raise ValueError(f"refer_offset_{axis}={getattr(self, f'refer_offset_{axis}')}: use an offset "
                                 ">= 0, or -1 for the driving grid's size on that axis.")
        if self.refer_stride < 1:
            raise ValueError(f"refer_stride={self.refer_stride} must be >= 1.")
        bad = [b for b in self.uncond_skip_blocks if not 0 <= b < self.num_layers]
        if bad:
            raise ValueError(f"uncond_skip_blocks={self.uncond_skip_blocks}: blocks {bad} do not exist in a "
                             f"{self.num_layers}-block model; use indices in [0, {self.num_layers}).")

    def refer_offsets(self, driving_grid: tuple[int, int, int]) -> tuple[int, int, int]:
        """The driving stream's RoPE offsets for a driving token grid (-1 resolved to its size)."""
        offsets = (self.refer_offset_t, self.refer_offset_h, self.refer_offset_w)
        return tuple(int(g) if o < 0 else int(o) for o, g in zip(offsets, driving_grid))  # type: ignore[return-value]

    # ---------------------------------------------------------------- official config.json
    _OFFICIAL_KEYS = ("patch_size", "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "out_dim",
                      "num_heads", "num_layers", "qk_norm", "cross_attn_norm", "eps", "refer_offset_t",
                      "refer_offset_h", "refer_offset_w", "refer_stride", "log_scale")

    def to_official_config(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self._OFFICIAL_KEYS}
        d["patch_size"] = list(self.patch_size)
        # image_dim is fixed at 1280 in the official class; written so tiny variants round-trip
        return {"_class_name": OFFICIAL_CLASS_NAME, **d, "window_size": [-1, -1], "use_img_emb": True,
                "image_dim": self.image_dim, "uncond_skip_blocks": list(self.uncond_skip_blocks)}

    @classmethod
    def from_official_config(cls, cfg: dict[str, Any]) -> "Animate2Config":
        names = {f.name for f in dataclasses.fields(cls)}
        _check_img_emb(cfg)
        return cls(**{k: v for k, v in cfg.items() if k in names})

    # ---------------------------------------------------------------- diffusers config.json
    def to_diffusers_config(self) -> dict[str, Any]:
        if self.image_dim != 1280:
            raise ValueError(f"image_dim={self.image_dim}: diffusers' {DIFFUSERS_CLASS_NAME} has a fixed 1280-wide "
                             "image embedding; use image_dim=1280 for a diffusers folder.")
        return {
            "_class_name": DIFFUSERS_CLASS_NAME,
            "patch_size": list(self.patch_size), "text_len": self.text_len, "in_dim": self.in_dim,
            "dim": self.dim, "ffn_dim": self.ffn_dim, "freq_dim": self.freq_dim, "text_dim": self.text_dim,
            "out_dim": self.out_dim, "num_heads": self.num_heads, "num_layers": self.num_layers,
            "cross_attn_norm": self.cross_attn_norm, "eps": self.eps, "use_img_emb": True,
            "refer_offset_t": self.refer_offset_t, "refer_offset_h": self.refer_offset_h,
            "refer_offset_w": self.refer_offset_w, "refer_stride": self.refer_stride,
            # not diffusers' (it skips block 9 and has no score modification); private keys, which
            # diffusers' config loader drops, keep them for this package
            "_uncond_skip_blocks": list(self.uncond_skip_blocks), "_log_scale": self.log_scale,
        }

    @classmethod
    def from_diffusers_config(cls, cfg: dict[str, Any]) -> "Animate2Config":
        _check_img_emb(cfg)
        keys = ("text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "out_dim", "num_heads",
                "num_layers", "cross_attn_norm", "eps", "refer_offset_t", "refer_offset_h", "refer_offset_w",
                "refer_stride")
        values = {k: cfg[k] for k in keys if k in cfg}
        if "patch_size" in cfg:
            values["patch_size"] = tuple(cfg["patch_size"])
        layers = values.get("num_layers", cls.num_layers)
        skip = cfg.get("_uncond_skip_blocks", [b for b in cls.uncond_skip_blocks if b < layers])
        return cls(**values, uncond_skip_blocks=tuple(skip), log_scale=float(cfg.get("_log_scale", 0.0)))


def _check_img_emb(cfg: dict[str, Any]) -> None:
    if cfg.get("use_img_emb", True) is False:
        raise ValueError("use_img_emb=False: Animate-2 checkpoints have the CLIP image embedding; a model "
                         "without it is not supported.")


PRESETS: dict[str, Animate2Config] = {
    "14b": Animate2Config(),
    # Seconds on a CPU. image_dim stays 1280 (diffusers' class fixes it), so a tiny diffusers
    # folder loads into WanAnimate2Transformer3DModel too. Block 1 is skipped in the uncond branch.
    "tiny": Animate2Config(dim=64, ffn_dim=128, num_heads=2, num_layers=3, freq_dim=32, text_dim=32,
                           text_len=16, uncond_skip_blocks=(1,)),
}
# "tiny" with CLIP tokens as narrow as Animate v1's tiny: at image_dim 1280 the image embedding
# (Linear(1280, 1280) on 257 tokens per image) is most of a tiny training step on a CPU. Official
# layout only (its config.json holds image_dim; diffusers' class fixes 1280).
PRESETS["tiny_narrow"] = dataclasses.replace(PRESETS["tiny"], image_dim=32)
