"""One run per ``train.output_dir``: ``<output_dir>/.run.lock`` holds the owner's pid, host, process
start time and command; a second run refuses with one line naming the owner.

The lock is created atomically (written under a temporary name, then ``os.link``ed into place,
which fails when the lock exists). A lock is stale, and taken over with a warning, when its
process is gone on this host: the pid does not exist, or it now belongs to a process that started
at another time (pid reuse). A lock from another host cannot be checked: the message says how to
remove it if that run is gone.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".run.lock"


class RunLockedError(RuntimeError):
    """Another live run writes to this output_dir."""


def _start_time(pid: int) -> str | None:
    """The process start time in clock ticks since boot (Linux ``/proc``), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of stat, counted after the comm field


def _alive(owner: dict) -> bool:
    pid = int(owner.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    recorded, now = owner.get("start_time"), _start_time(pid)
    return recorded is None or now is None or recorded == now


def _describe(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner.get("started", 0))))
    return f"pid {owner.get('pid')} on host {owner.get('host')} since {started}"


def acquire(output_dir: str | os.PathLike) -> Path:
    """Take the lock or raise ``RunLockedError``; returns the lock path (give it to ``release``)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
          "start_time": _start_time(os.getpid()), "argv": sys.argv}
    tmp = out / f"{LOCK_NAME}.{me['host']}.{me['pid']}"
    tmp.write_text(json.dumps(me))
    try:
        for _ in range(3):
            try:
                os.link(tmp, lock)
                return lock
            except FileExistsError:
                pass
            try:
                owner = json.loads(lock.read_text())
            except (OSError, ValueError):
                owner = {}
            if owner.get("host") not in (None, me["host"]):
                raise RunLockedError(
                    f"train.output_dir={out} is in use by another run ({_describe(owner)}); wait for it, use another "
                    f"train.output_dir, or delete {lock} if that run is gone.")
            if owner and _alive(owner):
                raise RunLockedError(
                    f"train.output_dir={out} is in use by another run ({_describe(owner)}); wait for it or use another "
                    "train.output_dir.")
            print(f"[train] taking over a stale lock {lock} ({_describe(owner) if owner else 'unreadable'}: "
                  "that process is gone)", flush=True)
            lock.unlink(missing_ok=True)
        raise RunLockedError(f"could not take {lock}: another run keeps creating it; use another train.output_dir.")
    finally:
        tmp.unlink(missing_ok=True)


def release(lock: Path) -> None:
    """Remove the lock if this process still owns it."""
    try:
        owner = json.loads(lock.read_text())
    except (OSError, ValueError):
        return
    if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)
