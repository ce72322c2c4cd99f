"""Launch-level reliability: a refused config leaves no folder, one run per output_dir
(lock), stop signals reach the trainer through its launcher (single-process ``accelerate launch``)
and through ``launch/slurm/train.sbatch`` (a 2-process DDP run under stand-in ``srun``/``scancel``).
These tests start real processes: signals and launchers are the point. docs/reliability.md maps
each fault to its test."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import quick_start_cache

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["train.progress=false", "train.validation=false", "train.export=false"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_model):
    return quick_start_cache(tmp_path_factory.mktemp("cache"), tiny_model)


# ---------------------------------------------------------------------------- 7. refused config


def _main(*overrides: str, timeout: int = 300):
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    return subprocess.run([sys.executable, "-m", "train.main", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_refused_config_leaves_no_folder(tmp_path):
    out = tmp_path / "run"
    p = _main(f"train.output_dir={out}", "optim.lr=nan")
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip() == "[train] configuration error: optim.lr=nan must be finite (no NaN or Inf)."
    assert not out.exists() and not (ROOT / "main.log").exists()
    # negative control: Hydra's own run folder (the old hydra.run.dir) is created before validation
    p = _main(f"train.output_dir={out}", "optim.lr=nan", "hydra.run.dir=${train.output_dir}/hydra/x")
    assert p.returncode == 2 and (out / "hydra" / "x").is_dir()


# ---------------------------------------------------------------------------- 6. one run per output_dir


_HOLDER = """
import sys, time
from train.checkpoint.run_lock import acquire
lock = acquire(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def _holder(folder: Path):
    """A process that takes the run lock of ``folder`` and keeps it (until killed)."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.stdout.readline().strip() == "held"
    return p


def test_run_lock_refuses_a_live_owner_and_dies_with_its_holder(tmp_path, capsys):
    import signal
    import socket

    from train.checkpoint.run_lock import LOCK_NAME, RunLockedError, acquire, release

    lock = acquire(tmp_path)
    owner = json.loads(lock.path.read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    with pytest.raises(RunLockedError, match=f"in use by another run \\(pid {os.getpid()} on host"):
        acquire(tmp_path)  # a second contender in the same process is refused too (one lock per open file)
    release(lock)
    assert not lock.path.exists()

    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunLockedError, match=f"in use by another run \\(pid {holder.pid} on host"):
            acquire(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)  # no chance to release: the kernel drops the lock
        holder.wait()
    assert (tmp_path / LOCK_NAME).exists()  # the dead holder's file is still there ...
    release(acquire(tmp_path))  # ... and taken over, with a note
    assert f"(pid {holder.pid} on host" in capsys.readouterr().out
    # a lock file of a live process that holds no kernel lock (an older version's file) is no lock
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": 0}))
    release(acquire(tmp_path))


def _contender(folder: str, barrier, wins, me: int, contenders: int, trials: int) -> None:
    import sys
    import time

    from train.checkpoint.run_lock import RunLockedError, acquire, release

    class SlowLog:  # the takeover notes go to a slow log (a busy terminal, a network file system)
        def write(self, text):
            time.sleep(0.002)
            return len(text)

        def flush(self):
            pass

    sys.stdout = SlowLog()
    for trial in range(trials):
        barrier.wait()  # the stale lock of a dead run is in place
        try:
            lock = acquire(folder)
        except RunLockedError:
            lock = None
        wins[trial * contenders + me] = lock is not None
        barrier.wait()  # everyone has tried while the winner still holds it
        if lock is not None:
            release(lock)
        barrier.wait()


@pytest.mark.parametrize("contenders", [2, 4])
def test_run_lock_race_has_exactly_one_winner(tmp_path, contenders):
    """The lock of a dead run (its pid is gone) is left in the folder, then ``contenders`` processes
    try to take it at once, 200 times: exactly one wins each time. (A lock taken over by reading
    the dead owner and deleting the file let two processes win: 13 of 200 trials with 2.)"""
    import multiprocessing
    import socket
    import subprocess

    from train.checkpoint.run_lock import LOCK_NAME

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 0, "start_time": "1"})
    trials = 200
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(contenders + 1)
    wins = ctx.Array("b", trials * contenders)
    procs = [ctx.Process(target=_contender, args=(str(tmp_path), barrier, wins, i, contenders, trials))
             for i in range(contenders)]
    for p in procs:
        p.start()
    try:
        for _ in range(trials):
            (tmp_path / LOCK_NAME).write_text(stale)
            for _ in range(3):
                barrier.wait(timeout=30)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    winners = [sum(wins[t * contenders:(t + 1) * contenders]) for t in range(trials)]
    assert all(p.exitcode == 0 for p in procs)
    assert winners == [1] * trials, f"{sum(w != 1 for w in winners)} of {trials} trials without exactly one owner"


def test_run_lock_on_a_full_disk_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    import errno

    from train.checkpoint import run_lock

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(run_lock.os, "pwrite", full)
    with pytest.raises(run_lock.RunLockedError) as e:
        run_lock.acquire(tmp_path)
    assert "No space left on device" in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # no lock, no stray .run.lock.<host>.<pid>


def test_second_run_on_a_locked_output_dir_refuses_before_loading(tmp_path):
    from train.checkpoint.run_lock import LOCK_NAME

    out = tmp_path / "run"
    out.mkdir()
    holder = _holder(out)
    try:
        p = _main(f"train.output_dir={out}")
    finally:
        holder.kill()
        holder.wait()
    assert p.returncode == 2
    assert p.stderr.strip().startswith("[train] configuration error: train.output_dir=") and "\n" not in p.stderr.strip()
    assert f"pid {holder.pid}" in p.stderr
    assert sorted(x.name for x in out.iterdir()) == [LOCK_NAME]  # no config.json, hydra/, metrics


# ---------------------------------------------------------------------------- 5. stop signals

_CHILD = """
import os, signal, sys, time
from train.signals import stop_with_launcher
marker = sys.argv[1]
signal.signal(signal.SIGTERM, lambda *a: (open(marker, "w").write("SIGTERM"), sys.exit(0)))
print(stop_with_launcher(), flush=True)
time.sleep(60)
"""
_PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
print(child.pid, child.stdout.readline().strip(), flush=True)
time.sleep(60)
"""


def _orphan_gets_sigterm(tmp_path: Path, launched: bool, wait: float = 10.0) -> tuple[bool, str, float]:
    """A 'launcher' process starts a trainer-like child and is SIGKILLed: does the child hear it within
    ``wait`` seconds? Returns (heard, whether the child armed the tie, seconds until it heard)."""
    import signal
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID")}
    if launched:
        env["ACCELERATE_DYNAMO_BACKEND"] = "NO"
    marker = tmp_path / f"marker-{launched}"
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, _CHILD, str(marker)], stdout=subprocess.PIPE, text=True,
                              env=env, cwd=ROOT)
    child_pid, armed = parent.stdout.readline().split()
    parent.kill()
    parent.wait()
    t0 = time.time()
    while not marker.exists() and time.time() - t0 < wait:
        time.sleep(0.05)
    got, seconds = marker.exists(), time.time() - t0
    if not got:
        os.kill(int(child_pid), signal.SIGKILL)
    return got, armed, seconds


