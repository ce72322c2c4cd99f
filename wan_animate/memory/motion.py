"""The motion encoder over many face frames, chunked: when it trains, each chunk is a
non-reentrant activation checkpoint (autograd would otherwise keep every chunk's conv activations,
all 77 frames at once, until backward); when frozen, it runs under ``torch.no_grad``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def chunk_motion_encoder(encoder: nn.Module, chunk: int) -> str:
    """Set the frame chunk and the grad policy of ``encoder`` (a ``MotionEncoder``), in place.

    Returns "checkpointed" when any of its parameters trains, else "no_grad". Idempotent.
    """
    encoder.chunk_size = int(chunk)
    trains = any(p.requires_grad for p in encoder.parameters())
    if getattr(encoder, "_chunk_policy", None) is not None:
        return encoder._chunk_policy
    if trains:
        inner = encoder.magnitudes

        def magnitudes(faces: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled():
                return checkpoint(inner, faces, use_reentrant=False)
            return inner(faces)

        encoder.magnitudes = magnitudes
        encoder._chunk_policy = "checkpointed"
    else:
        encoder.forward = torch.no_grad()(encoder.forward)
        encoder._chunk_policy = "no_grad"
    return encoder._chunk_policy
