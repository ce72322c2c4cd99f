"""Live-tensor accounting for the memory planner: every storage counted once, by category.

``LiveBytes`` (a ``TorchDispatchMode``) registers the untyped storage of every aten op's output once,
with a weak reference that subtracts its bytes when it dies; fake tensors keep real ``nbytes``. A
storage gets its phase's category (``PHASE_CATEGORY``) unless reclassified (parameters, gradients,
inputs, encoder weights). Host storages are summed apart, pinned ones at what the allocator holds
(``pin_memory()`` rounded to a power of two); sharded categories count at ``scale[category]``.
"""

from __future__ import annotations

import weakref
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from wan_animate.memory.pinned import caching_host_bytes

# host categories that are ordinary (pageable) memory; every other host category is page-locked
PAGEABLE_HOST = ("frozen_encoders", "encoder_activations", "inputs")
PHASE_CATEGORY = {"setup": "activations", "encode": "encoder_activations", "forward": "activations",
                  "backward": "temporaries", "optimizer": "optimizer_states"}

_aten = torch.ops.aten
_prim_device = torch.ops.prim.device.default


@dataclass(slots=True)
class _Entry:
    nbytes: int
    category: str
    host: bool


class LiveBytes(TorchDispatchMode):
    """Running live bytes per category on the device (and on the pinned host), with the peak."""

    def __init__(self):
        super().__init__()
        self.scale: dict[str, float] = {}  # set by a parallel model (``train.plan.engines``)
        self.phase = "setup"
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: list = []
        self.device = defaultdict(float)
        self.host = defaultdict(float)
        self.extra: dict[str, float] = {}  # constant per-rank terms added by a parallel model
        self.peak = 0.0
        self.peak_by_category: dict[str, float] = {}
        self.peak_phase = "setup"
        self.peak_by_phase: dict[str, float] = defaultdict(float)
        self.host_peak = 0.0
        self.host_pinned_peak = 0.0
        self.host_peak_by_phase: dict[str, float] = defaultdict(float)
        self.new_on_host = False  # storages created from now on live on the host (host encoders)
        self.ops = 0
        # Between two observations the peaks can only rise where bytes were added (frees only lower
        # them), so an op that adds nothing in the phase already observed is not observed again.
        self._grown = True
        self._observed_phase: str | None = None

    # ------------------------------------------------------------------ bookkeeping
    def _add(self, e: _Entry, sign: int) -> None:
        (self.host if e.host else self.device)[e.category] += sign * e.nbytes * self.scale.get(e.category, 1.0)
        if sign > 0:
            self._grown = True

    def track(self, tensors: Iterable[Any], category: str | None = None, host: bool | None = None,
              held=None) -> None:
        """Register (or reclassify) the storages of ``tensors``; ``held(nbytes)`` is what the allocator
        holds for a new storage of ``nbytes`` (default: its size)."""
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            e = self._entries.get(st)
            if e is None:
                nbytes = st.nbytes() if held is None else held(st.nbytes())
                e = _Entry(nbytes, category or PHASE_CATEGORY[self.phase], self.new_on_host if host is None else host)
                self._entries[st] = e
                self._refs.append(weakref.ref(st, lambda _, e=e: self._add(e, -1)))  # freed: subtracted
                self._add(e, +1)
            elif (category and category != e.category) or (host is not None and host != e.host):
                self._add(e, -1)
                e.category = category or e.category
                e.host = e.host if host is None else host
                self._add(e, +1)
        self._observe()

    def _observe(self) -> None:
        """``_update_peak`` where it can change a peak: after bytes were added, or in a new phase."""
        if self._grown or self.phase != self._observed_phase:
            self._update_peak()

    def _update_peak(self) -> None:
        self._grown, self._observed_phase = False, self.phase
        total = sum(self.device.values()) + sum(self.extra.values())
        self.peak_by_phase[self.phase] = max(self.peak_by_phase[self.phase], total)
        if total > self.peak:
            self.peak = total
            # a computed term adds to the measured bytes of its category (never hides them); empty ones dropped
            self.peak_by_category = dict(Counter(self.device) + Counter(self.extra))
            self.peak_phase = self.phase
        host = sum(self.host.values())
        self.host_peak = max(self.host_peak, host)
        self.host_peak_by_phase[self.phase] = max(self.host_peak_by_phase[self.phase], host)
        self.host_pinned_peak = max(self.host_pinned_peak,
                                    sum(v for k, v in self.host.items() if k not in PAGEABLE_HOST))

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _prim_device:  # asked of every gradient by the autograd engine: served as the fake mode does
            self.ops += 1
            self._observe()
            t = args[0]
            if isinstance(t, FakeTensor) and not t.fake_mode.in_kernel_invocation:
                return t.fake_device
            return func(*args)
        kwargs = kwargs or {}
        if func is _aten._pin_memory.default:
            # Fake tensors cannot pin: a host copy stands in, marked pinned (host) here, counted at
            # what CUDA's caching host allocator holds for it.
            out = _aten.clone.default(args[0])
            source = self._entries.get(args[0].untyped_storage())
            category = source.category if source is not None else PHASE_CATEGORY[self.phase]
            self.track([out], category=category, host=True, held=caching_host_bytes)
            return out
        if kwargs.get("pin_memory") and func in (_aten.empty.memory_format, _aten.empty_strided.default):
            out = func(*args, **{**kwargs, "pin_memory": False})
            self.track([out], category=PHASE_CATEGORY[self.phase], host=True, held=caching_host_bytes)
            return out
        if func is _aten.is_pinned.default:
            entry = self._entries.get(args[0].untyped_storage())
            return bool(entry is not None and entry.host)
        out = func(*args, **kwargs)
        self.ops += 1
        if isinstance(out, torch.Tensor):
            self.track((out,))
        elif isinstance(out, (tuple, list)):
            flat, _ = tree_flatten(out)
            self.track(flat)
        else:  # a device, a size, a scalar (the autograd engine asks every gradient's device): no storage
            self._observe()
        return out