def test_trainer_hears_its_launcher_die(tmp_path):
    heard, armed, seconds = _orphan_gets_sigterm(tmp_path, launched=True)
    assert (heard, armed) == (True, "True")
    # negative control: started from a shell (no launcher), the child is not tied to its parent; it is
    # given 20x the time the tied child took to hear (at least 2 s, at most the same 10 s)
    heard, armed, _ = _orphan_gets_sigterm(tmp_path, launched=False, wait=min(10.0, max(2.0, 20 * seconds)))
    assert (heard, armed) == (False, "False")


@pytest.mark.slow  # accelerate launch + a quick-start run (~40-90 s on 2 cores)
def test_sigterm_to_single_process_accelerate_launch_checkpoints_and_stops(tmp_path, cache):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "launched"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train/main.py"),
           f"train.output_dir={out}", f"train.cache_dir={cache}", *QUIET, "train.max_steps=50",
           "train.checkpoint_every=0", "train.debug_step_delay_s=1.0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not (out / "metrics.jsonl").exists():
        assert launcher.poll() is None, launcher.communicate()[0][-4000:]
        assert time.time() - t0 < 400
        time.sleep(0.1)
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    assert len(children) == 1
    trainer = int(children[0])
    launcher.send_signal(signal.SIGTERM)  # what a scheduler or `kill` sends to the process it started
    launcher.wait(timeout=60)

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    while alive(trainer):
        assert time.time() - t0 < 400, "the trainer outlived its launcher"
        time.sleep(0.1)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "preempted (SIGTERM)"
    assert (out / "checkpoints" / f"step-{summary['step']}" / "COMPLETE").is_file()
    assert summary["step"] < 50


