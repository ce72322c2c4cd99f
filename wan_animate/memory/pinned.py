"""Page-locked host buffers of exact size, for block swap's weights and offloaded checkpoint inputs.

CUDA's caching host allocator (``tensor.pin_memory()``) rounds every request up to a power of two
and keeps freed blocks: a 71 MB weight holds 128 MiB, a 335 MB bf16 checkpointed input 512 MiB
(``caching_host_bytes``). These buffers are ordinary host memory of the exact size, page-locked
with ``cudaHostRegister`` (as ``torch.distributed.checkpoint`` stages its host copies). Without
CUDA (CPU runs, the planner's fake tensors) they are plain host memory.
"""

from __future__ import annotations

import math
import weakref
from itertools import accumulate
from typing import Sequence

import torch

ALIGN = 256  # bytes: every carved tensor starts on this boundary (vectorised copies, any dtype)


def caching_host_bytes(nbytes: int) -> int:
    """Bytes CUDA's caching host allocator holds for a request of ``nbytes`` (torch's default
    ``pinned_max_round_threshold``: every size is rounded up to the next power of two)."""
    return 0 if nbytes <= 0 else 1 << (int(nbytes) - 1).bit_length()


def aligned(nbytes: int) -> int:
    return -(-int(nbytes) // ALIGN) * ALIGN


def _unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


class PinnedBuffer:
    """``nbytes`` of host memory, page-locked with ``cudaHostRegister`` when ``pin``."""

    def __init__(self, nbytes: int, pin: bool):
        self.nbytes = int(nbytes)
        self.data = torch.empty(self.nbytes, dtype=torch.uint8, device="cpu")
        self.pinned = False
        if pin and self.nbytes:
            ptr = self.data.data_ptr()
            err = int(torch.cuda.cudart().cudaHostRegister(ptr, self.nbytes, 0))
            if err != 0:
                raise RuntimeError(f"cudaHostRegister of {self.nbytes / 2**20:.0f} MiB of host memory failed "
                                   f"(cudaError {err}): the host lacks page-lockable memory; lower model.block_swap "
                                   "or turn model.checkpoint_offload off.")
            self.pinned = True
            done = weakref.finalize(self, _unregister, ptr)
            done.atexit = False  # at exit the process's memory goes back anyway

    def carve(self, offset: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``shape``/``dtype`` over this buffer's bytes from ``offset`` (ALIGN-aligned)."""
        nbytes = math.prod(int(s) for s in shape) * dtype.itemsize
        if offset % ALIGN or offset + nbytes > self.nbytes:
            raise ValueError(f"carve at {offset} of {nbytes} bytes does not fit a {self.nbytes}-byte buffer.")
        return self.data[offset: offset + nbytes].view(dtype).view(tuple(shape))


def pin_together(tensors: Sequence[torch.Tensor], pin: bool) -> tuple[PinnedBuffer, list[torch.Tensor]]:
    """Copies of ``tensors`` in ONE exact-size host buffer (each ALIGN-aligned); returns the buffer
    and the copies (views of it), in order."""
    sizes = [aligned(t.numel() * t.element_size()) for t in tensors]
    buf = PinnedBuffer(sum(sizes), pin)
    with torch.no_grad():  # offset of each copy: the sizes before it
        copies = [buf.carve(off, t.shape, t.dtype).copy_(t.detach())
                  for t, off in zip(tensors, accumulate(sizes, initial=0))]
    return buf, copies


class PinnedPool:
    """Exact-size host buffers handed out by ``take`` (the smallest idle one that fits, else a new
    one, the too-small idle ones released first) and returned by ``give_back`` for reuse: the pool
    holds at most (inputs alive at once) x (largest input). ``held_bytes``: idle + handed out."""

    def __init__(self, pin: bool):
        self.pin = pin
        self._idle: list[PinnedBuffer] = []
        self.held_bytes = 0
        self.allocations = 0

    def take(self, nbytes: int) -> PinnedBuffer:
        fits = [b for b in self._idle if b.nbytes >= nbytes]
        if fits:
            best = min(fits, key=lambda b: b.nbytes)
            self._idle.remove(best)
            return best
        self.held_bytes -= sum(small.nbytes for small in self._idle)
        self._idle.clear()
        self.allocations += 1
        self.held_bytes += nbytes
        return PinnedBuffer(nbytes, self.pin)

    def give_back(self, buf: PinnedBuffer) -> None:
        self._idle.append(buf)
