"""Pixel-level reconstruction metrics: PSNR and SSIM.

Both take uint8 videos ``[T, H, W, 3]`` (numpy or torch) and compare them frame by frame on the
0..255 scale. They are deterministic and need no weights.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

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


# ---------------------------------------------------------------------------- PSNR


def psnr(generated, target, *, data_range: float = 255.0) -> float:
    """PSNR in dB of the whole video: ``10 log10(R^2 / MSE)`` with the MSE over all frames.

    Using the video-level MSE (not the mean of per-frame PSNRs) means a single identical frame
    cannot make the score infinite; only identical videos give ``inf``.
    """
    a, b = as_float_video(generated), as_float_video(target)
    check_same_shape(a, b, "psnr")
    mse = float(torch.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


# ---------------------------------------------------------------------------- SSIM
# Wang, Bovik, Sheikh, Simoncelli (2004): Gaussian window 11x11, sigma 1.5, K1 0.01, K2 0.03,
# statistics over the "valid" region of the window (no padding), averaged over the map.


def gaussian_1d(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()  # [size], sums to 1


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = gaussian_1d(size, sigma)
    return torch.outer(g, g)  # [size, size], sums to 1


def ssim_per_frame(
    generated,
    target,
    *,
    data_range: float = 255.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """SSIM of each frame (mean over the SSIM map and the three colour channels) -> ``[T]``."""
    a, b = as_float_video(generated), as_float_video(target)
    check_same_shape(a, b, "ssim")
    t, c, h, w = a.shape
    if h < window_size or w < window_size:
        raise ValueError(f"ssim: frames {h}x{w} are smaller than the {window_size}x{window_size} window")
    # The Gaussian window is separable: two 1-D passes (11 + 11 taps) instead of one 11x11 pass.
    g = gaussian_1d(window_size, sigma).to(a)
    stats = torch.cat([a, b, a * a, b * b, a * b], dim=1).reshape(t * 5 * c, 1, h, w)
    stats = F.conv2d(stats, g.view(1, 1, 1, -1))  # valid region along W
    stats = F.conv2d(stats, g.view(1, 1, -1, 1))  # valid region along H
    mu_a, mu_b, e_aa, e_bb, e_ab = stats.reshape(t, 5, c, *stats.shape[-2:]).unbind(1)
    var_a = e_aa - mu_a**2
    var_b = e_bb - mu_b**2
    cov = e_ab - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean(dim=(1, 2, 3))  # [T]


def ssim(generated, target, **kwargs) -> float:
    """Mean SSIM over frames (1.0 for identical videos)."""
    return float(ssim_per_frame(generated, target, **kwargs).mean())
