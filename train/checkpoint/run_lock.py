"""One run per ``train.output_dir``: ``<output_dir>/.run.lock`` is held with ``fcntl.flock`` for the
run's life; a second run refuses with one line naming the owner (the file's pid, host, start time).

The kernel drops the lock when its holder dies however it dies, so there is no stale lock and no
takeover race. ``release`` unlinks the file while still holding the lock; a contender that opened
the old file sees, once it holds the lock, that the path names another file and starts again.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = ".run.lock"


class RunLockedError(RuntimeError):
    """Another live run writes to this output_dir (or the lock cannot be taken at all)."""


@dataclass
class RunLock:
    """A held lock: keep the object alive for the run (closing ``fd`` releases the lock)."""

    path: Path
    fd: int


def _describe(owner: dict) -> str:
    if not owner:
        return "a run that is starting"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner.get("started", 0))))
    return f"pid {owner.get('pid')} on host {owner.get('host')} since {started}"


def _read_owner(fd: int) -> dict:
    try:
        data = os.pread(fd, 1 << 16, 0)
        owner = json.loads(data.decode("utf-8")) if data else {}
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a release unlinks it)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def acquire(output_dir: str | os.PathLike) -> RunLock:
    """Take the lock or raise ``RunLockedError`` (one line); give the result to ``release``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    for _ in range(100):  # only a release between our open and our lock makes us go round again
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = _read_owner(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockedError(
                    f"train.output_dir={out} is in use by another run ({_describe(owner)}); wait for it or use "
                    "another train.output_dir.") from None
            raise RunLockedError(
                f"cannot lock {path} ({e.strerror}): the file system does not support locks; use a "
                "train.output_dir on a local or lock-capable file system.") from None
        if not _same_file(fd, path):
            os.close(fd)
            continue
        before = _read_owner(fd)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "argv": sys.argv}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
        except OSError as e:
            path.unlink(missing_ok=True)
            os.close(fd)
            raise RunLockedError(f"cannot write {path} ({e.strerror}); free space in train.output_dir={out} "
                                 "or use another one.") from None
        if before:
            print(f"[train] the previous run in {out} ({_describe(before)}) ended without releasing its lock "
                  "(killed?); this run takes the folder over", flush=True)
        return RunLock(path, fd)
    raise RunLockedError(f"could not take {path}: other runs keep taking and releasing it; use another "
                         "train.output_dir.")


def release(lock: RunLock) -> None:
    """Remove the lock file (while still holding the lock), then drop the lock."""
    try:
        if _same_file(lock.fd, lock.path):
            lock.path.unlink(missing_ok=True)
    finally:
        os.close(lock.fd)
