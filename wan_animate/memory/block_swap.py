"""Block swap: the frozen weights of some DiT blocks live in (pinned) host memory and are copied to
the device one block ahead of use, in forward and in the backward recomputation.

Each frozen parameter of a swapped block keeps its ``nn.Parameter`` (``state_dict`` and optimizers
see the usual model), its data in ONE exact-size page-locked buffer per block
(``pinned.PinnedBuffer``). Every block's ``forward`` is wrapped *inside* activation checkpointing,
so the recomputation runs the wrapper too: a swapped block's call puts device copies of its frozen
weights into the modules' ``_parameters`` for the call and restores the host ones afterwards;
autograd keeps the copies only as long as the graph needs them. Copies run on a side CUDA stream
ordered by events, prefetching the next block in the current direction (a repeated index flips it:
the turn from the last forward block to its recompute); a wrong guess costs a synchronous copy
(``misses``), never a wrong result. Trainable parameters are never swapped. On CPU the same code
runs with plain tensors and synchronous copies.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from wan_animate.memory.pinned import PinnedBuffer, pin_together


def frozen_slots(block: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(module, attribute name, parameter) of every frozen parameter of ``block``."""
    return [(module, name, param) for module in block.modules() for name, param in module._parameters.items()
            if param is not None and not param.requires_grad]


class BlockSwap:
    """Swaps the frozen weights of ``blocks[i]`` for ``i in swapped`` between host and ``device``."""

    def __init__(self, blocks: Sequence[nn.Module], swapped: Sequence[int], device: torch.device | str):
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self.swapped = sorted(set(int(i) for i in swapped))  # from swapped_indices: in range
        self.pin = self.device.type == "cuda" and torch.cuda.is_available()
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.slots = {i: frozen_slots(self.blocks[i]) for i in self.swapped}
        self.buffers: dict[int, PinnedBuffer] = {}  # block index -> its host buffer (after offload)
        self._ready: dict[int, tuple[list[torch.Tensor], object]] = {}
        self._prev: int | None = None
        self._direction = 1
        self.copies = 0  # host -> device block copies issued
        self.misses = 0  # calls whose block had not been prefetched (synchronous copy)

    # ---- setup
    def offload(self) -> int:
        """Move the swapped frozen weights to the host: one exact-size buffer per block, page-locked
        with CUDA. Block by block, so the previous copy of a block is freed before the next one is
        made. Returns the bytes held."""
        with torch.no_grad():
            for index, slots in self.slots.items():
                if index in self.buffers:
                    continue
                buf, copies = pin_together([param.data for _, _, param in slots], self.pin)
                for (_, _, param), host in zip(slots, copies):
                    param.data = host
                self.buffers[index] = buf
        return self.host_bytes()

    def host_bytes(self) -> int:
        """Host bytes of the swapped weights as held (their buffers, alignment included)."""
        if self.buffers:
            return sum(b.nbytes for b in self.buffers.values())
        return sum(p.numel() * p.element_size() for slots in self.slots.values() for _, _, p in slots)

    def install(self) -> None:
        """Wrap every block's ``forward`` (all blocks, so a resident block prefetches a swapped one)."""
        for index, block in enumerate(self.blocks):
            if getattr(block, "_activation_checkpointed", False):
                raise RuntimeError(
                    "block swap must be applied before activation checkpointing (the recomputation in "
                    "backward has to fetch the weights again); call wan_animate.memory.apply_memory_options "
                    "before wan_animate.model.apply_activation_checkpointing."
                )
            if getattr(block, "_block_swap", None) is not None:
                continue
            inner = block.forward

            def forward(*args, _inner=inner, _index=index, **kwargs):
                return self.run(_index, _inner, *args, **kwargs)

            block.forward = forward
            block._block_swap = self

    # ---- copies
    def _copy(self, index: int) -> list[torch.Tensor]:
        self.copies += 1
        return [param.data.to(self.device, non_blocking=self.stream is not None, copy=True)
                for _, _, param in self.slots[index]]

    def _prefetch(self, index: int) -> None:
        if index in self._ready:
            self._ready = {index: self._ready[index]}
            return
        self._ready = {}  # a stale guess is dropped: at most one block waits on the device
        if self.stream is None:
            self._ready[index] = (self._copy(index), None)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            tensors = self._copy(index)
            event = self.stream.record_event()
        self._ready[index] = (tensors, event)

    def _take(self, index: int) -> list[torch.Tensor]:
        entry = self._ready.pop(index, None)
        if entry is None:
            self.misses += 1
            return self._copy(index)
        tensors, event = entry
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in tensors:  # allocated on the side stream, used on the compute stream
                t.record_stream(current)
        return tensors

    def _next_index(self, index: int) -> int:
        """Predict the next block call: same direction, or a turn-around at the ends."""
        if self._prev is not None:  # the sign of the last step; a repeated index turns around
            self._direction = (index > self._prev) - (index < self._prev) or -self._direction
        self._prev = index
        nxt = index + self._direction
        return nxt if 0 <= nxt < len(self.blocks) else index

    # ---- call
    def run(self, index: int, inner, *args, **kwargs):
        if torch.is_grad_enabled() and not getattr(self.blocks[index], "_activation_checkpointed", False):
            # autograd would keep every block's device copy of its weights for backward: the
            # whole trunk on the device again, plus the copies. Only no-grad runs may skip it.
            raise RuntimeError(
                "block swap under autograd needs activation checkpointing of the blocks (without it "
                "backward keeps every swapped block's weights on the device and nothing is saved); set "
                "model.activation_checkpointing=true, or run without gradients.")
        nxt = self._next_index(index)
        tensors = self._take(index) if index in self.slots else None
        if nxt == index and tensors is not None:
            self._ready = {index: (tensors, None)}  # turn-around: this block runs again next
        elif nxt in self.slots:
            self._prefetch(nxt)  # overlaps with this block's compute on a GPU
        if tensors is None:
            return inner(*args, **kwargs)
        with self._substituted(index, tensors):
            return inner(*args, **kwargs)

    @contextlib.contextmanager
    def _substituted(self, index: int, tensors: list[torch.Tensor]) -> Iterator[None]:
        slots = self.slots[index]
        for (module, name, _), tensor in zip(slots, tensors):
            module._parameters[name] = tensor  # the device copy, only for this call
        try:
            yield
        finally:
            for module, name, param in slots:
                module._parameters[name] = param


def swapped_indices(num_blocks: int, count: int) -> list[int]:
    """The blocks to swap: the first ``count`` ones (forward starts and backward ends with them)."""
    if count < 0 or count > num_blocks:
        raise ValueError(f"model.block_swap={count} must be in 0..{num_blocks} (the DiT has {num_blocks} blocks).")
    return list(range(count))
