"""Weights I/O of the Wan-Animate DiT, one job per module: ``files`` (safetensors, tensor-only
pickles), ``keymap`` (official <-> diffusers names), ``source`` (what a path holds), ``diagnose``
(``CheckpointError``), ``load`` (``load_dit``), ``save`` (``save_dit``, ``convert_checkpoint``).
``wan_animate.checkpoint`` is the command line over these.
"""
