"""Stop signals: SIGTERM / SIGUSR1 set a flag (``Preemption``) from the start of ``train.loop.run``
to its summary: the step finishes, a checkpoint is written and the run stops cleanly; in the final
phase the phase in progress completes and the next is left to the rerun (docs/reliability.md).

``accelerate launch`` with one process waits on the trainer in ``subprocess.Popen``: a signal kills
the launcher and would orphan the trainer, so a launched trainer asks Linux for SIGTERM when its
parent dies (``prctl(PR_SET_PDEATHSIG)``). Multi-process launchers forward signals to the ranks.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # the run lock (fcntl) already makes the trainer POSIX-only
_PR_SET_PDEATHSIG = 1
_LAUNCHER_ENV = ("ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID")  # set by accelerate launch / torchrun


def stop_with_launcher() -> bool:
    """Linux + launched: SIGTERM to this process when the launcher dies. Returns whether it is set."""
    if not sys.platform.startswith("linux") or not any(k in os.environ for k in _LAUNCHER_ENV):
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


class Preemption:
    """Context manager: SIGTERM / SIGUSR1 -> ``requested`` (and ``signal``, its name). The loop
    checkpoints and stops after the current step; the final phase stops between validation and
    export. The previous handlers come back on exit."""

    def __init__(self):
        self.requested = False
        self.signal: str | None = None
        self._old: dict = {}

    def __enter__(self) -> "Preemption":
        for sig in STOP_SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: signals go to the main thread's handlers
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