_FAKE_SRUN = """#!/bin/bash
# stand-in for srun: drop its options, run the task as a new session, remember the step's pid
while [[ "$1" == --* ]]; do shift; done
echo $$ > "$FAKE_SLURM/step.pid"
exec setsid "$@"
"""
_FAKE_SCANCEL = """#!/usr/bin/env python3
# stand-in for `scancel --signal=SIG <job>`: like Slurm's process tracking, signal every process
# of the job step (the task and all its descendants, whatever their session)
import os, signal, sys
sig = getattr(signal, "SIG" + sys.argv[1].split("=", 1)[1])
root = int(open(os.path.join(os.environ["FAKE_SLURM"], "step.pid")).read())
parents = {}
for d in os.listdir("/proc"):
    if d.isdigit():
        try:
            parents[int(d)] = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
        except OSError:
            pass
step, grew = {root}, True
while grew:
    new = {p for p, pp in parents.items() if pp in step} - step
    step |= new
    grew = bool(new)
with open(os.path.join(os.environ["FAKE_SLURM"], "scancel.log"), "a") as log:
    log.write(f"{sig.name} {sorted(step)}\\n")
for pid in step:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
"""


def _fake_slurm(tmp_path: Path) -> dict:
    import socket
    import sys

    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, text in (("srun", _FAKE_SRUN), ("scancel", _FAKE_SCANCEL), ("scontrol", "#!/bin/bash\necho 127.0.0.1\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return dict(os.environ, PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", FAKE_SLURM=str(tmp_path),
                SLURM_JOB_ID="7", SLURM_JOB_NODELIST="node1", SLURM_NNODES="1", SLURM_NODEID="0", GPUS_PER_NODE="2",
                MASTER_PORT=str(port), ACCELERATE_CONFIG="launch/accelerate/cpu_2proc_ddp.yaml", OMP_NUM_THREADS="1",
                WANDB_MODE="offline")


@pytest.mark.slow  # 2-process DDP run under the batch script (~1-2 min on 2 cores)
def test_sbatch_forwards_usr1_to_the_ranks_and_the_agent_exits_0(tmp_path, cache):
    import signal
    import subprocess
    import time

    out = tmp_path / "slurm"
    shell = subprocess.Popen(
        ["bash", "launch/slurm/train.sbatch", f"train.output_dir={out}", f"train.cache_dir={cache}", *QUIET,
         "train.max_steps=50", "train.checkpoint_every=0", "train.debug_step_delay_s=1.0"],
        cwd=ROOT, env=_fake_slurm(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not (out / "metrics.jsonl").exists():
        assert shell.poll() is None, shell.communicate()[0][-5000:]
        assert time.time() - t0 < 500
        time.sleep(0.1)
    shell.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@90 sends
    text = shell.communicate(timeout=300)[0]
    assert shell.returncode == 0, text[-5000:]
    assert "[sbatch] SIGUSR1: asking the trainer ranks to checkpoint and stop" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "preempted (SIGUSR1)" and summary["world_size"] == 2
    assert (out / "checkpoints" / f"step-{summary['step']}" / "COMPLETE").is_file()
