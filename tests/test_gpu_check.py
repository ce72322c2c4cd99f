"""bench/gpu_check.sh in its CPU mode, as CI runs it: every check of the first-GPU list reports,
the ones a CPU can run PASS at their reduced size, the CUDA-only ones SKIP with a reason, and the
JSON summary holds the same. ~20 s of CPU time (longer on a busy 2-core machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What a one-GPU machine confirms first (bench/gpu_check.py, docs/gpu.md), in run order.
CHECKS = ["deps", "gpu_tests", "blocks_speed", "flash_attn", "memory_plain", "memory_options", "block_swap",
          "sequence_parallel", "zero2_lora", "zero3_lora"]
RUN_ON_CPU = {"deps", "blocks_speed", "block_swap", "sequence_parallel"}


def test_cpu_mode_reports_every_check_and_fails_none(tmp_path):
    out = tmp_path / "summary.json"
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    p = subprocess.run(["bash", "bench/gpu_check.sh", "--device", "cpu", "--json", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads(out.read_text())
    checks = {c["name"]: c for c in summary["checks"]}
    assert list(checks) == CHECKS
    assert summary["failed"] == [] and summary["device_type"] == "cpu"
    for name, c in checks.items():
        assert c["status"] == ("PASS" if name in RUN_ON_CPU else "SKIP"), c
        assert c["status"] == "PASS" or c["reason"], c  # a skip says why
        assert f"{c['status']} {name} " in p.stdout  # one printed line per check
    # the planner ran on the reduced blocks even though nothing could measure it
    assert checks["memory_plain"]["data"]["planned_device_gib"] > 0
    assert checks["memory_options"]["data"]["options"].startswith("LoRA bf16 + fp8")
    assert checks["sequence_parallel"]["data"]["backend"] == "gloo"
    assert checks["block_swap"]["data"]["misses"] == 0


def test_a_failing_check_fails_the_run(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    from bench import gpu_check

    monkeypatch.setattr(gpu_check, "NEEDED", ["json", "no_such_module_for_the_check"])
    out = tmp_path / "summary.json"
    assert gpu_check.main(["--device", "cpu", "--only", "deps", "--json", str(out)]) == 1
    summary = json.loads(out.read_text())
    assert summary["failed"] == ["deps"] and "no_such_module_for_the_check" in summary["checks"][0]["reason"]


def test_registered_host_bytes_counts_what_the_memory_options_page_lock(monkeypatch):
    """The pinned measurement sees cudaHostRegister (wan_animate.memory.pinned), faked here on the CPU."""
    import gc
    from types import SimpleNamespace

    import torch

    sys.path.insert(0, str(ROOT))
    from bench.gpu_check import RegisteredHostBytes
    from wan_animate.memory.pinned import PinnedBuffer

    calls = []
    fake = SimpleNamespace(cudaHostRegister=lambda ptr, n, flags: calls.append(("register", n)) or 0,
                           cudaHostUnregister=lambda ptr: calls.append(("unregister", ptr)) or 0)
    original = fake.cudaHostRegister
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    with RegisteredHostBytes() as registered:
        a, b = PinnedBuffer(3000, pin=True), PinnedBuffer(5000, pin=True)
        assert registered.current == registered.peak == 8000
        del a
        gc.collect()
        assert registered.current == 5000 and registered.peak == 8000
        PinnedBuffer(100, pin=False)  # plain host memory: not counted
        assert registered.current == 5000
    assert fake.cudaHostRegister is original  # unwrapped on exit
    assert [c[0] for c in calls] == ["register", "register", "unregister"]
    del b
