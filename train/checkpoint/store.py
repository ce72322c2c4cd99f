"""Training checkpoints that are never half-loaded.

``<output_dir>/checkpoints/step-<N>/``: accelerate's state (model, optimizer, per-rank RNG; DeepSpeed
partitions), ``trainer_state.json`` (step, non-finite counters, LR scheduler), ``rank<R>.json``
(data position), ``rng-rank<R>.safetensors`` (noise generator) and ``ema.safetensors``: the parts of
``Trainer.state_dict()`` mapped to files. Written into ``.tmp-step-<N>``, renamed, ``COMPLETE``
last; folders without it are ignored and cleaned up; the newest ``keep_last`` finite ones are kept.

Resume checks the ``MANIFEST.json`` and every pickle (``train.checkpoint.verify``) and falls back to
the previous complete checkpoint, moving a damaged one to ``damaged-step-<N>`` (kept, never pruned
or resumed); with none usable the run refuses (``NoUsableCheckpointError``) instead of starting
over (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from train.checkpoint.verify import (DamagedCheckpointError, check_pickles, damage, make_group_readable,
                                     write_manifest)
from wan_animate.memory.fp8 import stored_state_dict

COMPLETE = "COMPLETE"


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, I/O error): one line, earlier ones untouched."""
_STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_complete(output_dir: str | Path) -> list[tuple[int, Path]]:
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    named = ((_STEP_RE.match(p.name), p) for p in root.iterdir())
    return sorted((int(m.group(1)), p) for m, p in named if m and p.is_dir() and (p / COMPLETE).is_file())


def latest_complete(output_dir: str | Path) -> tuple[int, Path] | None:
    return (list_complete(output_dir) or [None])[-1]


