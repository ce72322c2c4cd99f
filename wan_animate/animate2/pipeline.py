"""Animate-2 generation: reference image + raw driving video -> video.

:class:`Animate2Pipeline` is the family sibling of :class:`wan_animate.pipeline.AnimatePipeline`:
the same encoders, folder layouts, segment arithmetic (mirror padding, ``clip_len`` segments
overlapping by ``refert_num`` frames), segment loop (:func:`wan_animate.pipeline.run_segments`),
sampler and CFG (:func:`wan_animate.sampling.sample`) and conditioning builder
(:func:`wan_animate.conditioning.encode_condition`, animate mode). What differs, per segment:

1. the driving clip (raw RGB, no pose or face extraction) is VAE-encoded, and the **extract pass**
   runs once on it (reference prompt ``REFERENCE_PROMPT``, CLIP tokens of the clip's first frame,
   timestep fixed at 1), filling the per-block K/V cache;
2. every denoising step runs the generation pass against that cache; the unconditional CFG
   branch (negative prompt) skips ``config.uncond_skip_blocks`` (official: block 9);
3. distilled checkpoints: ``log_scale`` (official -1.3) adds to the scores of the first video
   frame's keys, 10 steps, no CFG (``DISTILLED``).

Official defaults (``BASE``): 81-frame segments, 1 overlap frame, Euler, shift 5, 40 steps, CFG 3.0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wan_animate.animate2.config import DISTILLED_LOG_SCALE, REFERENCE_PROMPT, Animate2Config
from wan_animate.conditioning import encode_condition, num_latent_frames
from wan_animate.config import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT
from wan_animate.geometry import letterbox
from wan_animate.pipeline import (
    SIZE_MULTIPLE,
    AnimatePipeline,
    Denoiser,
    InputError,
    as_video,
    dit_compute_dtype,
    load_image,
    mirror_indices,
    num_segments,
    padded_length,
    run_segments,
    to_tensor_video,
)
from wan_animate.options import SOLVERS, check_frames_4n1

__all__ = ["Animate2Pipeline", "SamplingDefaults", "BASE", "DISTILLED", "check_driving_video"]


@dataclass(frozen=True)
class SamplingDefaults:
    steps: int
    guide_scale: float
    log_scale: float | None  # None: the model config's
    solver: str = "euler"
    shift: float = 5.0
    clip_len: int = 81
    refert_num: int = 1


# The official base and distilled sampling settings (the official inference configurations).
BASE = SamplingDefaults(steps=40, guide_scale=3.0, log_scale=None)
DISTILLED = SamplingDefaults(steps=10, guide_scale=1.0, log_scale=DISTILLED_LOG_SCALE)


def check_driving_video(driving_video: Any, *, clip_len: int, refert_num: int) -> np.ndarray:
    """Validate the raw driving video (uint8 [T, H, W, 3], sides multiples of 16); raises
    :class:`InputError` naming the problem and the fix."""
    try:
        check_frames_4n1(clip_len)
    except ValueError as e:
        raise InputError(str(e)) from None
    if not 1 <= refert_num < clip_len:
        raise InputError(f"refert_num={refert_num} must be in [1, clip_len) (official: 1).")
    video = as_video(driving_video, "driving_video")
    t, h, w = video.shape[:3]
    if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        raise InputError(f"driving video is {w}x{h}; width and height must be multiples of {SIZE_MULTIPLE} "
                         f"(e.g. {w // SIZE_MULTIPLE * SIZE_MULTIPLE}x{h // SIZE_MULTIPLE * SIZE_MULTIPLE}).")
    if t <= refert_num:
        raise InputError(f"driving video has {t} frames; it needs more than refert_num={refert_num}.")
    return video


class Animate2Pipeline(AnimatePipeline):
    """Animate-2 DiT + the Wan encoders (VAE, umT5, CLIP). Build with :meth:`from_pretrained`."""

    config_class = Animate2Config

    @staticmethod
    def load_dit(path: Path, *, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
        from wan_animate.animate2.weights import load_animate2

        return load_animate2(path, dtype=dtype, device=device)

    @torch.no_grad()
    def generate(  # type: ignore[override]
        self,
        ref_image: Any,
        driving_video: Any,
        *,
        prompt: str = DEFAULT_PROMPT,
        negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
        reference_prompt: str = REFERENCE_PROMPT,
        steps: int = BASE.steps,
        shift: float = BASE.shift,
        guide_scale: float = BASE.guide_scale,
        seed: int = 0,
        solver: str = BASE.solver,
        clip_len: int = BASE.clip_len,
        refert_num: int = BASE.refert_num,
        log_scale: float | None = None,
        progress: bool = True,
    ) -> np.ndarray:
        """Animate ``ref_image`` (uint8 [H, W, 3] or path) with the raw ``driving_video`` (uint8
        [T, H, W, 3]). ``log_scale`` None: the model config's (distilled checkpoints: ``DISTILLED``).
        Returns uint8 ``[T, H, W, 3]`` with T = driving length, at the driving video's size."""
        if solver not in SOLVERS:
            raise InputError(f"solver={solver!r} is not one of {SOLVERS}.")
        if steps < 1:
            raise InputError(f"steps={steps} must be >= 1.")
        driving = check_driving_video(driving_video, clip_len=clip_len, refert_num=refert_num)
        ref = load_image(ref_image)
        real_len, height, width = driving.shape[:3]
        idx = mirror_indices(real_len, padded_length(real_len, clip_len, refert_num))
        n_seg = num_segments(real_len, clip_len, refert_num)
        dev = self.device
        dit_dtype = dit_compute_dtype(self.dit)
        cfg_on = guide_scale != 1.0
        dit = self.dit
        skip = tuple(self.config.uncond_skip_blocks)

        # ---- per-call constants: prompts, reference latent and CLIP tokens
        context = self.text_encoder.encode([prompt]).to(dev, dit_dtype)
        context_null = self.text_encoder.encode([negative_prompt]).to(dev, dit_dtype) if cfg_on else None
        context_ref = self.text_encoder.encode([reference_prompt]).to(dev, dit_dtype)
        ref_pixels = to_tensor_video(letterbox(ref, height, width)[None])[:, :, 0].to(dev)  # [1, 3, H, W]
        clip_fea = self.image_encoder.encode(ref_pixels).to(dev, dit_dtype)
        ref_latent = self.vae.encode(ref_pixels.unsqueeze(2))

        def segment(start: int, prev: torch.Tensor | None) -> Denoiser:
            clip = to_tensor_video(driving[idx[start:start + clip_len]]).to(dev)  # [1, 3, clip_len, H, W]
            driving_latents = self.vae.encode(clip).to(dit_dtype)
            clip_ref = self.image_encoder.encode(clip[:, :, 0]).to(dev, dit_dtype)
            cache = dit.extract(driving_latents, context_ref, clip_ref)  # once per segment
            y = encode_condition(self.vae, ref_pixels, clip_len=clip_len, mode="animate", prev_frames=prev,
                                 ref_latent=ref_latent).to(dit_dtype)

            def denoise(x: torch.Tensor, t: torch.Tensor, uncond: bool) -> torch.Tensor:
                return dit.generate(x.to(dit_dtype), t, context_null if uncond else context, clip_fea, y, cache,
                                    log_scale=log_scale, skip_blocks=skip if uncond else ())

            return denoise

        was_training = dit.training  # training validation passes the live model
        dit.eval()
        try:
            lat_shape = (1, self.config.out_dim, num_latent_frames(clip_len) + 1,
                         height // self.vae.spatial_stride, width // self.vae.spatial_stride)
            return run_segments(self.vae, segment, n_seg=n_seg, clip_len=clip_len, refert_num=refert_num,
                                real_len=real_len, lat_shape=lat_shape, seed=seed, device=dev, steps=steps,
                                shift=shift, solver=solver, guide_scale=guide_scale, progress=progress)
        finally:
            dit.train(was_training)
