"""The one conditioning builder of Wan-Animate (facts section 1), shared by training and inference.

The DiT sees ``y = [mask (4 ch) ; condition latent (16 ch)]`` on ``T + 1`` latent frames:

* slot 0 (reference): the VAE latent of the reference image, mask 1 everywhere;
* slots 1..T (targets): the VAE latent of the *temporal reference* video, a pixel clip of
  ``clip_len`` frames whose first ``num_given`` frames are given (frames carried from the previous
  segment, or ground truth in training) and whose other frames are zeros (animate mode) or the
  background video (replace mode). The mask is 1 on given pixel frames; in replace mode it is
  additionally 1 on the environment (``1 - character_mask``, nearest-downsampled to H/8 x W/8).

The official sampler gives *no* frames on the first segment (``num_given = 0``: animate -> all
zeros, replace -> the whole background clip) and ``refert_num`` frames on later segments.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from wan_animate.options import check_frames_4n1

Mode = Literal["animate", "replace"]

VAE_TEMPORAL_STRIDE = 4
MASK_CHANNELS = 4


def num_latent_frames(num_pixel_frames: int) -> int:
    """Wan VAE time compression: ``T`` pixel frames -> ``(T - 1) // 4 + 1`` latent frames."""
    check_frames_4n1(num_pixel_frames)
    return (num_pixel_frames - 1) // VAE_TEMPORAL_STRIDE + 1


def _check_mode(mode: str) -> None:
    if mode not in ("animate", "replace"):
        raise ValueError(f"mode={mode!r} must be 'animate' or 'replace'.")


def pack_pixel_mask(pixel_mask: torch.Tensor) -> torch.Tensor:
    """Pack a per-pixel-frame mask into the DiT's 4 mask channels.

    ``pixel_mask [B, 1, F, h, w]`` with ``F = 4n + 1`` -> ``[B, 4, n + 1, h, w]``: pixel frame 0 is
    repeated 4 times so it fills latent frame 0 on its own, like the VAE's causal first frame.
    """
    if pixel_mask.ndim != 5 or pixel_mask.shape[1] != 1:
        raise ValueError(f"pixel_mask must be [B, 1, F, h, w], got {tuple(pixel_mask.shape)}.")
    b, _, f, h, w = pixel_mask.shape
    t = num_latent_frames(f)
    first = pixel_mask[:, :, :1].expand(b, 1, MASK_CHANNELS, h, w)
    frames = torch.cat([first, pixel_mask[:, :, 1:]], dim=2)  # [B, 1, 4 t, h, w]
    # consecutive groups of 4 pixel frames -> the 4 channels of one latent frame
    return frames.reshape(b, t, MASK_CHANNELS, h, w).transpose(1, 2).contiguous()


def resize_frames(video: torch.Tensor, size: tuple[int, int], **interpolate) -> torch.Tensor:
    """``F.interpolate(**interpolate)`` of every frame of ``video [B, C, T, H, W]`` to ``size`` (h, w)."""
    b, c, t = video.shape[:3]
    flat = F.interpolate(video.transpose(1, 2).reshape(b * t, c, *video.shape[-2:]), size=tuple(size), **interpolate)
    return flat.reshape(b, t, c, *size).transpose(1, 2)


