"""Wan-Animate-2: the second model family (raw driving video attended in context).

* ``config``    -- ``Animate2Config`` (presets ``14b``, ``tiny``), official / diffusers config.json;
* ``attention`` -- the in-context attention of the generation stream (dense / split / flex kernels);
* ``model``     -- ``Animate2DiT``: ``extract`` (driving K/V cache), ``generate`` (a denoising step),
  ``forward`` (both streams per block, for training);
* ``keymap``    -- official <-> diffusers names, family detection from names;
* ``weights``   -- load / save / convert the official single file and the diffusers folder;
* ``pipeline``  -- ``Animate2Pipeline``: segments, the extract pass once per segment, CFG with the
  block skip, distilled sampling.
"""

from wan_animate.animate2.config import PRESETS, REFERENCE_PROMPT, Animate2Config
from wan_animate.animate2.model import Animate2DiT, KVCache, driving_condition

__all__ = ["Animate2Config", "Animate2DiT", "KVCache", "PRESETS", "REFERENCE_PROMPT", "driving_condition"]
