"""The memory planner's model of one rank of a sequence-parallel group (``train.sequence_parallel=N``).

The planned step runs in one process, so the group's collectives are replaced by local tensors of
the sizes they produce on one rank: ceil(L / N) tokens per rank through the blocks, Ulysses q / k / v
as full-length [B, L, H/N, D], the motion encoder on ceil(F / N) frames gathered back, the head
output [B, L, C] gathered. It is installed with ``apply_sequence_parallel`` itself, so the seams are
the trained ones.
"""

from __future__ import annotations

import math

import torch

from train.config import Config, check_sequence_parallel
from wan_animate import parallel as sp
from wan_animate.model.attention import attention
from wan_animate.parallel import SequenceParallel


class PlannedShard(SequenceParallel):
    """Rank 0 of a group of ``size`` in one process: the same split / layout / face code as the
    trained plan; collectives replaced by same-size local tensors (differentiable, so backward's
    saved tensors and gradients are counted too)."""

    def __init__(self, size: int, num_heads: int):  # no process group, no DeepSpeed
        self.group, self.size, self.rank = None, size, 0
        self.num_heads = num_heads
        self.layout = None

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        layout = self._current(out.shape[1])
        return torch.cat([out] * self.size, dim=1)[:, : layout.total]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        layout = self._current(q.shape[1])
        heads = q.shape[2] // self.size

        def scatter_heads(t: torch.Tensor) -> torch.Tensor:  # [B, L/N, H, D] -> [B, L, H/N, D]
            return torch.cat([t[:, :, :heads]] * self.size, dim=1)

        q, k, v = scatter_heads(q), scatter_heads(k), scatter_heads(v)
        out = attention(q, k[:, : layout.total], v[:, : layout.total])  # [B, L_padded, H/N, D]
        return torch.cat([out[:, : layout.local]] * self.size, dim=2)  # back: [B, L/N, H, D]

    def encode_motion(self, encoder_forward, faces: torch.Tensor) -> torch.Tensor:
        n = faces.shape[0]
        per_rank = math.ceil(n / self.size)
        return torch.cat([encoder_forward(faces[:per_rank])] * self.size, dim=0)[:n]


def install_planned(dit: torch.nn.Module, cfg: Config, world: int) -> None:
    """Make ``dit`` run the planned rank's share of a sequence-parallel step (N > 1 only)."""
    n = cfg.train.sequence_parallel
    if n == 1:
        return
    # the trainer's rules for N, on the planned world size
    check_sequence_parallel(n, dit.config.num_heads, world, "the planned world size (train.plan_world_size)")
    if getattr(dit, "family", None) == "animate2":  # its own plan (train.plan.animate2)
        from train.plan.animate2 import install_planned_shard

        install_planned_shard(dit, n)
        return
    trained = sp.SequenceParallel
    sp.SequenceParallel = lambda group, num_heads: PlannedShard(n, num_heads)  # the same install, our plan
    try:
        sp.apply_sequence_parallel(dit, None)
    finally:
        sp.SequenceParallel = trained
