"""Where the frozen VAE / umT5 / CLIP encoders live during training: never on the device during the
DiT step. Cached shards: loaded only when validation asks, parked on the host. Raw shards,
``model.encoders_device=device``: parked on the host, on the device only to encode a batch (~12 GiB
of the 14B model's encoders off the device for one copy per step). ``cpu``: encode on the host.
"""

from __future__ import annotations

from pathlib import Path

import torch

from train.config import Config
from train.parallel import frozen_loading
from wan_animate.family import get_family


def placement(cfg: Config, device: torch.device) -> tuple[torch.device, bool]:
    """(device the encoders compute on, whether they are parked on the host between uses)."""
    if cfg.model.encoders_device == "cpu":
        return torch.device("cpu"), False
    return torch.device(device), True  # on a CPU-only machine the same path runs (moves are no-ops)


def load_frozen_encoders(cfg: Config, acc, model_path: Path, dit: torch.nn.Module):
    """The family's pipeline over ``dit`` (the live training model, whose train/eval mode is kept)
    with the folder's frozen encoders placed by ``placement``."""
    device, offload = placement(cfg, acc.device)
    # umT5 / CLIP in bf16 on a bf16 run, also on the host (umT5 is released in bf16: fp32 would
    # double its ~11 GiB); the VAE in fp32
    bf16 = cfg.train.precision == "bf16"
    was_training = dit.training
    with frozen_loading():
        pipe = get_family(cfg.model.family).pipeline_class.from_pretrained(
            model_path, dit=dit, dtype=torch.float32, device=device,
            encoder_dtype=torch.bfloat16 if bf16 else torch.float32, offload=offload)
    dit.train(was_training)  # from_pretrained puts the DiT in eval mode
    for enc in (pipe.vae, pipe.text_encoder, pipe.image_encoder):
        enc.module.requires_grad_(False)
    return pipe
