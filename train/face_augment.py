"""Face-crop augmentation, the paper's stage-2 recipe (scale, colour jitter, noise).

The face crops drive expressions through the motion encoder; augmenting them keeps the model from
copying the driving person's appearance (identity, lighting, skin tone) into the output. One set
of parameters is drawn per clip, so the augmentation does not itself flicker over time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class FaceAugmentParams:
    scale: float  # zoom factor around the crop centre (> 1 zooms in)
    brightness: float  # added to all channels, in [-1, 1] pixel units
    contrast: float  # multiplies the deviation from the per-frame mean
    saturation: float  # 0 = grey, 1 = unchanged
    noise_std: float  # Gaussian noise, [-1, 1] pixel units


def draw_face_augment(rng: np.random.Generator, *, scale: float, color: float, noise: float) -> FaceAugmentParams:
    """Parameters uniform in ``1 +- scale``, ``+- color`` (brightness) / ``1 +- color`` (contrast,
    saturation) and noise std in ``[0, noise]``."""
    return FaceAugmentParams(scale=float(rng.uniform(1 - scale, 1 + scale)),
                             brightness=float(rng.uniform(-color, color)),
                             contrast=float(rng.uniform(1 - color, 1 + color)),
                             saturation=float(rng.uniform(1 - color, 1 + color)),
                             noise_std=float(rng.uniform(0, noise)))


def augment_face(face: torch.Tensor, p: FaceAugmentParams, noise_seed: int) -> torch.Tensor:
    """``face`` [3, F, S, S] in [-1, 1] -> augmented crop of the same shape, clipped to [-1, 1]."""
    c, f, s, _ = face.shape
    frames = face.transpose(0, 1).float()  # [F, 3, S, S]
    if p.scale != 1.0:
        # Sample a (1 / scale)-sized window around the centre: zoom in for scale > 1, out (edges
        # repeated) for scale < 1; the face stays centred as the cropper placed it.
        theta = torch.tensor([[1.0 / p.scale, 0.0, 0.0], [0.0, 1.0 / p.scale, 0.0]]).expand(f, 2, 3)
        grid = F.affine_grid(theta, [f, c, s, s], align_corners=False)
        frames = F.grid_sample(frames, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # [-1, 1] -> colour operations in [0, 1] pixel space
    x = (frames + 1) / 2
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # [F, 1, S, S]
    x = grey + p.saturation * (x - grey)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + p.contrast * (x - mean) + p.brightness / 2
    out = x * 2 - 1
    if p.noise_std > 0:
        g = torch.Generator().manual_seed(noise_seed)
        out = out + p.noise_std * torch.randn(out.shape, generator=g)
    return out.clamp(-1, 1).transpose(0, 1).to(face.dtype)
