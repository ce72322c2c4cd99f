"""Sequence-parallel training (``train.sequence_parallel=N``, DeepSpeed-Ulysses over the video tokens).

Consecutive ranks form P/N groups of N that train ONE sample together, so the data stream, the
noise generator and the per-sample seeds are keyed by the *data-parallel* rank (``mesh["data"]``).
The loss needs no change: every rank computes it from the gathered head output and the usual
gradient averaging over P ranks is the mean over the P/N samples (``wan_animate.parallel``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from train.config import Config, ConfigError, check_sequence_parallel
from wan_animate.parallel import check_same_sample, sequence_parallel_mesh

STATE_KEY = "sequence_parallel"  # in trainer_state.json (the "train" part of Trainer.state_dict)


@dataclass
class SequenceLayout:
    size: int  # N: ranks per group (1: plain data parallelism)
    data_rank: int  # which sample stream this rank reads (same for the whole group)
    data_world: int  # number of groups = distinct samples per micro-batch step
    group: Any = None  # this rank's torch.distributed group (None when size == 1)
    checked: bool = False  # the first batch was checked to be the same on every rank of the group

    @property
    def enabled(self) -> bool:
        return self.size > 1


def sequence_layout(cfg: Config, acc) -> SequenceLayout:
    """The layout of this run; builds the ("data", "sequence") mesh when N > 1. Collective."""
    n = cfg.train.sequence_parallel
    if n == 1:
        return SequenceLayout(1, acc.process_index, acc.num_processes)
    check_sequence_parallel(n, world=acc.num_processes)  # the heads: once the model is loaded (apply_to_dit)
    mesh = sequence_parallel_mesh(n, acc.device.type)
    return SequenceLayout(n, mesh["data"].get_local_rank(), mesh["data"].size(), mesh["sequence"].get_group())


def apply_to_dit(layout: SequenceLayout, dit: torch.nn.Module, family) -> None:
    """Install Ulysses on the raw DiT (before ``accelerate.prepare`` / DeepSpeed wrap it): the
    model family's plan (``ModelFamily.apply_sequence_parallel``)."""
    if not layout.enabled:
        return
    check_sequence_parallel(layout.size, dit.config.num_heads)
    family.apply_sequence_parallel(dit, layout.group)


def check_first_batch(layout: SequenceLayout, batch: dict[str, Any], generator: torch.Generator) -> None:
    """Once per run: every rank of a group holds the same DiT inputs and the same noise / timestep
    generator state (so it will draw the same noise). Raises naming the input that differs."""
    if not layout.enabled or layout.checked:
        return
    inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    inputs["noise_generator_state"] = generator.get_state()
    check_same_sample(inputs, layout.group)
    layout.checked = True


def record(layout: SequenceLayout) -> dict[str, int]:
    """What a checkpoint records about the layout (merged into its ``trainer_state.json``)."""
    return {STATE_KEY: layout.size}


def check_resume(layout: SequenceLayout, saved_train_state: dict[str, Any], where: str = "the checkpoint") -> None:
    """Refuse a resume with another N: the per-rank data positions and noise generators are those of
    the saved layout (checkpoints without the record were written with N = 1)."""
    saved = int(saved_train_state.get(STATE_KEY, 1))
    if saved != layout.size:
        raise ConfigError(
            f"{where} was written with train.sequence_parallel={saved}, this run has train.sequence_parallel="
            f"{layout.size}: each rank's data position and noise stream belong to the saved grouping, so exact "
            f"resume needs the same value. Rerun with train.sequence_parallel={saved}, or start a new "
            "train.output_dir (or set train.resume=false) to train with the new value.")
