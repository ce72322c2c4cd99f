"""Where and in which dtype checkpointed blocks keep their inputs.

With non-reentrant activation checkpointing a block keeps only its inputs for backward, saved
*before* the checkpoint installs its own hooks, so ``saved_tensors_hooks`` around the checkpointed
call see exactly them. ``CheckpointInputStore`` packs the one that matters, the block's hidden state
(the fp32 residual stream ``[B, L, dim]``, 0.65 GiB per block at 480x832x77; matched by shape):

* ``offload=True``: copied to exact-size page-locked host buffers (``pinned.PinnedPool``, reused by
  every step) on a side stream, brought back for the recomputation, the next-older input
  prefetched while a block recomputes. ``torch.autograd.graph.save_on_cpu`` copies *every* saved
  tensor (also the per-call RoPE/text tensors, for each block) and blocks the host on the copy.
* ``store_dtype=torch.bfloat16``: fp32 inputs kept rounded to bf16; the recomputation starts from
  the rounded input (a small gradient difference, measured in docs/memory.md).

Shape-only decisions, so it also runs on fake tensors; ``live_bytes`` / ``peak_bytes`` count host bytes.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from wan_animate.memory.pinned import PinnedPool


class _Packed:
    __slots__ = ("device", "dtype", "stored", "event", "prefetched", "__weakref__")  # stored: a pool buffer's view

    def __init__(self, device, dtype, stored, event):
        self.device, self.dtype, self.stored, self.event = device, dtype, stored, event
        self.prefetched = None  # (device tensor, event) once prefetched


class CheckpointInputStore:
    def __init__(self, device: torch.device | str, offload: bool, store_dtype: torch.dtype | None):
        self.device = torch.device(device)
        self.offload = offload
        self.store_dtype = store_dtype
        cuda = self.device.type == "cuda"
        self.pin = cuda and torch.cuda.is_available()
        self.stream = torch.cuda.Stream(self.device) if cuda and offload else None
        self.pool = PinnedPool(self.pin)
        self._order: list[weakref.ref] = []
        self.live_bytes = 0
        self.peak_bytes = 0
        self.packed = 0  # tensors stored by this store (for tests)

    # ---- hooks
    def hooks(self, shapes: set[torch.Size]) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(lambda t: self.pack(t, shapes), self.unpack)

    def pack(self, t: torch.Tensor, shapes: set[torch.Size]):
        if not t.is_floating_point() or t.shape not in shapes:
            return t
        dtype = self.store_dtype if self.store_dtype is not None and t.dtype == torch.float32 else t.dtype
        if not self.offload and dtype == t.dtype:
            return t
        self.packed += 1
        with torch.no_grad():
            if not self.offload:
                return _Packed(t.device, t.dtype, t.to(dtype), None)
            buffer = self.pool.take(t.numel() * dtype.itemsize)
            host = buffer.carve(0, t.shape, dtype)
            event = None
            if self.stream is not None:
                self.stream.wait_stream(torch.cuda.current_stream(t.device))
                with torch.cuda.stream(self.stream):
                    host.copy_(t, non_blocking=True)
                    event = self.stream.record_event()
                t.record_stream(self.stream)  # t's memory is not reused before the copy is done
            else:
                host.copy_(t)
        nbytes = host.numel() * host.element_size()
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        packed = _Packed(t.device, t.dtype, host, event)
        self._order = [r for r in self._order if r() is not None]
        self._order.append(weakref.ref(packed))
        weakref.finalize(packed, self._release, nbytes, buffer)
        return packed

    def _release(self, nbytes: int, buffer) -> None:
        # Reuse is ordered: the next copy into ``buffer`` runs on the side stream after the compute
        # stream, which waited for the last copy out of it.
        self.live_bytes -= nbytes
        self.pool.give_back(buffer)

    @property
    def held_bytes(self) -> int:
        """Host bytes the store keeps (its pool's buffers, in use or idle)."""
        return self.pool.held_bytes

    def _to_device(self, packed: _Packed):
        """Start the host-to-device copy (side stream on CUDA); returns (tensor, event)."""
        if self.stream is None:
            return packed.stored.to(packed.device), None
        if packed.event is not None:
            self.stream.wait_event(packed.event)
        with torch.cuda.stream(self.stream):
            dev = packed.stored.to(packed.device, non_blocking=True)
            event = self.stream.record_event()
        return dev, event

    def unpack(self, packed):
        if not isinstance(packed, _Packed):
            return packed
        if not self.offload:
            return packed.stored.to(packed.dtype)
        dev, event = packed.prefetched or self._to_device(packed)
        packed.prefetched = None
        if event is not None:
            current = torch.cuda.current_stream(packed.device)
            current.wait_event(event)
            dev.record_stream(current)
        self._prefetch_before(packed)
        return dev.to(packed.dtype)

    def _prefetch_before(self, packed: _Packed) -> None:
        """Backward recomputes blocks in reverse: bring the previously packed input over now."""
        alive = [p for p in (r() for r in self._order) if p is not None]
        if packed not in alive:
            return
        i = alive.index(packed)
        if i > 0 and alive[i - 1].prefetched is None and self.stream is not None:
            alive[i - 1].prefetched = self._to_device(alive[i - 1])


def wrap_checkpointed(module: nn.Module, store: CheckpointInputStore) -> None:
    """Route the saved inputs of ``module`` (an already checkpointed block) through ``store``.

    The hidden state is the first positional argument; saved tensors of its shape are packed. A
    block that carries several token streams names their positions in ``hidden_state_args``
    (Animate-2's joint block: the generation and the driving stream, ``(0, 1)``).
    """
    if getattr(module, "_checkpoint_store", None) is not None:
        return
    if not getattr(module, "_activation_checkpointed", False):
        raise RuntimeError("checkpoint_offload / checkpoint_dtype need activation checkpointing of the blocks "
                           "(model.activation_checkpointing=true).")
    inner = module.forward
    positions = getattr(module, "hidden_state_args", (0,))

    def forward(x, *args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(x, *args, **kwargs)
        shapes = {(x, *args)[i].shape for i in positions}
        with store.hooks(shapes):
            return inner(x, *args, **kwargs)

    module.forward = forward
    module._checkpoint_store = store
