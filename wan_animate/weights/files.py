"""Reading and writing weight files: safetensors through ``safetensors``, pickles only through
``torch.load(weights_only=True)``; every failure is one ``WeightsFileError`` line naming the file,
the problem and the fix.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from wan_animate.weights.diagnose import CheckpointError

# Keys under which training checkpoints nest their weights (one level down).
NESTED_KEYS = ("state_dict", "model", "module", "ema")
_REDOWNLOAD = "the file is probably a truncated or interrupted download; download it again"

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class WeightsFileError(CheckpointError):
    """A weights file that cannot be read: missing, truncated, corrupt, or a pickle that
    ``weights_only=True`` refuses. The message is one line: the path, the problem, the fix."""


@dataclass
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class Shard:
    """One weight file and the names/dtypes/shapes of its tensors (read from the header only)."""

    path: Path
    tensors: dict[str, TensorInfo]  # names as stored in the file
    metadata: dict[str, str] = field(default_factory=dict)


# ---- safetensors


def _safetensors_error(path: Path, err: Exception) -> WeightsFileError:
    text = str(err)
    size = path.stat().st_size if path.exists() else 0
    if "too small" in text:
        return WeightsFileError(f"{path}: {size} bytes, too short to be a safetensors file; {_REDOWNLOAD}.",
                                cause="truncated download")
    if "not fully covered" in text or "incomplete metadata" in text or "header length" in text:
        return WeightsFileError(f"{path}: truncated shard, {size:,} bytes on disk, fewer than its header "
                                f"describes; {_REDOWNLOAD}.", cause="truncated download")
    return WeightsFileError(f"{path}: unreadable safetensors file ({text}); {_REDOWNLOAD}.",
                            cause="corrupt or truncated download")


def read_header(path: str | os.PathLike) -> Shard:
    """Names, dtypes and shapes of a weight file without reading its data (safetensors), or from the
    tensors themselves (pickle, read with ``weights_only=True``). Truncated files are refused."""
    path = Path(path)
    if path.suffix != ".safetensors":
        sd = load_torch_file(path)
        return Shard(path, {k: TensorInfo(v.dtype, tuple(v.shape), v.numel() * v.element_size())
                            for k, v in sd.items()})
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {}
            for name in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                view = f.get_slice(name)
                dtype = _ST_DTYPES.get(view.get_dtype())
                if dtype is None:
                    raise WeightsFileError(f"{path}: tensor {name} has unsupported dtype {view.get_dtype()}.",
                                           cause="unsupported dtype")
                shape = tuple(int(d) for d in view.get_shape())
                tensors[name] = TensorInfo(dtype, shape, dtype.itemsize * int(torch.Size(shape).numel()))
    except WeightsFileError:
        raise
    except Exception as err:  # noqa: BLE001  -- SafetensorError, OSError: all mean a bad file
        raise _safetensors_error(path, err) from err
    return Shard(path, tensors, metadata)


def iter_tensors(shard: Shard, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one file, one at a time (names as stored). On the CPU, safetensors tensors
    stay memory-mapped (copy-on-write) until written or moved."""
    if shard.path.suffix != ".safetensors":  # a pickle, as read_header read it
        yield from ((name, tensor.to(device)) for name, tensor in load_torch_file(shard.path).items())
        return
    try:
        with safe_open(str(shard.path), framework="pt", device=str(device)) as f:
            for name in f.keys():  # noqa: SIM118
                yield name, f.get_tensor(name)
    except Exception as err:  # noqa: BLE001
        raise WeightsFileError(f"{shard.path}: failed while reading tensors ({err}); the file is probably "
                               "corrupted; download it again.", cause="corrupt download") from err


def group_readable_mode() -> int:
    """0o644 minus the process umask (what a plain ``open(..., "w")`` would give)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o644 & ~umask


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a safetensors file atomically (temporary name, then rename) with mode 0o644 minus the
    umask: safetensors' own writer leaves 0600, unreadable by the group that shares the run.
    ``metadata`` values that are not strings are JSON-encoded.

    A model memory-mapped from an older file at ``path`` keeps its data: the rename never touches it.
    """
    import safetensors.torch  # looked up at call time (tests replace save_file to simulate a full disk)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
        safetensors.torch.save_file(data, str(tmp), metadata=meta or None)
        os.chmod(tmp, group_readable_mode())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ---- pickle (torch.load with weights_only=True, nothing else)


def _pickle_problem(path: Path, err: Exception) -> str:
    text = str(err)
    if "Weights only load failed" in text or "weights_only" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"(Unsupported operand \d+)", text)
        detail = f" (it pickles {found.group(1)})" if found else ""
        return (f"refused by torch.load(weights_only=True){detail}: the file pickles objects other than "
                "tensors, which could run code; convert it to safetensors in a trusted environment")
    size = path.stat().st_size
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return (f"cannot be read with torch.load(weights_only=True) ({size:,} bytes; {first}); the download is "
            "truncated or corrupted, or it is not a torch file; download it again")


def load_torch_file(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """A pickled state dict read only through the tensor-only unpickler (``weights_only=True``).

    Weights nested one level down under ``state_dict`` / ``model`` / ``module`` / ``ema`` (training
    checkpoints, the official ``relighting_lora.ckpt``) are unwrapped. Any problem is one
    ``WeightsFileError`` line with the path and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"{path}: no such {what}; check the path.", cause="wrong path")
    try:
        try:
            obj: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as err:  # noqa: BLE001  -- every unpickling failure is reported the same way
        raise WeightsFileError(f"{path}: {_pickle_problem(path, err)}.", cause="unreadable pickle") from None
    if isinstance(obj, Mapping):  # the first nested mapping, if any
        obj = next((obj[key] for key in NESTED_KEYS if isinstance(obj.get(key), Mapping)), obj)
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsFileError(f"{path}: not a state dict of tensors (found {type(obj).__name__}); pass a "
                               f"{what} that holds tensors by name.", cause="not a weights file")
    return dict(obj)
