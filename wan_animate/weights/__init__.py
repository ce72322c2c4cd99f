"""Weights I/O of the Wan-Animate DiT, one job per module.

* ``files``    -- reading safetensors headers/tensors (``safetensors.safe_open``), the one pickle
  loader ``load_torch_file`` (``torch.load(weights_only=True)`` only) and ``save_safetensors``
  (atomic, group-readable);
* ``keymap``   -- official <-> diffusers parameter names;
* ``source``   -- what a path holds: shards, index, config, layout, community prefixes;
* ``diagnose`` -- ``CheckpointError`` and the missing/unexpected/mismatched + likely-cause report;
* ``load``     -- ``load_dit`` (parameters on meta, filled shard by shard with ``assign=True``);
* ``save``     -- ``save_dit`` and the streaming ``convert_checkpoint``.

``wan_animate.checkpoint`` is the command line over these; ``from wan_animate import load_dit,
save_dit, CheckpointError`` the public names.
"""
