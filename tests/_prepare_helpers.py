"""Worker functions for tests/test_data_prepare.py: spawned workers import them by module name."""

import os
import signal
import time


def kill_marked(task, progress):
    """The prepare worker, except that an input whose name contains ``KILLME`` dies by SIGKILL
    (as under the out-of-memory killer)."""
    from data_tools.prepare import _worker_run

    if "KILLME" in str(task[0]):
        os.kill(os.getpid(), signal.SIGKILL)
    return _worker_run(task, progress)


def square_or_die(x, progress):
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    if x == 5:
        raise ValueError("five")
    progress(2)
    time.sleep(0.01)
    return x * x
