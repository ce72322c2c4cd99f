"""The Wan-Animate DiT (official parameter names) and what the trainer and the pipeline apply to it
from outside: precision, activation checkpointing, regional compilation.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from wan_animate.model.attention import set_attention_backend
from wan_animate.model.dit import WanAnimateDiT

# Top-level modules of the pose and face conditioning (everything else is the Wan I2V trunk).
ADAPTER_PREFIXES = ("pose_patch_embedding", "motion_encoder", "face_encoder", "face_adapter")

# ---- Precision

# Tensors the official model keeps (or computes) in fp32 whatever the weight dtype:
#   adaLN tables (blocks.N.modulation, head.modulation), the time path (time_embedding,
#   time_projection), the output head, every norm's affine weights (q/k RMSNorms, norm3,
#   img_emb LayerNorms, face-block q/k norms), the motion direction matrix (orthonormalised in
#   fp32) and the blur-kernel buffers. Together < 0.2% of the 14B parameters.
FP32_PATTERNS = (
    r"(^|\.)modulation$",
    r"^time_embedding\.",
    r"^time_projection\.",
    r"^head\.head\.",
    r"(^|\.)norm[^.]*\.(weight|bias)$",
    r"\.(q_norm|k_norm)\.weight$",
    r"^img_emb\.proj\.(0|4)\.",
    r"^motion_encoder\.dec\.direction\.weight$",
    r"\.kernel$",
)
_FP32_RE = re.compile("|".join(FP32_PATTERNS))


def is_fp32_by_design(name: str) -> bool:
    """True for state-dict names that ``set_precision`` keeps in float32."""
    return _FP32_RE.search(name) is not None


@torch.no_grad()
def set_precision(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast parameters and buffers to ``dtype`` except the fp32-by-design ones (``FP32_PATTERNS``).

    ``set_precision(model, torch.float32)`` gives the pure fp32 model; with bf16 the matmuls run in
    bf16 while modulation, norms, the residual stream and the head stay fp32. In place; returns model.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"set_precision needs a floating dtype, got {dtype}.")
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        target = torch.float32 if is_fp32_by_design(name) else dtype
        if tensor.is_floating_point() and tensor.dtype != target:
            tensor.data = tensor.data.to(target)
    return model


# ---- Activation checkpointing


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each DiT block and each face block during backward (non-reentrant checkpoint).

    Wraps the modules' ``forward`` from outside, so parameter names and the state dict are
    unchanged. Checkpointing only acts when gradients are enabled. Idempotent; returns model.
    """
    for module in block_modules(model):
        if getattr(module, "_activation_checkpointed", False):
            continue
        inner = module.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        module.forward = forward
        module._activation_checkpointed = True
    return model


# ---- Regional compilation


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The DiT blocks, then the face blocks (what the outside wrappers act on)."""
    modules = list(model.blocks)
    face_adapter = getattr(model, "face_adapter", None)
    if face_adapter is not None:
        modules += list(face_adapter.fuser_blocks)
    return modules


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """``torch.compile`` the own ``forward`` of every DiT block and face block (regional compilation).

    All blocks share one shape, so this compiles once and reuses the code (fast start-up, unlike
    compiling the whole model); the inductor fuses the fp32 norm/modulation/RoPE element-wise work
    and keeps fewer activations. Only the block's code is compiled: apply it BEFORE activation
    checkpointing and the memory options (block swap's stream/event copies, checkpoint offload's
    saved-tensor hooks), which then wrap the compiled forward and stay eager (traced, they would
    recompile every call or break ``fullgraph=True``). Names and the state dict are unchanged.
    Returns model.
    """
    for module in block_modules(model):
        wrappers = ("_activation_checkpointed", "_block_swap", "_checkpoint_store")
        wrapped = [a for a in wrappers if getattr(module, a, None)]
        if wrapped:
            raise RuntimeError(
                "compile_blocks must run before activation checkpointing and the memory options (found "
                f"{', '.join(wrapped)} on a block): they wrap the block's forward from outside and must stay "
                "out of the compiled region. Call compile_blocks first.")
        if getattr(module, "_compiled_forward", False):
            continue
        module.forward = torch.compile(module.forward, **compile_kwargs)
        module._compiled_forward = True
    return model
