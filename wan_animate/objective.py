"""Flow-matching loss of Wan-Animate (rectified flow, velocity target).

For clean latents ``x0`` and Gaussian noise ``eps``, with noise level ``s = t / 1000``::

    x_t    = (1 - s) * x0 + s * eps
    target = eps - x0                    # the velocity the DiT predicts

``t`` is drawn uniformly and pushed towards high noise by the shift ``s' = k s / (1 + (k-1) s)``
(Wan's sampler uses k = 5), or from a logit-normal (then shifted too unless ``shift = 1``). The loss
is a (optionally face-weighted) mean squared error over the **target** slots 1..T only: slot 0 holds
the reference image, which the DiT sees as condition and whose prediction is dropped at inference.

``flow_matching_loss`` is the one function used by training and by eval's held-out loss (which
passes fixed ``timesteps`` and a seeded ``generator`` so numbers are comparable across runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

NUM_TRAIN_TIMESTEPS = 1000
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
LOSS_WEIGHTINGS = ("none", "cosmap", "logit_normal")


# ---- config


@dataclass
class LossConfig:
    timestep_sampling: str = "uniform"  # "uniform" | "logit_normal"
    shift: float = 5.0  # applied after sampling; 1.0 = no shift
    logit_mean: float = 0.0
    logit_std: float = 1.0
    weighting: str = "none"  # per-timestep weight: "none" | "cosmap" | "logit_normal"
    face_weight: float = 1.0  # >1 up-weights latent pixels inside face boxes (paper stage 2)

    def __post_init__(self) -> None:
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(
                f"loss.timestep_sampling={self.timestep_sampling!r}; choose one of {TIMESTEP_SAMPLINGS}."
            )
        if self.weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss.weighting={self.weighting!r}; choose one of {LOSS_WEIGHTINGS}.")
        if not self.shift > 0:
            raise ValueError(f"loss.shift={self.shift} must be > 0 (1.0 disables the shift; Wan uses 5.0).")
        if not self.logit_std > 0:
            raise ValueError(f"loss.logit_std={self.logit_std} must be > 0.")
        if not self.face_weight >= 1.0:
            raise ValueError(f"loss.face_weight={self.face_weight} must be >= 1 (1 disables face up-weighting).")


# ---- timesteps


def shift_sigma(s: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan/SD3 time shift: ``k s / (1 + (k - 1) s)``; maps [0,1] onto [0,1], k > 1 favours noise.
    Training draws and the sampler's float64 grids (numpy arrays) both go through it (k = 1: s, exactly)."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def sample_timesteps(
    batch_size: int,
    cfg: LossConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training timesteps ``t`` in [0, 1000], float32 [B] (noise level s = t / 1000, shift applied)."""
    if cfg.timestep_sampling == "uniform":
        u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float32)
    else:
        n = torch.randn(batch_size, generator=generator, device=device, dtype=torch.float32)
        u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * n)
    return shift_sigma(u, cfg.shift) * NUM_TRAIN_TIMESTEPS


def timestep_weight(t: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Per-sample loss weight [B] for timesteps ``t``; the mean over a uniform draw is ~1."""
    s = (t.float() / NUM_TRAIN_TIMESTEPS).clamp(1e-4, 1 - 1e-4)
    if cfg.weighting == "none":
        return torch.ones_like(s)
    if cfg.weighting == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * s + 2.0 * s * s))
    # Logit-normal density of s: emphasises mid noise levels.
    logit = torch.log(s / (1 - s))
    z = (logit - cfg.logit_mean) / cfg.logit_std
    return torch.exp(-0.5 * z * z) / (cfg.logit_std * math.sqrt(2 * math.pi) * s * (1 - s))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - s) x0 + s eps`` with ``s = t / 1000`` broadcast over [B, C, F, H, W]."""
    s = (t.float() / NUM_TRAIN_TIMESTEPS).view(-1, *([1] * (x0.ndim - 1)))
    return ((1.0 - s) * x0.float() + s * noise.float()).to(x0.dtype)


# ---- loss


def predict_wan_animate(dit, x_t: torch.Tensor, timesteps: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
    """Wan-Animate-14B's forward on the batch ``flow_matching_loss`` documents (its family's ``predict``)."""
    inputs = [batch[k] for k in ("context", "clip_fea", "y", "pose_latents", "face_pixel_values")]
    # the conditioning is already in the model's input dtype
    return dit(x_t.to(batch["y"].dtype), timesteps, *inputs)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, what backward() sees
    per_sample: torch.Tensor  # [B] weighted MSE of each sample (detached)
    timesteps: torch.Tensor  # [B]


def flow_matching_loss(
    dit: Callable[..., torch.Tensor],
    batch: Mapping[str, Any],
    cfg: LossConfig | None = None,
    *,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    predict: Callable[..., torch.Tensor] | None = None,
) -> LossOutput:
    """Flow-matching loss of ``dit`` on one conditioned batch.

    ``batch`` holds the DiT inputs built by ``wan_animate.conditioning``:
      ``latents``  [B, 16, T+1, h, w] clean latents, slot 0 = reference image latent,
      ``context`` [B, L_text, text_dim], ``clip_fea`` [B, 257, image_dim],
      ``y`` [B, 20, T+1, h, w], ``pose_latents`` [B, 16, T, h, w], ``face_pixel_values`` [B, 3, F, S, S],
      optional ``face_region`` [B, T, h, w] in {0,1} (latent-grid face boxes of the target slots).
    ``timesteps`` [B] in [0, 1000] and ``noise`` (shape of ``latents``) fix the draw; otherwise they
    are sampled from ``generator`` (or the global RNG). ``predict(dit, x_t, timesteps, batch)``
    runs the model of another family (``wan_animate.family``); default: the Wan-Animate-14B
    inputs above.
    """
    cfg = cfg or LossConfig()
    x0 = batch["latents"]
    b = x0.shape[0]
    device = x0.device
    # draws happen on the generator's device (CPU generators keep CPU and GPU runs identical)
    draw_device = generator.device if generator is not None else device
    if timesteps is None:
        timesteps = sample_timesteps(b, cfg, generator=generator, device=draw_device)
    timesteps = timesteps.to(device=device, dtype=torch.float32)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=draw_device, dtype=torch.float32)
    noise = noise.to(device)

    x_t = add_noise(x0.float(), noise, timesteps)  # [B, 16, T+1, h, w]
    target = (noise.float() - x0.float())[:, :, 1:]  # target slots only
    pred = (predict or predict_wan_animate)(dit, x_t, timesteps, batch)
    pred = pred.float()[:, :, 1:]  # drop the reference slot
    sq = (pred - target).pow(2).mean(dim=1)  # [B, T, h, w]

    face_region = batch.get("face_region")
    if face_region is not None and cfg.face_weight != 1.0:
        w = 1.0 + (cfg.face_weight - 1.0) * face_region.to(sq.device, sq.dtype)
        per_sample = (sq * w).flatten(1).sum(1) / w.flatten(1).sum(1)
    else:
        per_sample = sq.flatten(1).mean(1)
    weights = timestep_weight(timesteps, cfg).to(per_sample.device)
    loss = (per_sample * weights).mean()
    return LossOutput(loss=loss, per_sample=per_sample.detach(), timesteps=timesteps.detach())
