"""The small stateful parts of a run, each with ``state_dict`` / ``load_state_dict``:

* ``TrainState``: optimizer-step counter and the non-finite (NaN/Inf) skip counters;
* ``EMA``: exponential moving average of the trainable weights, kept on their device in fp32 and
  updated with ``torch.optim.swa_utils``' foreach EMA update (no per-step host copies);
* ``rank_generator``: the per-rank noise generator (CPU, so CPU and GPU runs draw the same noise).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (applied or skipped)
    total_nonfinite: int = 0
    consecutive_nonfinite: int = 0

    def record_update(self, skipped: bool, max_consecutive: int) -> None:
        """Count one optimizer step; stop the run after ``max_consecutive`` skipped ones in a row."""
        self.step += 1
        if not skipped:
            self.consecutive_nonfinite = 0
            return
        self.total_nonfinite += 1
        self.consecutive_nonfinite += 1
        if self.consecutive_nonfinite >= max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite} optimizer steps in a row had a NaN/Inf loss or "
                f"gradient (step {self.step}); stopping. Lower optim.lr, keep optim.grad_clip > 0, check the "
                "data, or raise train.max_consecutive_nonfinite. The last complete checkpoint is untouched.")

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            setattr(self, f.name, int(state[f.name]))


class EMA:
    """``ema = decay * ema + (1 - decay) * param`` after every applied update, for the named
    trainable parameters; the averages live on the parameters' device in fp32."""

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], decay: float):
        self.decay = decay
        named = list(named_params)
        self.names: list[str] = [n for n, _ in named]
        self.params: list[torch.nn.Parameter] = [p for _, p in named]
        self.reset()  # the averages start at the current weights
        self._update = get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the averages at the current weights."""
        self.averages = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        # foreach lerp needs one dtype: bf16 weights (DeepSpeed) are read as fp32
        current = [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in self.params]
        self._update(self.averages, current, None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Name -> fp32 CPU tensor (what checkpoints and exports write)."""
        return {n: a.detach().cpu().contiguous() for n, a in zip(self.names, self.averages)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.names) - set(state))
        unexpected = sorted(set(state) - set(self.names))
        if missing or unexpected:
            raise RuntimeError(
                f"EMA state does not match the trainable set (missing {missing[:5]}, unexpected {unexpected[:5]}); "
                "resume with the same train.mode / lora settings as the checkpoint, or start a new train.output_dir.")
        for name, avg in zip(self.names, self.averages):
            avg.copy_(state[name].to(avg.device, torch.float32))


def rank_generator(seed: int, rank: int) -> torch.Generator:
    """Noise / timestep generator of one rank: different per rank, reproducible per run."""
    return torch.Generator().manual_seed(seed * 100003 + rank)
