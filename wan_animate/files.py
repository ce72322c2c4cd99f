"""One home for writing files safely: everything a crash could leave half-written (manifests,
summaries, configs, shards, checkpoints, cached model folders) is written to a temporary sibling
and renamed into place, so a reader sees the old file or the new one, never a prefix.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

COMPLETE_MARKER = ".complete"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary sibling + ``os.replace``)."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # left only when the write or the rename failed
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def strict_json(obj: Any, inf_as_text: bool = False) -> Any:
    """A copy of ``obj`` that strict JSON can hold: NaN/Inf -> None (``inf_as_text``: +-Inf -> "inf" /
    "-inf"), tuples -> lists, keys -> str, numpy / torch scalars -> Python numbers (anything else
    with ``.item()`` or ``.tolist()``)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return ("inf" if obj > 0 else "-inf") if inf_as_text and math.isinf(obj) else None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {str(k): strict_json(v, inf_as_text) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [strict_json(v, inf_as_text) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy arrays / scalars, torch tensors
        return strict_json(obj.tolist(), inf_as_text)
    if hasattr(obj, "item"):
        return strict_json(obj.item(), inf_as_text)
    return obj  # let json.dumps name the type it cannot encode


def dumps_strict(obj: Any, **kwargs) -> str:
    """``json.dumps`` that never writes NaN/Infinity (they become null)."""
    kwargs.setdefault("ensure_ascii", False)
    return json.dumps(strict_json(obj), allow_nan=False, **kwargs)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, **kwargs) -> Path:
    """Write ``obj`` as strict JSON (NaN/Inf -> null), atomically."""
    text = dumps_strict(obj, indent=indent, **kwargs)
    return atomic_write_text(path, text + ("\n" if indent is not None else ""))


def atomic_dir(dst: str | os.PathLike, build_fn: Callable[[Path], Any]) -> Path:
    """Build the folder ``dst`` once: ``build_fn(tmp)`` fills a temporary sibling, which is marked
    ``.complete`` and renamed to ``dst``. A ``dst`` that already holds the marker is returned as is;
    one without it (an interrupted build) is replaced."""
    dst = Path(dst)
    if (dst / COMPLETE_MARKER).is_file():
        return dst
    tmp = _tmp_name(dst)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_fn(tmp)
        (tmp / COMPLETE_MARKER).write_text("ok")
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
