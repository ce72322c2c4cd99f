"""Never lose work: exact resume after SIGKILL, half-written checkpoints ignored, SIGTERM saves and
exits, NaN losses skipped and counted, keep-last-k pruning. The SIGKILL test launches real
processes (killing one is the point); the others run ``train.loop.run`` in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import quick_start_cache
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
N = 3
COMMON = [
    "train.progress=false", "train.validation=false", "train.export=false", "train.grad_accum=2",
    f"train.checkpoint_every={N}", "train.keep_last=3", "optim.ema_decay=0.9", "optim.warmup_steps=2",
]


def cmd(out: Path, cache: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train/main.py"), f"train.output_dir={out}", f"train.cache_dir={cache}",
            *COMMON, *overrides]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT))


def run(out, cache, *overrides, timeout=300) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd(out, cache, *overrides), cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-5000:]
    return p


def per_step(out: Path) -> dict[int, float]:
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/train"] for r in recs}


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_model):
    return quick_start_cache(tmp_path_factory.mktemp("cache"), tiny_model)


@pytest.mark.slow  # whole suite only: a training run or a sweep (> 20 s on 2 cores)
def test_sigkill_then_rerun_reproduces_the_straight_run(tmp_path, cache):
    straight = tmp_path / "straight"
    run(straight, cache, f"train.max_steps={2 * N}")

    resumed = tmp_path / "resumed"
    args = cmd(resumed, cache, f"train.max_steps={2 * N}", "train.debug_step_delay_s=1.0")
    proc = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(resumed / "checkpoints" / f"step-{N}" / "COMPLETE", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = time.time()
    assert proc.returncode == -signal.SIGKILL
    assert not (resumed / "summary.json").exists()

    # a newer checkpoint folder without its completion mark (killed mid-write) must be ignored
    fake = resumed / "checkpoints" / f"step-{N + 1}"
    fake.mkdir()
    (fake / "trainer_state.json").write_text('{"step": 999}')

    p = run(resumed, cache, f"train.max_steps={2 * N}")
    assert f"resumed from {resumed / 'checkpoints' / f'step-{N}'}" in p.stdout
    a, b = per_step(straight), per_step(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 2 * N + 1))
    assert [a[s] for s in sorted(a)] == [b[s] for s in sorted(b)]  # bit-exact, every step
    # negative control against a silent restart from scratch (which would log the same numbers):
    # steps <= N come from the killed process, the later ones from the rerun
    times = {json.loads(l)["step"]: json.loads(l)["time"] for l in (resumed / "metrics.jsonl").read_text().splitlines()}
    assert all(times[s] < killed_at for s in range(1, N + 1))
    assert all(times[s] > killed_at for s in range(N + 1, 2 * N + 1))
    ema_a = load_file(str(straight / "checkpoints" / f"step-{2 * N}" / "ema.safetensors"))
    ema_b = load_file(str(resumed / "checkpoints" / f"step-{2 * N}" / "ema.safetensors"))
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert not fake.exists()  # the leftover was cleaned up once newer complete checkpoints existed


def in_process(out: Path, cache: Path, *overrides: str):
    """``run(cfg)`` of the same command line, in this process."""
    from train.config import compose
    from train.loop import run as run_training

    return run_training(compose([f"train.output_dir={out}", f"train.cache_dir={cache}", *COMMON, *overrides]))


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(fresh_accelerate_state):
    yield
    import wandb

    if wandb.run is not None:  # a run stopped by an exception leaves its (offline) wandb run open
        wandb.finish()


def test_sigterm_saves_and_exits_cleanly(tmp_path, cache):
    import threading

    out = tmp_path / "term"

    def terminate_after_first_step():
        t0 = time.time()
        while not (out / "metrics.jsonl").exists() and time.time() - t0 < 240:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # caught by the trainer's handler, not pytest's default

    threading.Thread(target=terminate_after_first_step, daemon=True).start()
    in_process(out, cache, "train.max_steps=50", "train.checkpoint_every=0", "train.debug_step_delay_s=1.0")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"].startswith("preempted (SIGTERM")
    step = summary["step"]
    assert 1 <= step < 50
    assert (out / "checkpoints" / f"step-{step}" / "COMPLETE").is_file()


@pytest.mark.slow  # whole suite only: a training run or a sweep (> 20 s on 2 cores)
def test_nan_loss_is_skipped_counted_then_stops(tmp_path, cache):
    from train.state import NonFiniteLossError

    out = tmp_path / "nan"
    # a huge lr makes the weights non-finite after the first update -> every later loss is NaN
    with pytest.raises(NonFiniteLossError, match="in a row had a NaN/Inf loss"):
        in_process(out, cache, "train.max_steps=20", "train.checkpoint_every=0", "optim.lr=1e30",
                   "optim.grad_clip=0", "optim.warmup_steps=0", "train.max_consecutive_nonfinite=3")
    from train.metrics import read_metrics

    recs = read_metrics(out)  # strict JSON on disk (NaN written as null), NaN again when read
    assert recs[-1]["train/nonfinite_skips"] >= 2
    assert recs[0]["loss/train"] == recs[0]["loss/train"]  # finite first step
    assert recs[-1]["loss/train"] != recs[-1]["loss/train"]  # NaN logged as NaN, not hidden


def test_keep_last_and_incomplete_folders(tmp_path):
    from train.checkpoint import store as ck

    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4, 5, 9):
        (root / f"step-{step}").mkdir(parents=True)
        if step not in (3, 9):
            (root / f"step-{step}" / ck.COMPLETE).write_text("{}")
    assert ck.latest_complete(tmp_path)[0] == 5  # step-9 has no mark: never a resume point
    ck.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-4", "step-5", "step-9"]
    # step-9 (newer, incomplete) is left for a run that may still be writing it
