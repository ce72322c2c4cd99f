"""What makes a training checkpoint safe to load (docs/reliability.md).

* ``write_manifest`` / ``manifest_problem``: every file's size and SHA-256 (whole file up to
  64 MiB, else its first, middle and last MiB: truncation always shows in the size, the sampled
  hash catches a rewritten file, and a 14B save does not re-read hundreds of GB).
* ``check_pickles``: DeepSpeed unpickles its ``*.pt`` with ``weights_only=False``, so every pickle
  is read here first with ``torch.load(weights_only=True)`` allowing only tensors, accelerate's safe
  globals and a few plain DeepSpeed classes (found in a real ZeRO-2 checkpoint): anything else is
  ``UnsafeCheckpointError`` (refused), a truncated file ``DamagedCheckpointError`` (fall back).
* ``damage``: the manifest's verdict, or without one, whether every safetensors header parses.
* ``make_group_readable``: safetensors writes 0600; a run shared by a group must be readable.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import pickle
import re
from pathlib import Path

import torch
from accelerate.utils.other import TORCH_SAFE_GLOBALS
from safetensors import safe_open

from wan_animate.weights.files import group_readable_mode

MANIFEST = "MANIFEST.json"
_FULL_HASH_LIMIT = 64 << 20
_SAMPLE = 1 << 20
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch zip archive, raw pickle protocol >= 2
# plain DeepSpeed classes inside its optimizer-state files (ZeRO-1/2/3, fp16/bf16 loss scalers)
_DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file that would unpickle more than tensors: never loaded."""


class DamagedCheckpointError(RuntimeError):
    """A checkpoint file that is truncated or does not parse: that checkpoint cannot be resumed."""


def _files(folder: Path) -> list[Path]:
    return [path for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST]


def file_digest(path: Path) -> str:
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256()
        for offset in (0, size // 2, size - _SAMPLE):
            f.seek(offset)
            h.update(f.read(_SAMPLE))
    return h.hexdigest()


def write_manifest(folder: str | Path) -> Path:
    """``MANIFEST.json``: ``{relative path: {"size": bytes, "sha256": digest}}`` of every file."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_digest(p)}
             for p in _files(folder)}
    path = folder / MANIFEST
    path.write_text(json.dumps({"hash": "sha256 of files <= 64 MiB, else of first/middle/last MiB",
                                "files": files}, indent=1))
    return path


def manifest_problem(folder: str | Path) -> str | None:
    """None when every file the manifest lists is there with its size and hash; else what is wrong."""
    folder = Path(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} does not parse ({e})"
    for rel, want in files.items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        size = p.stat().st_size
        if size != want["size"]:
            return f"{rel} has {size:,} bytes, {want['size']:,} when saved (truncated or rewritten)"
        if file_digest(p) != want["sha256"]:
            return f"{rel} changed since it was saved (hash differs)"
    return None


def _safetensors_problem(folder: Path) -> str | None:
    """The first ``*.safetensors`` whose header does not parse or does not cover the file."""
    for path in sorted(folder.rglob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: the file is not whole
            return f"{path.relative_to(folder)} is truncated or damaged ({str(e).strip().splitlines()[0][:160]})"
    return None


def damage(folder: str | Path) -> str | None:
    """What is wrong with the checkpoint's files (manifest, or safetensors headers where there is
    no manifest: written before manifests existed), None when nothing is found. Pickles: ``check_pickles``."""
    folder = Path(folder)
    return manifest_problem(folder) if (folder / MANIFEST).is_file() else _safetensors_problem(folder)


def _safe_globals() -> list:
    found = list(TORCH_SAFE_GLOBALS)
    for module, name in _DEEPSPEED_GLOBALS:
        with contextlib.suppress(ImportError, AttributeError):  # DeepSpeed absent or renamed: its files fail safe
            found.append(getattr(importlib.import_module(module), name))
    return found


def _is_pickle(path: Path) -> bool:
    if path.suffix in _PICKLE_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(4)
    return any(head.startswith(m) for m in _PICKLE_MAGIC)


def check_pickles(folder: str | Path) -> int:
    """Read every pickle under ``folder`` with the tensor-only unpickler; returns how many.
    Raises ``UnsafeCheckpointError`` (one line: file, what it pickles, the fix) for a pickle of
    anything but tensors and ``DamagedCheckpointError`` for one that is truncated or does not parse."""
    folder = Path(folder)
    allowed = _safe_globals()
    count = 0
    for path in _files(folder):
        if path.suffix in (".safetensors", ".json", ".py") or not _is_pickle(path):
            continue
        try:
            with torch.serialization.safe_globals(allowed):
                try:
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):
                        raise
                    torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except Exception as e:  # noqa: BLE001 - any refusal means: do not hand the folder to DeepSpeed
            text = str(e)
            if not isinstance(e, pickle.UnpicklingError) or "truncated" in text:  # zip / EOF / OS errors
                first = (text.strip().splitlines() or [type(e).__name__])[0]
                raise DamagedCheckpointError(
                    f"{path.relative_to(folder)} is truncated or damaged ({type(e).__name__}: {first[:160]})") from None
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            detail = f"it pickles {found.group(1)}" if found else (text.strip().splitlines() or ["?"])[0]
            raise UnsafeCheckpointError(
                f"{path.relative_to(folder.parent)} is not a tensor-only pickle ({detail[:200]}); refusing "
                "to resume from it (it could run code). Delete that checkpoint folder if you did not write it, or start "
                "a new train.output_dir.") from None
        count += 1
    return count


def make_group_readable(folder: str | Path) -> None:
    """Add group (and, as the umask allows, other) read permission to every file under ``folder``."""
    readable = group_readable_mode() & 0o044  # the group / other read bits the umask allows
    for path in _files(Path(folder)):
        with contextlib.suppress(OSError):
            os.chmod(path, path.stat().st_mode & 0o777 | readable)
