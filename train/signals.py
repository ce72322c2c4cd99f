"""Stop signals reach the trainer even when they hit its launcher first.

``accelerate launch`` with one process starts the trainer with ``subprocess.Popen`` and waits:
SIGTERM / SIGUSR1 to the launcher kills the launcher (Python's default action) and the trainer
runs on, orphaned, with nobody to stop it. On Linux the trainer therefore asks the kernel for
SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``): the launcher's death becomes a normal
preemption (``train.loop.Preemption``: finish the step, checkpoint, exit 0). Only under a launcher
(accelerate, torchrun): a trainer started from a shell (``python -m train.main``, ``nohup``) keeps
running when that shell exits.

Multi-process launches (torchrun's agent) forward SIGTERM to the ranks themselves; under Slurm,
``launch/slurm/train.sbatch`` sends the signal to the ranks, never only the agent (docs/reliability.md).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_LAUNCHER_ENV = ("ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID")  # set by accelerate launch / torchrun


def launched() -> bool:
    return any(k in os.environ for k in _LAUNCHER_ENV)


def stop_with_launcher() -> bool:
    """Linux + launched: SIGTERM to this process when the launcher dies. Returns whether it is set."""
    if not sys.platform.startswith("linux") or not launched():
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    except (OSError, AttributeError) as e:
        print(f"[train] WARNING: cannot tie this trainer to its launcher ({e}); stop it with SIGTERM to the "
              f"trainer process {os.getpid()} itself.", flush=True)
        return False
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
    return True