def save_checkpoint(acc, output_dir: str | Path, step: int, state: dict[str, Any], keep_last: int,
                    save_kwargs: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls it with its own ``state`` (``Trainer.state_dict()``). Returns
    the final folder."""
    root = checkpoints_dir(output_dir)
    tmp = root / f".tmp-step-{step}"
    final = root / f"step-{step}"
    try:
        _write(acc, root, tmp, final, step, state, save_kwargs, save_file)
    except (OSError, RuntimeError, SafetensorError) as e:  # disk full, quota, I/O error (torch: with C++ frames)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSaveError(_save_failure(output_dir, root, step, e)) from None
    if acc.is_main_process:
        prune(output_dir, keep_last)
    acc.wait_for_everyone()
    return final


def _write(acc, root: Path, tmp: Path, final: Path, step: int, state: dict[str, Any], save_kwargs, save_file) -> None:
    if acc.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    # fp8 layers exist only with a frozen base (trainable-only checkpoints, whose save hook keeps
    # the trainables): their state dict stays as stored instead of dequantizing the frozen model
    with stored_state_dict():
        acc.save_state(str(tmp), **(save_kwargs or {}))  # e.g. DeepSpeed exclude_frozen_parameters
    save_file({"state": state["rng"]}, str(tmp / f"rng-rank{acc.process_index}.safetensors"))
    (tmp / f"rank{acc.process_index}.json").write_text(json.dumps(state["data"]))
    if acc.is_main_process:
        if state.get("ema") is not None:
            save_file({k: v.contiguous() for k, v in state["ema"].items()}, str(tmp / "ema.safetensors"))
        trainer_state = {**state["train"], "scheduler": state["scheduler"]}
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    acc.wait_for_everyone()
    if acc.is_main_process:
        make_group_readable(tmp)
        write_manifest(tmp)
        if final.exists():  # an older, incomplete or superseded copy of the same step
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        streak = int(state["train"].get("consecutive_nonfinite", 0))
        (final / COMPLETE).write_text(json.dumps({"step": step, "nonfinite_streak": streak}))
        _fsync_dir(final)


def _save_failure(output_dir: str | Path, root: Path, step: int, e: BaseException) -> str:
    """One line: what failed (first line of the error, without C++ frames), free space, what is safe."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    try:
        free = f"{shutil.disk_usage(root).free / 2**30:.1f} GiB free on {root}"
    except OSError:
        free = f"free space on {root} unknown"
    good = last_good(output_dir)
    where = (f"the newest complete checkpoint {good[1].name} is untouched; free space and rerun the same command to "
             f"resume from step {good[0]}" if good else "no earlier checkpoint; free space and rerun the same command")
    return f"checkpoint step-{step} could not be written ({type(e).__name__}: {first}); {free}; {where}."


def _finite(path: Path) -> bool:
    """Taken after a finite step (checkpoints of older versions carry no streak: counted as finite)."""
    try:
        return int(json.loads((path / COMPLETE).read_text()).get("nonfinite_streak", 0)) == 0
    except (ValueError, OSError, AttributeError):
        return True


def prune(output_dir: str | Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints taken after a finite step (a NaN streak never
    pushes the last good one out), and remove leftovers of killed saves."""
    complete = list_complete(output_dir)
    good = [(s, p) for s, p in complete if _finite(p)]
    newest_good = good[-1][0] if good else -1
    for step, path in complete:
        if (step, path) in good[:-keep_last] or (not _finite(path) and step < newest_good):
            shutil.rmtree(path, ignore_errors=True)
    newest = complete[-1][0] if complete else -1
    for p in checkpoints_dir(output_dir).iterdir():
        m = _STEP_RE.match(p.name)
        # incomplete folders older than the newest complete one are leftovers of killed runs
        if m and not (p / COMPLETE).is_file() and int(m.group(1)) <= newest:
            shutil.rmtree(p, ignore_errors=True)


def last_good(output_dir: str | Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint taken after a finite step (what a NaN stop names)."""
    good = [(s, p) for s, p in list_complete(output_dir) if _finite(p)]
    return good[-1] if good else None


class NoUsableCheckpointError(RuntimeError):
    """The run folder holds checkpoints, none of them resumable: refused, nothing changed."""


def _problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed (damaged file, streak), None when it can. Raises
    ``UnsafeCheckpointError`` for a pickle that would run code."""
    if not _finite(path):
        return "taken during a streak of non-finite steps"
    problem = damage(path)
    if problem is None:
        try:
            check_pickles(path)
        except DamagedCheckpointError as e:
            problem = str(e)
    return problem


def _move_aside(path: Path) -> Path:
    """``step-N`` -> ``damaged-step-N`` (``-2``, ... if taken): out of resume and pruning, kept."""
    target, n = path.with_name(f"damaged-{path.name}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"damaged-{path.name}-{n}")
    os.replace(path, target)
    return target


def _choose_resume(output_dir: str | Path) -> Path | None:
    """The newest resumable complete checkpoint (``_problem``); the damaged newer ones moved aside
    with a warning, or, when none is usable, nothing touched and ``NoUsableCheckpointError``."""
    complete = list_complete(output_dir)
    rejected: list[tuple[Path, str]] = []
    chosen = None
    for _, path in reversed(complete):
        problem = _problem(path)
        if problem is None:
            chosen = path
            break
        rejected.append((path, problem))
    if chosen is None and rejected:
        listed = "; ".join(f"{p.name}: {why}" for p, why in rejected[:3])
        raise NoUsableCheckpointError(
            f"no checkpoint in {checkpoints_dir(output_dir)} can be resumed ({listed}{'; ...' if len(rejected) > 3 else ''}); "
            "nothing was changed. Restore the damaged files, or start over with train.overwrite=true (moves this run "
            "aside) or a new train.output_dir.")
    for path, problem in rejected:
        if problem.startswith("taken during a streak"):  # pruned once a newer good one exists
            print(f"[train] not resuming from {path}: {problem}", flush=True)
            continue
        moved = _move_aside(path)
        print(f"[train] WARNING: not resuming from {path}: {problem}; moved to {moved.name} (kept, not counted by "
              f"train.keep_last); resuming from {chosen.name}", flush=True)
    return chosen


def resume_point(acc, output_dir: str | Path) -> Path | None:
    """Collective: rank 0 checks the candidates (manifest, pickles) and every rank gets its answer
    (the path, or the error that stops all ranks)."""
    answer: list[Any] = [None]
    if acc.is_main_process:
        try:
            answer[0] = ("ok", _choose_resume(output_dir))
        except Exception as e:  # noqa: BLE001 - raised on every rank below
            answer[0] = ("error", e)
    if acc.num_processes > 1:
        broadcast_object_list(answer, from_process=0)
    kind, value = answer[0]
    if kind == "error":
        raise value
    return value


def load_checkpoint(acc, path: Path, load_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Collective. Restores accelerate's state (model, optimizer, RNG) and returns this rank's
    ``Trainer.state_dict()`` from the files (``scheduler`` is None in checkpoints written before the
    scheduler state was saved). ``path``: a complete checkpoint (``resume_point``)."""
    acc.load_state(str(path), **(load_kwargs or {}))
    rng_file = path / f"rng-rank{acc.process_index}.safetensors"
    if not rng_file.is_file():
        raise RuntimeError(f"{rng_file} missing: the checkpoint was written by a run with fewer ranks; exact resume "
                           "needs the same number of processes.")
    train = json.loads((path / "trainer_state.json").read_text())
    scheduler = train.pop("scheduler", None)
    return {
        "train": train,
        "scheduler": scheduler,
        "data": json.loads((path / f"rank{acc.process_index}.json").read_text()),
        "rng": load_file(str(rng_file))["state"],
        "ema": load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").is_file() else None,
    }


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # best effort: the rename is done either way
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
