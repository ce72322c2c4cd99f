"""Loading and saving Wan-Animate DiT checkpoints (official and diffusers layouts)."""

from __future__ import annotations

from wan_animate.keymap import (  # noqa: F401  (public re-exports)
    KeyMapError,
    blur_kernel_keys,
    diffusers_to_official,
    lia_blur_kernel,
    official_to_diffusers,
)
