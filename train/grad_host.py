"""Gradient accumulation with the running sum in host memory (``train.grad_accum_on_host=true``).

Plain accumulation keeps every trainable's fp32 gradient on the device through micro-batches 2..N
(4.6 GiB for ``animate14b_lora``'s 1.24 B trainables). Here, between micro-batches, each gradient
waits in an exact-size pinned host slot (fp32): micro-batch 1 copies it out and drops it, 2..N-1
add the slot and copy back, N adds the slot and keeps the sum in ``.grad``. The sums are the plain
path's in the same fp32 order, so updates are bit-identical (tests/test_memory_options.py); the
device peak is that of ``grad_accum=1``. One process only (DDP / DeepSpeed own the gradients).
"""

from __future__ import annotations

import itertools

import torch

from wan_animate.memory.pinned import PinnedBuffer, aligned


class HostGradAccumulation:
    def __init__(self, params: list[torch.nn.Parameter], device: torch.device):
        self.params = list(params)
        pin = torch.device(device).type == "cuda" and torch.cuda.is_available()
        offsets = [0, *itertools.accumulate(aligned(p.numel() * 4) for p in self.params)]  # [-1]: the total
        self.buffer = PinnedBuffer(offsets[-1], pin)  # one exact-size buffer, a slot per parameter
        self.host = {id(p): self.buffer.carve(o, p.shape, torch.float32) for p, o in zip(self.params, offsets)}
        self.nbytes = offsets[-1]
        self.index, self.count = 0, 1
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._hook)

    def micro_batch(self, index: int, count: int) -> None:
        """Call before the backward of micro-batch ``index`` (0-based) of ``count``."""
        self.index, self.count = index, count

    @torch.no_grad()
    def _hook(self, p: torch.nn.Parameter) -> None:
        if self.count == 1:
            return
        host = self.host[id(p)]
        grad = p.grad
        if self.index > 0:
            grad.add_(host.to(grad.device, non_blocking=True).view_as(grad))
        if self.index < self.count - 1:
            host.copy_(grad.detach().float().view_as(host), non_blocking=True)
            p.grad = None
