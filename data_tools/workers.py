"""Run one function over many inputs in spawned worker processes, surviving workers that die.

``multiprocessing.Pool`` waits forever for a task whose worker was killed (SIGKILL from the
out-of-memory killer). Here each worker takes one task at a time from its own queue, so a dead
worker's task gets a ``WorkerDied`` result naming the signal, a fresh worker replaces it and the run
goes on. ``fn(task, progress)``: ``progress(n)`` reports ``n`` units done to the parent's ``on_progress``.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

_POLL_S = 0.5


@dataclass
class WorkerDied:
    """The result of a task whose worker process died while running it."""

    exitcode: int | None

    @property
    def reason(self) -> str:
        code = self.exitcode
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = " (often the out-of-memory killer: use fewer workers or a smaller target_area)" \
                if -code == signal.SIGKILL else ""
            return f"worker process killed by {name}{hint}"
        return f"worker process exited with status {code} while processing this input"


def _worker_main(fn, initializer, initargs, tasks, results, wid: int) -> None:
    if initializer is not None:
        initializer(*initargs)
    while True:
        item = tasks.get()
        if item is None:
            return
        idx, task = item

        def progress(n: int = 1, _idx=idx) -> None:
            results.put(("progress", wid, _idx, n))

        try:
            out = fn(task, progress)
        except Exception as e:  # the function should catch its own errors; never lose the worker
            out = RuntimeError(f"{type(e).__name__}: {e}")
        results.put(("done", wid, idx, out))


class _Worker:
    def __init__(self, ctx, wid, fn, initializer, initargs, results):
        self.tasks = ctx.SimpleQueue()
        self.proc = ctx.Process(target=_worker_main, args=(fn, initializer, initargs, self.tasks, results, wid),
                                daemon=True)
        self.proc.start()
        self.current: int | None = None

    def give(self, idx: int, task: Any) -> None:
        self.current = idx
        self.tasks.put((idx, task))


def run_in_workers(fn: Callable, tasks: Iterable[Any], workers: int, *, initializer: Callable | None = None,
                   initargs: tuple = (), on_progress: Callable[[int, int], None] | None = None,
                   ) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, result)`` for every task, in task order. ``result`` is what ``fn`` returned,
    or ``WorkerDied`` when the worker running the task died. ``on_progress(index, n)`` is called in
    this process for every ``progress(n)`` a task reports."""
    tasks = list(tasks)
    ctx = mp.get_context("spawn")  # fork is unsafe with the threads of cv2 / torch / mediapipe
    results = ctx.Queue()
    pool = [_Worker(ctx, w, fn, initializer, initargs, results) for w in range(min(workers, len(tasks)))]
    pending = iter(range(len(tasks)))
    done: dict[int, Any] = {}
    next_out = 0

    def hand_out() -> None:  # the next tasks to idle workers
        for w in pool:
            if w.current is None and (idx := next(pending, None)) is not None:
                w.give(idx, tasks[idx])

    try:
        hand_out()
        last_check = time.monotonic()
        while next_out < len(tasks):
            try:
                kind, wid, idx, payload = results.get(timeout=_POLL_S)
            except queue.Empty:
                kind = None
            if kind == "progress" and on_progress is not None:
                on_progress(idx, payload)
            elif kind == "done" and pool[wid].current == idx:
                done[idx] = payload
                pool[wid].current = None
            if kind is None or time.monotonic() - last_check > _POLL_S:
                last_check = time.monotonic()
                for wid, w in enumerate(pool):
                    if w.current is not None and not w.proc.is_alive():
                        done[w.current] = WorkerDied(w.proc.exitcode)
                        pool[wid] = _Worker(ctx, wid, fn, initializer, initargs, results)
            hand_out()
            while next_out in done:
                yield next_out, done.pop(next_out)
                next_out += 1
    finally:
        for w in pool:
            if w.proc.is_alive():
                w.tasks.put(None)
        for w in pool:
            w.proc.join(timeout=5)
            if w.proc.is_alive():
                w.proc.terminate()
                w.proc.join(timeout=5)
