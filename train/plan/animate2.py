"""The memory planner's Animate-2 parts: the in-context attention's memory and one rank of a
sequence-parallel group, on fake tensors in one process.

* In-context attention. On a GPU the generation stream's attention is the compiled flex kernel
  (``wan_animate.animate2.attention``, backend ``auto``): it reads the keys / values of both streams
  concatenated, saves q, k, v, its output and the log-sum-exp for backward, and never builds a score
  matrix or a mask. On fake CPU tensors the ``dense`` kernel would count a [Lq, Lq + Ld] fp32 mask
  and the math kernel's scores (hundreds of GiB at 480p, memory a GPU run never uses), so the plan
  runs ``planned_incontext``: one unmasked SDPA over the same concatenated keys, which allocates and
  saves the same tensors as flex (its values differ: only sizes matter to the plan).
* Sequence parallelism (``train.sequence_parallel=N``): ``PlannedAnimate2Shard`` is rank 0 of a group
  of N with the collectives replaced by local tensors of the sizes they produce
  (``wan_animate.animate2.parallel``: each stream split after the embeddings, the all-to-alls around
  the attentions, the head's gather), installed with the trained ``apply_sequence_parallel``.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from wan_animate.animate2.parallel import Animate2SequenceParallel


def _planned_kernel(q, k, v, kd, vd, layout, log_scale):
    keys = torch.cat([k, kd], dim=1).transpose(1, 2)  # [B, H, Lq + Ld, D], as flex reads them
    values = torch.cat([v, vd], dim=1).transpose(1, 2)
    return F.scaled_dot_product_attention(q.transpose(1, 2), keys, values).transpose(1, 2)


@contextlib.contextmanager
def planned_incontext():
    """Within: every in-context attention allocates what the GPU's flex kernel does (see above)."""
    from wan_animate.animate2 import attention

    kernels, backend = dict(attention._KERNELS), attention.get_incontext_backend()
    attention._KERNELS["dense"] = _planned_kernel
    attention.set_incontext_backend("dense")
    try:
        yield
    finally:
        attention._KERNELS.clear()
        attention._KERNELS.update(kernels)
        attention.set_incontext_backend(backend)


class PlannedAnimate2Shard(Animate2SequenceParallel):
    """Rank 0 of a group of ``size``: the trained split / exchange code paths, collectives replaced by
    same-size local tensors (differentiable, so backward's saved tensors and gradients are counted)."""

    def __init__(self, size: int, num_heads: int):  # no process group
        self.group, self.size, self.rank = None, size, 0
        self.lengths = {}

    def gather(self, out: torch.Tensor, stream: str) -> torch.Tensor:
        return torch.cat([out] * self.size, dim=1)[:, : self.lengths[stream]]

    def to_heads(self, t: torch.Tensor, stream: str) -> torch.Tensor:  # [B, L/N, H, D] -> [B, L, H/N, D]
        heads = t.shape[2] // self.size
        return torch.cat([t[:, :, :heads]] * self.size, dim=1)[:, : self.lengths[stream]]

    def to_tokens(self, t: torch.Tensor, stream: str) -> torch.Tensor:  # [B, L, H/N, D] -> [B, L/N, H, D]
        local = math.ceil(t.shape[1] / self.size)
        return torch.cat([t[:, :local]] * self.size, dim=2)


def install_planned_shard(dit: torch.nn.Module, size: int) -> None:
    from wan_animate.animate2.parallel import apply_sequence_parallel

    apply_sequence_parallel(dit, None, plan=PlannedAnimate2Shard(size, dit.config.num_heads))
