"""Commands that turn raw videos into Wan-Animate training shards, cached latents and inference
inputs (``prepare``, ``inspect``, ``cache_latents``, ``synthetic``, ``preprocess_driving``), with the
pose tools they use (``pose``). See docs/data.md."""
