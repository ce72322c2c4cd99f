"""Flow-matching sampling on diffusers schedulers, with the official Wan 2.2 sigma grids and CFG.

The DiT predicts the flow velocity ``v = noise - x0`` at the integer timestep
``t = int(1000 * sigma)`` (truncated, as the official schedulers store it). Solvers:

* ``"unipc"`` - ``UniPCMultistepScheduler`` (bh2, flow_prediction) on the official UniPC grid
  ``linspace(0.999, 0, steps + 1)[:-1]`` (0.999 is the official scheduler's float32 ``sigma_max``),
  so the first timestep is 999;
* ``"dpm++"`` - ``DPMSolverMultistepScheduler`` (dpmsolver++, flow_prediction) on the official
  ``get_sampling_sigmas`` grid ``linspace(1, 0, steps + 1)[:steps]`` (first timestep 1000); the
  official animate sampler's default;
* ``"euler"`` - ``FlowMatchEulerDiscreteScheduler`` on ``linspace(1, 0, steps + 1)[:-1]`` (not an
  official sampler; timesteps stay fractional).

Every grid is shifted ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)`` and ends with a final
sigma of 0. diffusers' own flow grids differ (``linspace(1, 1/1000)`` for UniPC, ``1 - linspace(1,
1/1000)`` for DPM++: first timestep 1000 vs 999, sigmas up to 4e-3 apart), so the official grid is
given to the scheduler explicitly.
"""

from __future__ import annotations

import inspect
from typing import Callable

import numpy as np
import torch

from wan_animate.objective import NUM_TRAIN_TIMESTEPS, shift_sigma
from wan_animate.options import SOLVERS

# The official UniPC scheduler's sigma_max: 1 - 1/1000 stored as float32, read back as a Python float.
UNIPC_SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))


def official_sigmas(solver: str, steps: int) -> np.ndarray:
    """The official *unshifted* grid of ``steps`` sigmas for ``solver`` (float64, decreasing)."""
    if solver == "unipc":
        return np.linspace(UNIPC_SIGMA_MAX, 0.0, steps + 1)[:-1].copy()
    if solver in ("dpm++", "euler"):
        return np.linspace(1.0, 0.0, steps + 1)[:steps].copy()
    raise ValueError(f"solver={solver!r} is not one of {SOLVERS}.")


def make_scheduler(solver: str = "unipc", *, shift: float = 5.0):
    """A fresh diffusers scheduler for ``solver`` with the flow-matching ``shift`` (> 0: the caller's
    sampling settings are checked where they are read, ``wan_animate.pipeline.check_sampling``)."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    flow = dict(num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type="flow_prediction",
                use_flow_sigmas=True, flow_shift=shift, solver_order=2)
    if solver == "unipc":
        return UniPCMultistepScheduler(**flow)
    if solver == "dpm++":
        return DPMSolverMultistepScheduler(**flow, algorithm_type="dpmsolver++")
    if solver == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
    raise ValueError(f"solver={solver!r} is not one of {SOLVERS}.")


def _solver_of(scheduler) -> str:
    names = {"UniPCMultistepScheduler": "unipc", "DPMSolverMultistepScheduler": "dpm++",
             "FlowMatchEulerDiscreteScheduler": "euler"}
    name = type(scheduler).__name__
    if name not in names:
        raise ValueError(f"set_schedule: {name} is not a scheduler make_scheduler builds ({SOLVERS}).")
    return names[name]


def set_schedule(scheduler, steps: int, device=None) -> None:
    """Give ``scheduler`` the official grid of ``steps`` sigmas (see the module docstring).

    Each scheduler shifts the grid itself with its configured shift. UniPC and Euler take it
    through ``set_timesteps(sigmas=...)``. diffusers' ``DPMSolverMultistepScheduler.set_timesteps``
    has no ``sigmas`` argument, so it is set up for ``steps`` steps (fresh solver state) and then
    given the grid in the two fields its ``set_timesteps`` derives: ``sigmas`` (float32, final 0)
    and ``timesteps`` (``1000 * sigma`` truncated to int64) - the official scheduler's derivation.
    """
    solver = _solver_of(scheduler)
    grid = official_sigmas(solver, steps)
    if "sigmas" in inspect.signature(scheduler.set_timesteps).parameters:
        scheduler.set_timesteps(sigmas=grid, device=device)
        return
    scheduler.set_timesteps(steps, device=device)
    shifted = shift_sigma(grid, scheduler.config.flow_shift)  # float64
    sigmas = np.concatenate([shifted, [0.0]]).astype(np.float32)
    scheduler.sigmas = torch.from_numpy(sigmas)
    scheduler.timesteps = torch.from_numpy(shifted * NUM_TRAIN_TIMESTEPS).to(device=device, dtype=torch.int64)


def sample(
    denoise: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor],
    noise: torch.Tensor,
    *,
    steps: int = 20,
    shift: float = 5.0,
    solver: str = "unipc",
    guide_scale: float = 1.0,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Integrate from ``noise`` to a clean latent.

    ``denoise(latents, t [B], uncond) -> velocity`` runs the DiT on the conditional inputs
    (``uncond=False``) or on the unconditional ones (negative prompt, black face). The
    unconditional call is skipped entirely when ``guide_scale == 1``. ``progress(1)`` is called
    once per step.
    """
    if guide_scale < 1.0:
        raise ValueError(f"guide_scale={guide_scale} must be >= 1 (1 disables guidance).")
    scheduler = make_scheduler(solver, shift=shift)
    set_schedule(scheduler, steps, device=noise.device)
    latents = noise.float()
    for t in scheduler.timesteps:
        t_batch = t.expand(latents.shape[0]).to(latents.device)
        velocity = denoise(latents, t_batch, False).float()
        if guide_scale != 1.0:  # classifier-free guidance: uncond + s * (cond - uncond)
            uncond = denoise(latents, t_batch, True).float()
            velocity = uncond + guide_scale * (velocity - uncond)
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0].float()
        if progress is not None:
            progress(1)
    return latents
