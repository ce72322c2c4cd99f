"""Held-out flow-matching loss at fixed timesteps and seeds.

The same loss as training (``wan_animate.objective.flow_matching_loss``), but every draw is pinned: each
batch is evaluated at every timestep in ``timesteps``, with noise from a generator seeded by
``seed + batch index``, so two checkpoints (or two runs) see exactly the same noisy inputs and the
numbers are comparable. Cheap: one DiT forward per (batch, timestep), no sampling loop.

Training validation calls :func:`heldout_loss` with its own conditioned batches.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch

DEFAULT_TIMESTEPS = (100.0, 300.0, 500.0, 700.0, 900.0)


@torch.no_grad()
def heldout_loss(
    dit: Callable[..., torch.Tensor],
    batches: Iterable[Mapping[str, Any]],
    *,
    timesteps=DEFAULT_TIMESTEPS,
    seed: int = 0,
    loss_cfg=None,
    progress: bool = False,
) -> dict:
    """Mean loss per timestep and overall. ``batches`` are conditioned DiT batches (see
    ``wan_animate.objective.flow_matching_loss``). Returns ``{"heldout_loss": float, "heldout_loss@t<t>": ...,
    "heldout_samples": int}``."""
    from wan_animate.objective import LossConfig, flow_matching_loss

    # Held-out numbers must not depend on the training weighting knobs: plain MSE per timestep.
    loss_cfg = loss_cfg or LossConfig(weighting="none", face_weight=1.0)
    timesteps = [float(t) for t in timesteps]
    if not timesteps or any(not 0.0 <= t <= 1000.0 for t in timesteps):
        raise ValueError(f"held-out timesteps must be a non-empty list in [0, 1000], got {timesteps}")
    sums = {t: 0.0 for t in timesteps}
    count = 0
    was_training = getattr(dit, "training", False)
    if hasattr(dit, "eval"):
        dit.eval()
    try:
        it = batches
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(batches, desc="held-out loss", unit="batch")
        for i, batch in enumerate(it):
            x0 = batch["latents"]
            b = x0.shape[0]
            gen = torch.Generator(device=x0.device).manual_seed(int(seed) + i)
            for t in timesteps:
                noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=torch.float32)
                ts = torch.full((b,), t, device=x0.device, dtype=torch.float32)
                out = flow_matching_loss(dit, batch, loss_cfg, timesteps=ts, noise=noise)
                sums[t] += float(out.per_sample.sum())
            count += b
    finally:
        if was_training and hasattr(dit, "train"):
            dit.train()
    if count == 0:
        raise ValueError("held-out loss got no batches; check the held-out set")
    per_t = {f"heldout_loss@t{t:g}": sums[t] / count for t in timesteps}
    return {"heldout_loss": sum(per_t.values()) / len(per_t), **per_t, "heldout_samples": count}
