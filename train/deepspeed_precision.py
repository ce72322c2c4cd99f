"""Keep the fp32-by-design tensors of the DiT in fp32 under DeepSpeed bf16.

A bf16 DeepSpeed engine casts every parameter to bf16 when built (``keep_in_fp32_modules`` keeps
buffers only). ``Fp32ByDesign`` saves the fp32 tensors (``wan_animate.model.FP32_PATTERNS``:
modulation, time path, head, norms; < 0.2% of 14B) before ``accelerate.prepare`` and restores them
after: frozen ones become fp32 parameters again (ZeRO-0/1/2), trained ones get the original values
in their fp32 master copy (every stage). Under ZeRO-3 frozen ones stay bf16 (DeepSpeed gathers in
one dtype); the trainer says so.
"""

from __future__ import annotations

import torch

from wan_animate.model import is_fp32_by_design


class Fp32ByDesign:
    def __init__(self, dit: torch.nn.Module):
        self.saved = {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in dit.named_parameters()
                      if is_fp32_by_design(n) and p.is_floating_point()}

    @torch.no_grad()
    def restore(self, module: torch.nn.Module, stage: int) -> dict[str, int]:
        """After the engine is built: returns counts ``{"frozen_fp32", "master_fp32", "frozen_bf16"}``."""
        from deepspeed.utils import safe_set_full_fp32_param

        counts = {"frozen_fp32": 0, "master_fp32": 0, "frozen_bf16": 0}
        for name, p in module.named_parameters():
            value = self.saved.get(name)
            if value is None:
                continue
            if p.requires_grad:
                if hasattr(p, "ds_id"):
                    _set_zero3_master(p, value)
                else:
                    safe_set_full_fp32_param(p, value.to(p.device))
                counts["master_fp32"] += 1
            elif stage < 3:
                p.data = value.to(p.device)
                counts["frozen_fp32"] += 1
            else:
                counts["frozen_bf16"] += 1
        return counts


def _set_zero3_master(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """This rank's slice of ``value`` into the fp32 master partition of a ZeRO-3 parameter.

    ZeRO-3 pads a parameter to ceil(numel / world) elements per rank; DeepSpeed's own setter
    (``set_full_hp_param``) narrows the unpadded value at rank x partition and fails on the ranks
    past its end whenever the size does not divide the world size (the 5120-wide modulation
    tables on 3, 6 or 7 ranks). The padding elements keep their value."""
    opt = param._z3_optimizer
    partition, group = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False)
    start = partition.numel() * opt._get_param_partition_rank(param)
    mine = value.flatten()[start: start + partition.numel()]
    partition.data[: mine.numel()].copy_(mine.to(partition.device))
    if opt._swappable_optimizer_subgroup(group):
        opt._optimizer_states_and_gradient_swap_out(group)
