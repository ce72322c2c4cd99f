"""Launch-level reliability (issue 11): a refused config leaves no folder, one run per output_dir
(lock), stop signals reach the trainer through its launcher (single-process ``accelerate launch``)
and through ``launch/slurm/train.sbatch`` (a 2-process DDP run under stand-in ``srun``/``scancel``).
These tests start real processes: signals and launchers are the point. docs/reliability.md maps
each fault to its test."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["train.progress=false", "train.validation=false", "train.export=false"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


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


def _sleeper():
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def test_run_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path):
    import socket

    from train.checkpoint.run_lock import LOCK_NAME, RunLockedError, _start_time, acquire, release

    lock = acquire(tmp_path)
    owner = json.loads(lock.read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    release(lock)
    assert not lock.exists()

    live = _sleeper()
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(), "started": 0,
                                                      "start_time": _start_time(live.pid)}))
        with pytest.raises(RunLockedError, match=f"in use by another run \\(pid {live.pid} on host"):
            acquire(tmp_path)
        # pid reuse: the same pid with another start time is not the owner
        (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(), "started": 0,
                                                      "start_time": "1"}))
        release(acquire(tmp_path))
    finally:
        live.kill()
        live.wait()
    # the owner is gone (its pid no longer exists): stale, taken over
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(), "started": 0}))
    release(acquire(tmp_path))
    # another host cannot be checked: refused with the way out
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    with pytest.raises(RunLockedError, match="delete .*run.lock if that run is gone"):
        acquire(tmp_path)


def test_second_run_on_a_locked_output_dir_refuses_before_loading(tmp_path):
    import socket

    from train.checkpoint.run_lock import LOCK_NAME, _start_time

    out = tmp_path / "run"
    out.mkdir()
    live = _sleeper()
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(), "started": 0,
                                                 "start_time": _start_time(live.pid)}))
        p = _main(f"train.output_dir={out}")
    finally:
        live.kill()
        live.wait()
    assert p.returncode == 2
    assert p.stderr.strip().startswith("[train] configuration error: train.output_dir=") and "\n" not in p.stderr.strip()
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


def _orphan_gets_sigterm(tmp_path: Path, launched: bool) -> tuple[bool, str]:
    """A 'launcher' process starts a trainer-like child and is SIGKILLed: does the child hear it?"""
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
    while not marker.exists() and time.time() - t0 < 10:
        time.sleep(0.05)
    got = marker.exists()
    if not got:
        os.kill(int(child_pid), signal.SIGKILL)
    return got, armed


def test_trainer_hears_its_launcher_die(tmp_path):
    assert _orphan_gets_sigterm(tmp_path, launched=True) == (True, "True")
    # negative control: started from a shell (no launcher), the child is not tied to its parent
    assert _orphan_gets_sigterm(tmp_path, launched=False) == (False, "False")


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
