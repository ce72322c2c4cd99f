"""Memory options for training the Wan-Animate DiT, applied from outside the model (docs/memory.md).

``apply_memory_options(dit, options, device=...)`` runs once the trainable set is fixed (LoRA
injected, ``requires_grad`` set, trainables in their master dtype) and before
``accelerate.prepare``, in an order that matters: fp8 frozen linears; LoRA in the compute dtype;
chunked motion encoder; block-swap wrappers *inside* the activation checkpoint; the checkpoint;
saved-tensor hooks *around* it; with block swap, the model placed on ``device`` except the swapped
weights and marked with a multi-device ``hf_device_map`` so ``accelerate.prepare`` leaves it there.

Everything is shape-only (no ``.item()``, no data-dependent branches; pinning only with CUDA), so
the memory planner can run it on fake tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from wan_animate.memory.block_swap import BlockSwap, swapped_indices
from wan_animate.memory.fp8 import FP8Linear, quantize_frozen_linears
from wan_animate.memory.lora_dtype import lora_in_compute_dtype
from wan_animate.memory.motion import chunk_motion_encoder
from wan_animate.memory.offload import CheckpointInputStore, wrap_checkpointed
from wan_animate.model import apply_activation_checkpointing, block_modules

BASE_DTYPES = ("bf16", "fp8")  # bf16: the frozen weights keep the dtype they were loaded in
CHECKPOINT_DTYPES = ("fp32", "bf16")
_STORE_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class MemoryOptions:
    """The memory options (train's ``model.*`` keys: ``train.config.ModelConfig`` extends this);
    validated here, once."""

    activation_checkpointing: bool = False  # per DiT block, applied from outside the model
    block_swap: int = 0  # frozen weights of the first N blocks in (pinned) host memory, prefetched a block ahead
    base_dtype: str = "bf16"  # bf16 | fp8 (frozen block linears as float8_e4m3fn + per-channel scales)
    checkpoint_offload: bool = False  # checkpointed block inputs to (pinned) host memory
    checkpoint_dtype: str = "fp32"  # fp32 | bf16: dtype the checkpointed fp32 block inputs are kept in
    motion_encoder_chunk: int = 0  # >0: motion encoder over N face frames at a time (checkpointed / no-grad)

    def __post_init__(self) -> None:
        if self.block_swap < 0 or self.motion_encoder_chunk < 0:
            raise ValueError(f"model.block_swap={self.block_swap} and model.motion_encoder_chunk="
                             f"{self.motion_encoder_chunk} must be >= 0 (0 disables them).")
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"model.base_dtype={self.base_dtype!r}; choose one of {BASE_DTYPES}.")
        if self.checkpoint_dtype not in CHECKPOINT_DTYPES:
            raise ValueError(f"model.checkpoint_dtype={self.checkpoint_dtype!r}; choose one of {CHECKPOINT_DTYPES}.")
        if (self.checkpoint_offload or self.checkpoint_dtype != "fp32") and not self.activation_checkpointing:
            raise ValueError(f"model.checkpoint_offload={self.checkpoint_offload} / model.checkpoint_dtype="
                             f"{self.checkpoint_dtype} act on the checkpointed block inputs; set "
                             "model.activation_checkpointing=true, or model.checkpoint_offload=false "
                             "model.checkpoint_dtype=fp32 without it.")


@dataclass
class MemoryState:
    """What ``apply_memory_options`` did; counters for tests and the memory planner."""

    fp8_layers: list[str] = field(default_factory=list)
    lora_layers: int = 0
    motion_encoder: str = "plain"
    block_swap: BlockSwap | None = None
    checkpoint_store: CheckpointInputStore | None = None

    @property
    def host_weight_bytes(self) -> int:
        """Bytes of frozen weights kept in (pinned) host memory by block swap."""
        return self.block_swap.host_bytes() if self.block_swap is not None else 0

    @property
    def host_activation_peak_bytes(self) -> int:
        """Peak bytes of checkpointed block inputs held on the host so far."""
        return self.checkpoint_store.peak_bytes if self.checkpoint_store is not None else 0

    def summary(self) -> dict[str, Any]:
        return {
            "fp8_layers": len(self.fp8_layers),
            "lora_layers_in_compute_dtype": self.lora_layers,
            "motion_encoder": self.motion_encoder,
            "swapped_blocks": len(self.block_swap.swapped) if self.block_swap is not None else 0,
            "host_weight_gib": self.host_weight_bytes / 2**30,
            "checkpoint_store": None if self.checkpoint_store is None else {
                "offload": self.checkpoint_store.offload, "dtype": str(self.checkpoint_store.store_dtype)},
        }


def place_except(model: nn.Module, device: torch.device, keep: BlockSwap) -> None:
    """Move every parameter and buffer to ``device`` except the swapped host weights."""
    swapped = {id(p) for slots in keep.slots.values() for _, _, p in slots}
    with torch.no_grad():
        for param in model.parameters():
            if id(param) not in swapped and param.device != device:
                param.data = param.data.to(device)
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.device != device:
                    module._buffers[name] = buf.to(device)
    # accelerate's prepare() leaves models with a multi-device map where they are.
    model.hf_device_map = {"": str(device), "blocks(swapped frozen weights)": "cpu"}


def apply_memory_options(dit: nn.Module, options: MemoryOptions, *, device: torch.device | str) -> MemoryState:
    """Apply ``options`` (validated by ``MemoryOptions``; single process with block swap: the caller's launch check)."""
    device = torch.device(device)
    state = MemoryState()
    if options.base_dtype == "fp8":
        state.fp8_layers = quantize_frozen_linears(dit)
        if not state.fp8_layers:
            raise ValueError("model.base_dtype=fp8 found no frozen linear layer in the DiT blocks (train.mode=full "
                             "trains them all); use train.mode=lora or adapters_only, or model.base_dtype=bf16.")
    state.lora_layers = lora_in_compute_dtype(dit)
    chunk = options.motion_encoder_chunk
    if chunk > 0:
        if not hasattr(dit, "motion_encoder"):
            raise ValueError(f"model.motion_encoder_chunk={chunk}: this model has no motion encoder (a "
                             f"{type(dit).__name__}); set model.motion_encoder_chunk=0.")
        state.motion_encoder = chunk_motion_encoder(dit.motion_encoder, chunk)
    blocks = list(dit.blocks)
    if options.block_swap > 0:
        state.block_swap = BlockSwap(blocks, swapped_indices(len(blocks), options.block_swap), device)
        state.block_swap.install()
    if options.activation_checkpointing:
        apply_activation_checkpointing(dit)
    if options.checkpoint_offload or options.checkpoint_dtype != "fp32":
        store_dtype = _STORE_DTYPES[options.checkpoint_dtype]
        state.checkpoint_store = CheckpointInputStore(device, options.checkpoint_offload, store_dtype)
        for module in block_modules(dit):
            wrap_checkpointed(module, state.checkpoint_store)
    if state.block_swap is not None:
        state.block_swap.offload()
        place_except(dit, device, state.block_swap)
    return state
