"""Parallelism applied to the single-device model from outside (the model code stays plain)."""

from wan_animate.parallel.sequence import (
    SequenceParallel,
    TokenLayout,
    apply_sequence_parallel,
    check_same_sample,
    check_sequence_parallel_size,
    sequence_parallel_mesh,
    start_generation_group,
)

__all__ = [
    "SequenceParallel",
    "TokenLayout",
    "apply_sequence_parallel",
    "check_same_sample",
    "check_sequence_parallel_size",
    "sequence_parallel_mesh",
    "start_generation_group",
]
