"""Fréchet Video Distance from a user-given I3D TorchScript file.

Format: the ``i3d_torchscript.pt`` Kinetics-400 I3D used by StyleGAN-V and the common
``styleganv`` FVD code. It is loaded with ``torch.jit.load`` and called as
``detector(videos, rescale=False, resize=False, return_features=True)`` on ``[B, 3, T, 224, 224]``
float videos in [-1, 1] (each frame's shorter side resized to 224 with bilinear interpolation, then
centre-cropped), returning ``[B, 400]`` features. FVD is the Fréchet distance between Gaussians
fitted to the features of the generated and the real clips.

Videos are cut into non-overlapping clips of ``clip_frames`` frames (16 as is customary; 0 keeps
whole videos) so a small eval set still gives several feature vectors. The covariance of N clips
has rank at most N - 1, so FVD from few clips is noisy: the clip count is reported with it.
"""

from __future__ import annotations

import os

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F


class FVDError(ValueError):
    """The I3D file is missing or malformed, or too few clips were given."""


def load_i3d(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    if not path or not os.path.isfile(path):
        raise FVDError(f"FVD detector file {str(path)!r} does not exist; pass the path of i3d_torchscript.pt")
    try:
        det = torch.jit.load(str(path), map_location=device)
    except Exception as e:  # jit raises RuntimeError with a long message for non-TorchScript files
        raise FVDError(
            f"{path}: not a TorchScript module ({type(e).__name__}); FVD expects the i3d_torchscript.pt "
            "detector file used by the StyleGAN-V / styleganv FVD code"
        ) from e
    return det.eval()


def preprocess(frames: np.ndarray, resolution: int = 224) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> float ``[3, T, R, R]`` in [-1, 1] (short side resize + centre crop)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().div(255.0).permute(0, 3, 1, 2)  # [T,3,H,W]
    h, w = x.shape[-2:]
    scale = resolution / min(h, w)
    size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    x = x[:, :, top : top + resolution, left : left + resolution]
    return (x * 2 - 1).permute(1, 0, 2, 3).contiguous()


def split_clips(frames: np.ndarray, clip_frames: int) -> list[np.ndarray]:
    if clip_frames <= 0 or len(frames) < clip_frames:
        return [frames]
    return [frames[i : i + clip_frames] for i in range(0, len(frames) - clip_frames + 1, clip_frames)]


@torch.no_grad()
def i3d_features(detector, videos: list[np.ndarray], *, clip_frames: int = 16, batch_size: int = 4,
                 resolution: int = 224, device="cpu") -> np.ndarray:
    """Features ``[N_clips, D]`` of a list of uint8 videos."""
    clips = [c for v in videos for c in split_clips(np.asarray(v), clip_frames)]
    feats = []
    # Clips of different lengths cannot share a batch; group by length.
    for length in sorted({len(c) for c in clips}):
        group = [c for c in clips if len(c) == length]
        for i in range(0, len(group), batch_size):
            x = torch.stack([preprocess(c, resolution) for c in group[i : i + batch_size]]).to(device)
            f = detector(x, rescale=False, resize=False, return_features=True)
            feats.append(f.float().reshape(len(x), -1).cpu().numpy())
    return np.concatenate(feats).astype(np.float64)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` with unbiased covariances."""
    if len(feats_a) < 2 or len(feats_b) < 2:
        raise FVDError(
            f"FVD needs at least 2 clips per side, got {len(feats_a)} generated and {len(feats_b)} real; "
            "use more eval samples or a smaller fvd_clip_frames"
        )
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    s_a, s_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b)
    covmean = np.real(covmean[0] if isinstance(covmean, tuple) else covmean)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def fvd(detector, generated: list[np.ndarray], real: list[np.ndarray], *, clip_frames: int = 16,
        device="cpu") -> tuple[float, int]:
    """FVD between two lists of uint8 videos. Returns ``(fvd, number of clips per side)``."""
    fg = i3d_features(detector, generated, clip_frames=clip_frames, device=device)
    fr = i3d_features(detector, real, clip_frames=clip_frames, device=device)
    return max(frechet_distance(fg, fr), 0.0), min(len(fg), len(fr))

