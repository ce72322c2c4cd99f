"""Identity preservation: CLIP image-embedding cosine between the reference image and frames.

Uses the model's own image encoder (``pipeline.image_encoder``: CLIP ViT-H/14 in the real model;
``encode(images [B, 3, H, W] in [-1, 1]) -> [B, 257, D]``, the penultimate block's tokens). The
class token (token 0) is the image embedding. Frames are sampled evenly (``max_frames``) to bound
cost; the score is the mean cosine over them.
"""

from __future__ import annotations

import numpy as np
import torch


def _to_input(images: np.ndarray, device, dtype) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return (x.permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0)  # [B, 3, H, W] in [-1, 1]


def _encoder_device_dtype(encoder) -> tuple[torch.device, torch.dtype]:
    params = list(encoder.parameters()) if hasattr(encoder, "parameters") else []
    if params:
        return params[0].device, params[0].dtype
    return torch.device(getattr(encoder, "device", "cpu")), getattr(encoder, "dtype", torch.float32)


@torch.no_grad()
def embed_images(encoder, images: np.ndarray, *, batch_size: int = 8) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> unit-norm float32 class-token embeddings ``[N, D]``."""
    device, dtype = _encoder_device_dtype(encoder)
    out = []
    for i in range(0, len(images), batch_size):
        tokens = encoder.encode(_to_input(images[i : i + batch_size], device, dtype))  # [B, 257, D]
        out.append(tokens[:, 0].float().cpu())
    emb = torch.cat(out)
    return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def sample_indices(num_frames: int, max_frames: int) -> np.ndarray:
    if max_frames <= 0 or num_frames <= max_frames:
        return np.arange(num_frames)
    return np.unique(np.linspace(0, num_frames - 1, max_frames).round().astype(int))


def identity_similarity(encoder, reference: np.ndarray, frames: np.ndarray, *, max_frames: int = 16) -> float:
    """Mean cosine between the reference image ``[H, W, 3]`` and sampled frames ``[T, H, W, 3]``."""
    frames = np.asarray(frames)
    reference = np.asarray(reference)
    if reference.shape != frames.shape[1:]:
        # One batch needs one size; bring the reference to the frames' size (CLIP resizes anyway).
        import cv2

        reference = cv2.resize(reference, (frames.shape[2], frames.shape[1]), interpolation=cv2.INTER_AREA)
    ref = embed_images(encoder, reference[None])  # [1, D]
    gen = embed_images(encoder, frames[sample_indices(len(frames), max_frames)])  # [n, D]
    return float((gen @ ref[0]).mean())
