"""What every command-line tool of the project does with an expected error (one the user can fix:
a bad value or path, a checkpoint or LoRA that does not fit, an unreadable input): one line on
stderr naming the problem and the fix, exit status 2, no traceback. Anything else is a bug and keeps
its traceback; ``--debug`` or ``HYDRA_FULL_ERROR=1`` re-raise the expected error with it too.

Hydra tools also get :func:`check_overrides`: a ``key=value`` whose key is not in the tool's typed
config is refused with the closest key as the fix (``train.max_step=80`` -> "did you mean
train.max_steps=80?"), instead of Hydra's advice to append the key with ``+``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import difflib
import gc
import os
import sys
import types
import typing
from collections.abc import Iterable, Iterator
from typing import NoReturn

USAGE_STATUS = 2


class UsageError(ValueError):
    """A command line the tool cannot run as given (the message says what to change)."""


def _library_errors() -> tuple[type[BaseException], ...]:
    from wan_animate.lora import LoraError
    from wan_animate.official_encoders import OfficialEncoderError
    from wan_animate.pipeline import InputError
    from wan_animate.samples import SampleDecodeError
    from wan_animate.video_io import VideoDecodeError
    from wan_animate.weights.diagnose import CheckpointError
    from wan_animate.weights.keymap import KeyMapError

    return (UsageError, CheckpointError, KeyMapError, LoraError, InputError, SampleDecodeError, VideoDecodeError,
            OfficialEncoderError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def skip_collection_at_exit() -> None:
    """Every tool calls this first: at exit, the interpreter's last garbage collections skip the
    objects torch, transformers and diffusers hold (``gc.freeze``). A process exits in ~0.2 s instead
    of ~1.4-2.1 s (measured, those libraries imported). Objects are still freed by their reference
    counts; one kept alive by a reference cycle is not finalised, so every file a tool writes is
    closed (``with``) or finished (wandb) before it returns."""
    atexit.unregister(gc.freeze)  # once per process
    atexit.register(gc.freeze)


def take_debug_flag(argv: list[str]) -> bool:
    """Remove ``--debug`` from ``argv`` in place; True when it was there or ``HYDRA_FULL_ERROR=1``."""
    found = "--debug" in argv
    argv[:] = [arg for arg in argv if arg != "--debug"]
    if found:
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra tools: its own errors keep their traceback too
    return found or os.environ.get("HYDRA_FULL_ERROR") == "1"


def one_line(err: BaseException) -> str:
    """The message of ``err`` as the tool prints it (an empty message names the type)."""
    text = str(err).strip()
    if isinstance(err, KeyError) and text.startswith("'"):
        text = text.strip("'")
    return text or type(err).__name__


def fail(prefix: str, message: str, status: int = USAGE_STATUS) -> NoReturn:
    """Print ``prefix + message`` on stderr and exit (the prefix names the tool: ``"error: "``,
    ``"[train] configuration error: "``)."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one line per machine, not one per rank
        print(f"{prefix}{message}", file=sys.stderr)
    sys.stderr.flush()
    raise SystemExit(status)


@contextlib.contextmanager
def expected_errors(prefix: str = "error: ", extra: Iterable[type[BaseException]] = (), debug: bool | None = None) -> Iterator[None]:
    """``with expected_errors("error: ", (CliError,)):`` around a tool's work."""
    if debug is None:
        debug = os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        yield
    except (*_library_errors(), *tuple(extra)) as err:
        if debug:
            raise
        fail(prefix, one_line(err))


# ---- Hydra overrides


def _fields(cls) -> dict[str, typing.Any] | None:
    """Field name -> type of a dataclass, or None when ``cls`` is not one (any key is accepted below)."""
    cls = _unwrap(cls)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return None
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls)}


def _unwrap(tp):
    """``Optional[X]`` -> ``X``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _all_keys(cls, prefix: str = "") -> list[str]:
    out = []
    for name, tp in (_fields(cls) or {}).items():
        out.append(prefix + name)
        out.extend(_all_keys(tp, prefix + name + "."))
    return out


def unknown_key(key: str, schema, groups: Iterable[str] = ()) -> str | None:
    """None when ``key`` names a field of ``schema`` (or a config group), else the one-line refusal."""
    groups = set(groups)
    parts = key.split(".")
    if len(parts) == 1 and key in groups:
        return None
    cls = schema
    for i, part in enumerate(parts):
        fields = _fields(cls)
        if fields is None:  # a dict / Any field: free-form below this point
            return None
        if part not in fields:
            candidates = _all_keys(schema) + sorted(groups)
            close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
            if not close:  # a typo in the last part only: compare with the siblings
                parent = ".".join(parts[:i])
                close = [f"{parent}.{m}" if parent else m
                         for m in difflib.get_close_matches(part, list(fields), n=1, cutoff=0.6)]
            hint = f"did you mean {close[0]}?" if close else (
                "the keys here are " + ", ".join(sorted(fields)) if len(fields) <= 12 else "see the config reference")
            return f"{key} is not a configuration key; {hint}"
        cls = fields[part]
    return None


def check_overrides(prefix: str, argv: list[str], schema, groups: Iterable[str] = ()) -> None:
    """Refuse (one line, exit 2) the first ``key=value`` of ``argv`` whose key is not in ``schema``.
    ``+key``/``++key``/``~key``, ``hydra.*``, flags and group/package syntax are left to Hydra."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if key.startswith(("+", "~", "hydra.", "hydra/")) or key == "hydra" or "/" in key or "@" in key:
            continue
        problem = unknown_key(key, schema, groups)
        if problem:
            if problem.endswith("?"):
                problem = problem[:-1] + f"={value}?"
            fail(prefix, problem)


def config_groups(conf_dir: str) -> list[str]:
    """Names of the config groups (sub-folders) of a Hydra config folder."""
    return sorted(e.name for e in os.scandir(conf_dir) if e.is_dir()) if os.path.isdir(conf_dir) else []


def run_tool(fn, argv: list[str] | None = None, extra: Iterable[type[BaseException]] = (),
             prefix: str = "error: ") -> int:
    """Entry point of an argparse tool: ``sys.exit(run_tool(_main))`` with ``_main(argv) -> int``.
    ``--debug`` is taken out of ``argv`` first; third-party start-up noise is dropped
    (:mod:`wan_animate.quiet`); an expected error prints one line and returns 2."""
    from wan_animate.quiet import quiet_third_party

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = take_debug_flag(argv)
    quiet_third_party()
    skip_collection_at_exit()
    try:
        with expected_errors(prefix, extra, debug=debug):
            return fn(argv)
    except SystemExit as e:  # the one line (or argparse's usage) was printed; the status is returned
        return e.code if isinstance(e.code, int) else (0 if e.code is None else USAGE_STATUS)
