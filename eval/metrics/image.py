"""Pixel-level reconstruction metrics: PSNR and SSIM (torchmetrics' implementation).

Both take uint8 videos ``[T, H, W, 3]`` (numpy or torch) and compare them on the 0..255 scale in
float64. They are deterministic and need no weights.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# ---------------------------------------------------------------------------- helpers


def as_float_video(frames) -> torch.Tensor:
    """uint8 (or float 0..255) ``[T, H, W, 3]`` -> float64 torch ``[T, 3, H, W]`` on 0..255."""
    x = torch.as_tensor(np.asarray(frames) if not torch.is_tensor(frames) else frames)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3], got shape {tuple(x.shape)}")
    return x.to(torch.float64).permute(0, 3, 1, 2).contiguous()


def check_same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{what}: generated and ground-truth videos differ in shape {tuple(a.shape)} vs "
            f"{tuple(b.shape)} ([T, 3, H, W]); generate at the ground truth's size and length."
        )


# ---------------------------------------------------------------------------- PSNR, SSIM (torchmetrics)


def psnr(generated, target, *, data_range: float = 255.0) -> float:
    """PSNR in dB of the whole video: ``10 log10(R^2 / MSE)`` with the MSE over all frames (in float64:
    torchmetrics' ``peak_signal_noise_ratio`` takes ``R`` in float32, ~1e-6 dB off).

    Using the video-level MSE (not the mean of per-frame PSNRs) means a single identical frame
    cannot make the score infinite; only identical videos give ``inf``.
    """
    a, b = as_float_video(generated), as_float_video(target)
    check_same_shape(a, b, "psnr")
    mse = float(torch.mean((a - b) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)


def ssim_per_frame(generated, target, *, data_range: float = 255.0, sigma: float = 1.5, k1: float = 0.01,
                   k2: float = 0.03) -> torch.Tensor:
    """SSIM of each frame -> ``[T]`` (Wang et al. 2004: Gaussian window, sigma 1.5 -> 11x11, K1 0.01,
    K2 0.03), the mean over the colour channels and the map's valid region (where the window fits
    the frame: torchmetrics' map cropped; its own mean also counts the reflect-padded border)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = as_float_video(generated), as_float_video(target)
    check_same_shape(a, b, "ssim")
    pad = int(3.5 * sigma + 0.5)  # torchmetrics' Gaussian window: 2 pad + 1 taps
    if min(a.shape[-2:]) <= 2 * pad:
        raise ValueError(f"ssim: frames {a.shape[-2]}x{a.shape[-1]} are smaller than the {2 * pad + 1}x{2 * pad + 1} window")
    _, full = structural_similarity_index_measure(a, b, sigma=sigma, data_range=data_range, k1=k1, k2=k2,
                                                  return_full_image=True)
    return full[..., pad:-pad, pad:-pad].mean(dim=(1, 2, 3))


def ssim(generated, target, **kwargs) -> float:
    """Mean SSIM over frames (1.0 for identical videos)."""
    return float(ssim_per_frame(generated, target, **kwargs).mean())
