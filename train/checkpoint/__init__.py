"""Checkpoints and the run folder: writing, verification, trainable-only state, exports, run lock and records."""
