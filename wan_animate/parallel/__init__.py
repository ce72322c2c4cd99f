"""Parallelism applied to the single-device model from outside (the model code stays plain).

- ``apply_sequence_parallel(dit, group)``: DeepSpeed-Ulysses sequence parallelism, one sample per
  group of ranks (``wan_animate.parallel.sequence``).
- ``sequence_parallel_mesh(size, device_type)``: the ("data", "sequence") DeviceMesh of all ranks.
- ``start_generation_group(size, device)``: join torchrun's processes for sequence-parallel generation.
"""

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
