"""Wan-Animate: model, checkpoints, frozen encoders and the one shared inference path.

Public names are imported lazily so ``import wan_animate`` stays cheap (no diffusers/transformers
import until a pipeline or checkpoint function is used).
"""

from __future__ import annotations

import importlib
from typing import Any

from wan_animate.config import WanAnimateConfig

_LAZY = {
    "WanAnimateDiT": "wan_animate.model",
    "load_dit": "wan_animate.weights.load",
    "save_dit": "wan_animate.weights.save",
    "CheckpointError": "wan_animate.weights.diagnose",
    "AnimatePipeline": "wan_animate.pipeline",
    "make_tiny_model_folder": "wan_animate.testing",
}

__all__ = ["WanAnimateConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'wan_animate' has no attribute {name!r}")
