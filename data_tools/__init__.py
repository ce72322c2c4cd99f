"""Raw videos -> validated Wan-Animate training shards, cached latents, a synthetic set.

Modules: ``pose`` (keypoint format, backends, renderer, face cropper), ``prepare``, ``inspect``,
``dataset`` (``decode_sample`` / ``decode_cached_sample``), ``cache_latents``, ``synthetic``,
``preprocess_driving``, ``retarget``, ``segment``, ``shards`` (schema v1 writer/reader),
``config`` (Hydra dataclasses). See docs/data.md.
"""
