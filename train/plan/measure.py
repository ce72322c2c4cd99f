"""Independent check of the memory planner: the same step on real CPU tensors, measured by the kernel.

    MALLOC_MMAP_THRESHOLD_=65536 python -m train.plan.measure [hydra overrides]

prints ``{"peak_rss_delta_gib": ..., "seconds": ...}``: the process's peak resident set (``VmHWM``,
reset through ``/proc/self/clear_refs``) over the planner's step on initialised weights, without
encoders (``data.source=cached`` configs). The mmap threshold makes glibc return freed blocks at
once, as a GPU allocator's "allocated" count would.
"""

from __future__ import annotations

import gc
import json
import sys
import time


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_real_step(overrides: list[str]) -> dict[str, float]:
    import torch

    from train.config import compose
    from train.plan.planner import NullTracker, _build, _step, model_folder, planned_shape
    from wan_animate.family import get_family

    cfg = compose(overrides)
    if cfg.data.source != "cached":
        raise ValueError("measure_real_step runs without encoders; use data.source=cached.")
    mcfg, _ = get_family(cfg.model.family).config(preset=cfg.model.preset, folder=model_folder(cfg))
    t0 = time.time()
    # A first, unmeasured run faults in the kernels' code pages and the allocator's arenas, which a
    # GPU run would not count either; the second run on a fresh model is measured.
    for measured in (False, True):
        with torch.device("meta"):
            dit = get_family(cfg.model.family).build(mcfg)
        gc.collect()
        if measured:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak resident set to the current one
            base = _status_kib("VmRSS")
        built = _build(cfg, mcfg, NullTracker(), use_ds=False, meta=(dit, ({}, {})), init=True)
        del dit
        _step(cfg, built, mcfg, planned_shape(cfg), NullTracker())
        del built
    peak = _status_kib("VmHWM")
    return {"peak_rss_delta_gib": (peak - base) / 2**20, "base_rss_gib": base / 2**20,
            "seconds": round(time.time() - t0, 1)}


if __name__ == "__main__":
    print(json.dumps(measure_real_step(sys.argv[1:])), flush=True)
