"""Animate-2 generation: reference image + raw driving video -> video.

:class:`Animate2Pipeline` is the family sibling of :class:`wan_animate.pipeline.AnimatePipeline`:
the same encoders, folder layouts, segment loop (mirror padding, ``clip_len`` segments overlapping
by ``refert_num`` frames), sampler and CFG (:func:`wan_animate.sampling.sample`) and conditioning
builder (:func:`wan_animate.conditioning.encode_condition`, animate mode). What differs, per segment:

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
from wan_animate.conditioning import encode_condition
from wan_animate.config import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT
from wan_animate.pipeline import (
    AnimatePipeline,
    Denoiser,
    check_driving,
    check_sampling,
    check_segments,
    load_image,
    read_video_file,
    to_tensor_video,
)

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
    check_segments(clip_len, refert_num)
    return check_driving(driving_video, "driving_video", refert_num)


class Animate2Pipeline(AnimatePipeline):
    """Animate-2 DiT + the Wan encoders (VAE, umT5, CLIP). Build with :meth:`from_pretrained`."""

    config_class = Animate2Config
    input_videos = ("driving",)
    sequence_parallel = False  # not available for Animate-2 generation yet

    @staticmethod
    def load_dit(path: Path, *, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
        from wan_animate.animate2.weights import load_animate2

        return load_animate2(path, dtype=dtype, device=device)

    @classmethod
    def sampling_defaults(cls, distilled: bool = False) -> dict[str, Any]:
        d = DISTILLED if distilled else BASE
        return dict(steps=d.steps, guide_scale=d.guide_scale, solver=d.solver, clip_len=d.clip_len,
                    log_scale=d.log_scale)

    @classmethod
    def read_inputs(cls, ref, videos, *, clip_len, refert_num, max_frames=None, target_area=None):
        """The raw driving video cut to ``max_frames`` and resized to the ``target_area`` bucket
        (sides multiples of 16), checked; no pose or face extraction."""
        from wan_animate.geometry import ResizePlan, area_bucket

        frames, fps = read_video_file(videos["driving"], "driving video")
        frames = frames[:max_frames] if max_frames else frames
        if target_area:
            height, width = area_bucket(frames.shape[1], frames.shape[2], target_area)
            if (height, width) != tuple(frames.shape[1:3]):
                frames = ResizePlan(frames.shape[1], frames.shape[2], height, width).apply_all(frames)
        check_driving_video(frames, clip_len=clip_len, refert_num=refert_num)
        return dict(ref_image=load_image(ref), driving_video=frames), fps

    @torch.no_grad()
    def generate(  # type: ignore[override]
        self, ref_image: Any, driving_video: Any, *, prompt: str = DEFAULT_PROMPT,
        negative_prompt: str = DEFAULT_NEGATIVE_PROMPT, reference_prompt: str = REFERENCE_PROMPT,
        steps: int = BASE.steps, shift: float = BASE.shift, guide_scale: float = BASE.guide_scale, seed: int = 0,
        solver: str = BASE.solver, clip_len: int = BASE.clip_len, refert_num: int = BASE.refert_num,
        log_scale: float | None = None, progress: bool = True,
    ) -> np.ndarray:
        """Animate ``ref_image`` (uint8 [H, W, 3] or path) with the raw ``driving_video`` (uint8
        [T, H, W, 3]). ``log_scale`` None: the model config's (distilled checkpoints: ``DISTILLED``).
        Returns uint8 ``[T, H, W, 3]`` with T = driving length, at the driving video's size."""
        sampling = dict(steps=steps, shift=shift, guide_scale=guide_scale, solver=solver, clip_len=clip_len,
                        refert_num=refert_num)
        check_sampling(**sampling)
        driving = check_driving(driving_video, "driving_video", refert_num)
        dit, skip = self.dit, tuple(self.config.uncond_skip_blocks)

        def conditioning(c):
            context_ref = self.text_encoder.encode([reference_prompt]).to(c.device, c.dtype)

            def segment(start: int, prev: torch.Tensor | None) -> Denoiser:
                clip = to_tensor_video(driving[c.idx[start:start + clip_len]]).to(c.device)  # [1, 3, clip_len, H, W]
                driving_latents = self.vae.encode(clip).to(c.dtype)
                clip_ref = self.image_encoder.encode(clip[:, :, 0]).to(c.device, c.dtype)
                cache = dit.extract(driving_latents, context_ref, clip_ref)  # once per segment
                y = encode_condition(self.vae, c.ref_pixels, clip_len=clip_len, mode="animate", prev_frames=prev,
                                     ref_latent=c.ref_latent).to(c.dtype)

                def denoise(x: torch.Tensor, t: torch.Tensor, uncond: bool) -> torch.Tensor:
                    return dit.generate(x.to(c.dtype), t, c.context_null if uncond else c.context, c.clip_fea, y,
                                        cache, log_scale=log_scale, skip_blocks=skip if uncond else ())

                return denoise

            return segment

        return self._run_segments(ref_image, driving, conditioning, prompt=prompt, negative_prompt=negative_prompt,
                                  seed=seed, progress=progress, **sampling)
