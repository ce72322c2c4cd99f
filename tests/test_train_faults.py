"""Nothing lost, nothing silently wrong: resume with changed settings, damaged checkpoints and
pruning, a rerun that would mix two runs, metrics history under a kill, signals in the final
phase, untrustworthy shard metadata, a full disk. Training runs are in-process (``train.loop.run``)
on the quick-start model; docs/reliability.md maps each fault to its test (``F``)."""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
from pathlib import Path

import pytest
import torch

QUIET = ["train.progress=false", "train.validation=false", "train.export=false"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(fresh_accelerate_state):
    yield
    import wandb

    if wandb.run is not None:
        wandb.finish()


def in_process(out: Path, cache: Path, *overrides: str):
    from train.config import compose
    from train.loop import run

    return run(compose([f"train.output_dir={out}", f"train.cache_dir={cache}", *QUIET, *overrides]))


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- metrics history


def _metrics_file(path: Path, steps: int) -> bytes:
    lines = [json.dumps({"step": s, "time": 1.0, "loss/train": 0.5, "pad": "x" * 200}) + "\n" for s in range(1, steps + 1)]
    path.write_text("".join(lines))
    return path.read_bytes()


@pytest.mark.parametrize("limit", [0, 1, 4096, 60_000])
def test_metrics_history_survives_a_kill_during_the_resume_rewrite(tmp_path, monkeypatch, limit):
    """A resume drops the records after its checkpoint. A process stopped part-way through that
    rewrite (here: the kernel refuses writes past ``limit`` bytes, as a kill or a full disk would
    stop it) must leave the whole history, not a prefix. (Rewriting in place left 0 bytes of a
    67 MB file.)"""
    from train.metrics import MetricsLogger

    monkeypatch.setitem(sys.modules, "wandb", None)  # no wandb files under the limit
    path = tmp_path / "metrics.jsonl"
    before = _metrics_file(path, 400)  # ~90 kB
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        with pytest.raises(OSError):
            MetricsLogger(tmp_path, enabled=True, wandb_on=False, project="p", config={}, resume_step=300)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left
    # the same resume with room to write: steps after 300 dropped, the rest byte-identical
    MetricsLogger(tmp_path, enabled=True, wandb_on=False, project="p", config={}, resume_step=300)
    assert path.read_bytes() == b"".join(before.splitlines(keepends=True)[:300])


def test_torn_metrics_line_is_dropped_at_resume_and_ignored_when_read(tmp_path, monkeypatch):
    from train.metrics import MetricsLogger, read_metrics

    monkeypatch.setitem(sys.modules, "wandb", None)
    path = tmp_path / "metrics.jsonl"
    whole = _metrics_file(path, 5)
    with open(path, "ab") as f:
        f.write(b'{"step": 6, "loss/tr')  # killed mid-append
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    MetricsLogger(tmp_path, enabled=True, wandb_on=False, project="p", config={}, resume_step=10)
    assert path.read_bytes() == whole  # nothing after the torn line is glued to it
