"""Held-out flow-matching loss at pinned draws, and condition sensitivity.

``heldout_loss``: the training loss (``wan_animate.objective.flow_matching_loss``) with every draw
pinned: each batch is evaluated at every timestep in ``timesteps``, with noise from a generator
seeded by ``seed + batch index``, so two checkpoints (or two runs) see exactly the same noisy inputs
and the numbers are comparable. One DiT forward per (batch, timestep), no sampling loop.

``condition_sensitivity``: the same held-out loss with one condition of every sample replaced by
another sample's (``swap_condition``), minus the loss with its own conditions, per condition and
per timestep, on the *same* noise. A model that follows its pose video loses accuracy when it is
given another clip's pose: a positive gap. A gap near 0 means the model ignores that condition.

Conditions: the model family's ``conditions`` (``wan_animate.family``), each the batch keys
swapped whole; ``ref`` swaps the reference everywhere it enters, also slot 0 of ``y`` and of the
latents (noised with the target but never scored).

Used by eval's ``heldout`` / ``sensitivity`` metrics and by training's end-of-run report.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from wan_animate.family import ANIMATE
from wan_animate.objective import LossConfig, flow_matching_loss

DEFAULT_TIMESTEPS = (100.0, 300.0, 500.0, 700.0, 900.0)
# Held-out numbers must not depend on the training weighting knobs: plain MSE per timestep.
PLAIN_LOSS = LossConfig(weighting="none", face_weight=1.0)
CONDITIONS = tuple(ANIMATE.conditions)


def _check_timesteps(timesteps) -> list[float]:
    timesteps = [float(t) for t in timesteps]
    if not timesteps or any(not 0.0 <= t <= 1000.0 for t in timesteps):
        raise ValueError(f"held-out timesteps must be a non-empty list in [0, 1000], got {timesteps}")
    return timesteps


def _loss_sums(dit, batch: Mapping[str, Any], index: int, timesteps: list[float], seed: int,
               loss_cfg, family=ANIMATE) -> Counter:
    """Summed loss over the samples of ``batch`` at each timestep; noise from ``seed + index`` (the
    same for every call with the same index and latent shape); ``loss_cfg`` None: ``PLAIN_LOSS``."""
    x0 = batch["latents"]
    b = x0.shape[0]
    gen = torch.Generator(device=x0.device).manual_seed(int(seed) + index)
    out = Counter()
    for t in timesteps:
        noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=torch.float32)
        ts = torch.full((b,), t, device=x0.device, dtype=torch.float32)
        out[t] = float(flow_matching_loss(dit, batch, loss_cfg or PLAIN_LOSS, timesteps=ts, noise=noise,
                                          predict=family.predict).per_sample.float().sum())
    return out


@contextlib.contextmanager
def _eval_mode(dit):
    was_training = getattr(dit, "training", False)
    if hasattr(dit, "eval"):
        dit.eval()
    try:
        yield
    finally:
        if was_training and hasattr(dit, "train"):
            dit.train()


@torch.no_grad()
def heldout_loss(
    dit: Callable[..., torch.Tensor],
    batches: Iterable[Mapping[str, Any]],
    *,
    timesteps=DEFAULT_TIMESTEPS,
    seed: int = 0,
    loss_cfg=None,
    progress: bool = False,
    family=ANIMATE,
) -> dict:
    """Mean loss per timestep and overall. ``batches`` are conditioned DiT batches (see
    ``wan_animate.objective.flow_matching_loss``). Returns ``{"heldout_loss": float, "heldout_loss@t<t>": ...,
    "heldout_samples": int}``."""
    timesteps = _check_timesteps(timesteps)
    sums = Counter()
    count = 0
    with _eval_mode(dit):
        for i, batch in enumerate(tqdm(batches, desc="held-out loss", unit="batch", disable=not progress)):
            sums.update(_loss_sums(dit, batch, i, timesteps, seed, loss_cfg, family))
            count += batch["latents"].shape[0]
    if count == 0:
        raise ValueError("held-out loss got no batches; check the held-out set")
    per_t = {f"heldout_loss@t{t:g}": sums[t] / count for t in timesteps}
    return {"heldout_loss": sum(per_t.values()) / len(per_t), **per_t, "heldout_samples": count}


# ---------------------------------------------------------------------------- condition swaps


def swap_condition(own: Mapping[str, Any], other: Mapping[str, Any], condition: str, family=ANIMATE) -> dict:
    """``own`` (a one-sample batch of ``family``) with ``condition`` taken from ``other`` (same shapes)."""
    if condition not in family.conditions:
        raise ValueError(f"condition={condition!r}; choose one of {tuple(family.conditions)}.")
    out = dict(own)
    out.update({k: other[k] for k in family.conditions[condition]})
    if condition == "ref":  # the reference slot of the condition and of the (noised, unscored) latents
        for key in ("y", "latents"):
            out[key] = own[key].clone()
            out[key][:, :, 0] = other[key][:, :, 0]
    return out


def swap_partners(batches: Sequence[Mapping[str, Any]], family=ANIMATE) -> list[int | None]:
    """For each one-sample batch, the index of the batch it borrows conditions from: the next batch
    of the same shapes, cyclically (``None`` when no other batch has its shapes)."""
    groups: dict[tuple, list[int]] = {}  # the shapes of the swapped tensors -> batches
    keys = ("latents", "y", *(k for names in family.conditions.values() for k in names))
    for i, b in enumerate(batches):
        if b["latents"].shape[0] != 1:
            raise ValueError(f"condition sensitivity needs one-sample batches; batch {i} holds "
                             f"{b['latents'].shape[0]}.")
        groups.setdefault(tuple(tuple(b[k].shape) for k in keys), []).append(i)
    partner: list[int | None] = [None] * len(batches)
    for members in groups.values():
        if len(members) > 1:
            for j, i in enumerate(members):
                partner[i] = members[(j + 1) % len(members)]
    return partner


@torch.no_grad()
def condition_sensitivity(
    dit: Callable[..., torch.Tensor],
    batches: Sequence[Mapping[str, Any]],
    *,
    timesteps=DEFAULT_TIMESTEPS,
    seed: int = 0,
    conditions: Sequence[str] | None = None,
    loss_cfg=None,
    progress: bool = False,
    family=ANIMATE,
) -> dict:
    """Held-out loss with each condition (default: all of ``family.conditions``) swapped across
    ``batches`` (one sample each of ``family``) minus the loss with its own, on the same noise and
    timesteps.

    Returns ``{"sensitivity_<c>": mean gap over timesteps, "sensitivity_<c>@t<t>": gap at t,
    "sensitivity_own_loss": own loss (the same samples), "sensitivity_<c>_ratio": swapped / own,
    "sensitivity_samples": n, "sensitivity_unpaired": samples with no partner of their shapes}``."""
    timesteps = _check_timesteps(timesteps)
    conditions = tuple(family.conditions) if conditions is None else conditions  # swap_condition checks each
    batches = list(batches)
    partner = swap_partners(batches, family)
    own, swapped = Counter(), {c: Counter() for c in conditions}
    count = 0
    with _eval_mode(dit):
        for i in tqdm(range(len(batches)), desc="condition sensitivity", unit="sample", disable=not progress):
            j = partner[i]
            if j is None:
                continue
            own.update(_loss_sums(dit, batches[i], i, timesteps, seed, loss_cfg, family))
            for c in conditions:
                moved = swap_condition(batches[i], batches[j], c, family)
                swapped[c].update(_loss_sums(dit, moved, i, timesteps, seed, loss_cfg, family))
            count += 1
    if count == 0:
        raise ValueError(f"condition sensitivity needs at least two samples of the same shape; got "
                         f"{len(batches)} sample(s) with no pair.")
    out: dict[str, float | int] = {}
    own_mean = sum(own.values()) / (count * len(timesteps))
    for c in conditions:
        gaps = {t: (swapped[c][t] - own[t]) / count for t in timesteps}
        out[f"sensitivity_{c}"] = sum(gaps.values()) / len(gaps)
        out[f"sensitivity_{c}_ratio"] = (own_mean + out[f"sensitivity_{c}"]) / own_mean if own_mean > 0 else float("nan")
        out.update({f"sensitivity_{c}@t{t:g}": g for t, g in gaps.items()})
    return {**out, "sensitivity_own_loss": own_mean, "sensitivity_samples": count,
            "sensitivity_unpaired": len(batches) - count}