def environment_mask(character_mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Replace mode: ``character_mask [B, 1, F, H, W]`` (1 on the character, pixel resolution,
    values in [0, 1]) -> ``[B, 1, F, h, w]`` that is 1 on the environment, nearest-downsampled."""
    if character_mask.ndim != 5 or character_mask.shape[1] != 1:
        raise ValueError(f"character_mask must be [B, 1, F, H, W], got {tuple(character_mask.shape)}.")
    return resize_frames(1.0 - character_mask.float(), latent_hw, mode="nearest").contiguous()


def temporal_mask(
    num_pixel_frames: int,
    latent_hw: tuple[int, int],
    *,
    num_given: int,
    batch_size: int = 1,
    env_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Mask of the target slots ``[B, 4, T, h, w]``: 1 on the first ``num_given`` pixel frames and,
    when ``env_mask [B, 1, F, h, w]`` is given (replace mode), on the environment."""
    if not 0 <= num_given <= num_pixel_frames:
        raise ValueError(f"num_given={num_given} must be in [0, num_pixel_frames={num_pixel_frames}].")
    h, w = latent_hw
    if env_mask is None:
        pixel = torch.zeros(batch_size, 1, num_pixel_frames, h, w, device=device)
    else:
        if tuple(env_mask.shape[2:]) != (num_pixel_frames, h, w):
            raise ValueError(
                f"env_mask has shape {tuple(env_mask.shape)}, expected [B, 1, {num_pixel_frames}, {h}, {w}]."
            )
        pixel = env_mask.float().clone().to(device)
    pixel[:, :, :num_given] = 1.0
    return pack_pixel_mask(pixel)


def temporal_reference_video(
    clip_len: int,
    height: int,
    width: int,
    *,
    mode: Mode = "animate",
    prev_frames: torch.Tensor | None = None,
    bg_video: torch.Tensor | None = None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, int]:
    """The temporal reference clip (module docstring) ``(video [B, 3, clip_len, H, W] in [-1, 1],
    num_given)`` from ``prev_frames [B, 3, n, H', W']`` (``None`` on a first segment; resized
    bicubically to ``H x W``) and, in replace mode, ``bg_video [B, 3, clip_len, H, W]``."""
    _check_mode(mode)
    check_frames_4n1(clip_len)
    if mode == "replace":
        if bg_video is None:
            raise ValueError("mode='replace' needs bg_video [B, 3, clip_len, H, W].")
        if bg_video.ndim != 5 or tuple(bg_video.shape[1:]) != (3, clip_len, height, width):
            raise ValueError(
                f"bg_video has shape {tuple(bg_video.shape)}, expected [B, 3, {clip_len}, {height}, {width}]."
            )
        batch_size = bg_video.shape[0]
    if prev_frames is None:
        given = torch.zeros(batch_size, 3, 0, height, width, device=device, dtype=dtype)
    else:
        if prev_frames.ndim != 5 or prev_frames.shape[1] != 3:
            raise ValueError(f"prev_frames must be [B, 3, n, H, W], got {tuple(prev_frames.shape)}.")
        if prev_frames.shape[2] >= clip_len:
            raise ValueError(
                f"{prev_frames.shape[2]} carried frames leave nothing to generate in a clip of {clip_len}."
            )
        given = prev_frames.to(device=device, dtype=dtype)
        batch_size = given.shape[0]
        if tuple(given.shape[-2:]) != (height, width):
            given = resize_frames(given.float(), (height, width), mode="bicubic", align_corners=False).to(dtype)
    n = given.shape[2]
    rest = (bg_video[:, :, n:].to(device=device, dtype=dtype) if mode == "replace"
            else torch.zeros(batch_size, 3, clip_len - n, height, width, device=device, dtype=dtype))
    return torch.cat([given, rest], dim=2), n


def build_condition(
    ref_latent: torch.Tensor,
    temporal_latent: torch.Tensor,
    *,
    num_given: int,
    mode: Mode = "animate",
    character_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Assemble the DiT condition ``y [B, 20, T + 1, h, w]``.

    ``ref_latent [B, 16, 1, h, w]`` and ``temporal_latent [B, 16, T, h, w]`` are normalised VAE
    latents; ``num_given`` is the number of given pixel frames at the start of the temporal
    reference clip (0 on a first segment, refert_num later); ``character_mask [B, 1, F, H, W]``
    (pixels, 1 on the character, ``F = 4 (T - 1) + 1``) is required in replace mode.
    """
    _check_mode(mode)
    if ref_latent.ndim != 5 or ref_latent.shape[2] != 1:
        raise ValueError(f"ref_latent must be [B, C, 1, h, w], got {tuple(ref_latent.shape)}.")
    if temporal_latent.ndim != 5:
        raise ValueError(f"temporal_latent must be [B, C, T, h, w], got {tuple(temporal_latent.shape)}.")
    b, c, t, h, w = temporal_latent.shape
    if (ref_latent.shape[0], ref_latent.shape[1], *ref_latent.shape[3:]) != (b, c, h, w):
        raise ValueError(
            f"ref_latent {tuple(ref_latent.shape)} and temporal_latent {tuple(temporal_latent.shape)} "
            "disagree on batch, channels or latent size."
        )
    f = VAE_TEMPORAL_STRIDE * (t - 1) + 1
    env = None
    if mode == "replace":
        if character_mask is None:
            raise ValueError("mode='replace' needs character_mask [B, 1, F, H, W] (1 on the character).")
        if character_mask.shape[2] != f:
            raise ValueError(
                f"character_mask has {character_mask.shape[2]} frames; {t} latent frames need {f}."
            )
        env = environment_mask(character_mask, (h, w)).to(temporal_latent.device)
    elif character_mask is not None:
        raise ValueError("character_mask is only used in mode='replace'; pass mode='replace' or drop it.")

    ref_mask = torch.ones(b, MASK_CHANNELS, 1, h, w, device=ref_latent.device, dtype=ref_latent.dtype)
    tgt_mask = temporal_mask(f, (h, w), num_given=num_given, batch_size=b, env_mask=env,
                             device=temporal_latent.device).to(temporal_latent.dtype)
    y_ref = torch.cat([ref_mask, ref_latent], dim=1)  # [B, 20, 1, h, w]
    y_tgt = torch.cat([tgt_mask, temporal_latent], dim=1)  # [B, 20, T, h, w]
    return torch.cat([y_ref, y_tgt], dim=2)


def encode_condition(
    vae,
    ref_pixels: torch.Tensor,
    *,
    clip_len: int,
    mode: Mode = "animate",
    prev_frames: torch.Tensor | None = None,
    bg_video: torch.Tensor | None = None,
    character_mask: torch.Tensor | None = None,
    ref_latent: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pixels to ``y``: encode the reference image (unless ``ref_latent`` is given) and the temporal
    reference clip with ``vae`` (a :class:`wan_animate.encoders.WanVAE`), then :func:`build_condition`.

    ``ref_pixels [B, 3, H, W]`` in [-1, 1] (already letterboxed to the clip size).
    """
    b, _, hh, ww = ref_pixels.shape
    if ref_latent is None:
        ref_latent = vae.encode(ref_pixels.unsqueeze(2))
    video, n = temporal_reference_video(
        clip_len, hh, ww, mode=mode, prev_frames=prev_frames, bg_video=bg_video,
        batch_size=b, device=ref_pixels.device, dtype=torch.float32,
    )
    temporal_latent = vae.encode(video)
    return build_condition(ref_latent, temporal_latent.to(ref_latent.dtype), num_given=n, mode=mode,
                           character_mask=character_mask)


def encode_conditions(vae, ref_latent: torch.Tensor, samples: list[dict], *, clip_len: int, height: int,
                      width: int) -> torch.Tensor:
    """``y [B, 20, T+1, h, w]`` for a micro-batch whose samples differ in mode or carried frames
    (training): every sample's temporal reference clip encoded in ONE ``vae`` call, then
    :func:`build_condition` per sample; equal to :func:`encode_condition` per sample.

    ``ref_latent [B, 16, 1, h, w]`` of ``height x width`` pixels; ``samples[i]`` holds ``mode`` and
    optionally ``prev_frames``, ``bg_video``, ``character_mask`` (each with a batch of one), as
    :func:`encode_condition` takes them. One call holds the B clips' activations at once, as the
    target clips' encode already does.
    """
    clips = [temporal_reference_video(clip_len, height, width, mode=s["mode"], prev_frames=s.get("prev_frames"),
                                      bg_video=s.get("bg_video"), device=ref_latent.device, dtype=torch.float32)
             for s in samples]
    latents = vae.encode(torch.cat([video for video, _ in clips])).to(ref_latent.dtype)  # [B, 16, T, h, w]
    return torch.cat([build_condition(ref_latent[i: i + 1], latents[i: i + 1], num_given=n, mode=s["mode"],
                                      character_mask=s.get("character_mask"))
                      for i, ((_, n), s) in enumerate(zip(clips, samples))])
