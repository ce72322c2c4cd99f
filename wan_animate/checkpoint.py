"""Loading, saving and converting Wan-Animate DiT checkpoints.

Three on-disk forms are read, the layout always detected from the tensor names:

* official folder: ``config.json`` (``_class_name: WanAnimateModel``) + ``diffusion_pytorch_model-*.safetensors``
  shards + ``diffusion_pytorch_model.safetensors.index.json`` (``Wan-AI/Wan2.2-Animate-14B``);
* diffusers folder: ``config.json`` of ``WanAnimateTransformer3DModel`` + shards + index, or a pipeline
  folder whose ``transformer/`` subfolder holds that;
* a single ``.safetensors`` file with official names, optionally prefixed ``diffusion_model.`` as
  community files are (config: an explicit ``config=``, else the file's metadata, else "14b").

Loading never holds two copies of the weights: the model's parameters are created on the meta
device (buffers such as the blur kernels are computed for real) and every shard's
tensors are moved straight into the model before the next shard is opened. Every name and shape is
checked from the shard headers first, so a bad checkpoint fails before any weight is read, with one
``CheckpointError`` that lists what is wrong and why it probably is.

CLI::

    python -m wan_animate.checkpoint convert SRC DST --to official|diffusers [--dtype bf16|fp32|keep]
    python -m wan_animate.checkpoint inspect PATH
    python -m wan_animate.checkpoint make-tiny DST --layout diffusers|official [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wan_animate.config import PRESETS, WanAnimateConfig
from wan_animate.keymap import (  # noqa: F401  (public re-exports)
    KeyMapError,
    blur_kernel_keys,
    diffusers_to_official,
    lia_blur_kernel,
    official_to_diffusers,
)

__all__ = [
    "CheckpointError",
    "load_dit",
    "save_dit",
    "convert_checkpoint",
    "official_to_diffusers",
    "diffusers_to_official",
    "inspect_checkpoint",
]

WEIGHTS_NAME = "diffusion_pytorch_model"
CONFIG_METADATA_KEY = "config"
BLUR_DTYPE_METADATA_KEY = "wan_animate_blur_kernel_dtype"
# Prefixes stripped on load: community files ("diffusion_model."), DDP and torch.compile wrappers.
COMMUNITY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "module.", "_orig_mod.")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_SHOW = 5  # how many names of each problem an error message lists
_QUANT_SUFFIXES = ("scale_weight", "weight_scale", "scale_input", "input_scale", ".comfy_quant")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as the requested Wan-Animate DiT.

    ``missing``, ``unexpected`` and ``mismatched`` hold the full lists (official names);
    ``cause`` is the one-line diagnosis also printed in the message.
    """

    def __init__(
        self,
        message: str,
        *,
        cause: str = "",
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[tuple[str, tuple, tuple]] | None = None,
    ):
        super().__init__(message)
        self.cause = cause
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])
        self.mismatched = list(mismatched or [])


# ================================================================================================
# Reading files: safetensors headers (validated) and pickle (weights_only)
# ================================================================================================

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)


@dataclass
class _TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class _Shard:
    path: Path
    tensors: dict[str, _TensorInfo]  # names as stored in the file
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def is_pickle(self) -> bool:
        return self.path.suffix in PICKLE_SUFFIXES


def _read_safetensors_header(path: Path) -> tuple[dict[str, _TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header without reading the data (truncation check)."""
    size = path.stat().st_size
    advice = "the file is probably a truncated or interrupted download; download it again"
    if size < 8:
        raise CheckpointError(f"{path}: {size} bytes, too short to be a safetensors file; {advice}.",
                              cause="truncated download")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: header claims {header_len} bytes but the file has only {size}; {advice}.",
                cause="truncated download")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors header ({err}); {advice}.",
                              cause="corrupt or truncated download") from err
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, _TensorInfo] = {}
    data_end = 0
    for name, info in header.items():
        try:
            begin, end = (int(o) for o in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            dtype_name = info["dtype"]
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: malformed header entry for {name!r} ({err}); {advice}.",
                                  cause="corrupt download") from err
        data_end = max(data_end, end)
        dtype = _ST_DTYPES.get(dtype_name)
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype_name}.",
                                  cause="unsupported dtype")
        tensors[name] = _TensorInfo(dtype, shape, end - begin)
    expected = 8 + header_len + data_end
    if size < expected:
        raise CheckpointError(
            f"{path}: truncated shard, {size:,} bytes on disk but its header describes {expected:,} "
            f"({expected - size:,} missing); {advice}.", cause="truncated download")
    return tensors, metadata


def _unwrap_pickled_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    # training checkpoints often nest the weights one level down
    for key in ("state_dict", "model", "module", "ema"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors (found {type(obj).__name__}).",
                              cause="not a weights file")
    return dict(obj)


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, read only through the tensor-only unpickler."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as err:  # noqa: BLE001  -- any unpickling failure is reported the same way
        raise CheckpointError(
            f"{path}: cannot be read with torch.load(weights_only=True): {err}. Either the download is "
            "truncated/corrupted or the file pickles arbitrary objects (refused for safety; convert it "
            "to safetensors in a trusted environment).", cause="unreadable pickle") from err
    return _unwrap_pickled_state_dict(obj, path)


def _read_shard_header(path: Path) -> _Shard:
    if path.suffix == ".safetensors":
        tensors, metadata = _read_safetensors_header(path)
        return _Shard(path, tensors, metadata)
    sd = _load_pickle(path)
    infos = {k: _TensorInfo(v.dtype, tuple(v.shape), v.numel() * v.element_size()) for k, v in sd.items()}
    return _Shard(path, infos)


def _read_shard(shard: _Shard, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the tensors of one shard, one at a time (names as stored)."""
    if shard.is_pickle:
        for name, tensor in _load_pickle(shard.path).items():
            yield name, tensor.to(device)
        return
    from safetensors import safe_open

    dev = "cpu" if device.type == "cpu" else str(device)
    try:
        with safe_open(str(shard.path), framework="pt", device=dev) as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                yield name, f.get_tensor(name)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{shard.path}: failed while reading tensors ({err}); the file is probably "
                              "corrupted; download it again.", cause="corrupt download") from err


# ================================================================================================
# Finding the shards, the config and the layout
# ================================================================================================


@dataclass
class _Source:
    root: Path                     # the file or the folder holding the weights
    shards: list[_Shard]
    folder_config: str | None      # text of the folder's config.json
    prefix: str = ""               # community prefix stripped from every name
    layout: str = ""               # "official" | "diffusers"

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for s in self.shards for t in s.tensors.values())


_SHARD_OF = re.compile(r"-(\d+)-of-(\d+)\.(safetensors|bin)$")


def _find_weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder: from the index if there is one, else by name."""
    indexes = [folder / f"{WEIGHTS_NAME}.safetensors.index.json", folder / f"{WEIGHTS_NAME}.bin.index.json"]
    indexes = [p for p in indexes if p.is_file()] or (
        sorted(folder.glob("*.safetensors.index.json")) + sorted(folder.glob("*.bin.index.json")))
    if indexes:
        index_path = indexes[0]
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index_path}: not a valid shard index ({err}); download it again.",
                                  cause="corrupt index") from err
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{folder}: the index {index_path.name} names {len(names)} shard(s) but {len(missing)} "
                f"are missing: {', '.join(missing[:_SHOW])}. The download is incomplete; fetch the "
                "missing files.", cause="missing shard (incomplete download)")
        return [folder / n for n in names]
    for pattern in (f"{WEIGHTS_NAME}*.safetensors", "*.safetensors", f"{WEIGHTS_NAME}*.bin", "*.bin"):
        files = sorted(folder.glob(pattern))
        if files:
            break
    else:
        raise CheckpointError(f"{folder}: no weight files (*.safetensors / *.bin) found.",
                              cause="not a model folder")
    counts = {int(m.group(2)) for f in files if (m := _SHARD_OF.search(f.name))}
    if counts:
        total = max(counts)
        present = {int(m.group(1)) for f in files if (m := _SHARD_OF.search(f.name))}
        lost = sorted(set(range(1, total + 1)) - present)
        if lost:
            raise CheckpointError(f"{folder}: shards {lost} of {total} are missing (and no index file); "
                                  "the download is incomplete.", cause="missing shard (incomplete download)")
    if len(files) > 1 and not counts:
        raise CheckpointError(f"{folder}: several weight files and no index: "
                              f"{', '.join(f.name for f in files[:_SHOW])}; say which one to load.",
                              cause="ambiguous folder")
    return files


def _resolve(path: str | os.PathLike) -> _Source:
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"{root} does not exist.", cause="wrong path")
    folder_config = None
    if root.is_dir():
        if (root / "transformer" / "config.json").is_file() and (
            (root / "model_index.json").is_file() or not any(root.glob("*.safetensors"))):
            root = root / "transformer"  # a diffusers pipeline folder
        if (root / "config.json").is_file():
            folder_config = (root / "config.json").read_text()  # parsed only if config= is not given
        files = _find_weight_files(root)
    else:
        files = [root]
    shards = [_read_shard_header(f) for f in files]
    return _Source(root, shards, folder_config)


_OFFICIAL_MARKERS = re.compile(r"(^|\.)(self_attn|cross_attn|time_embedding|text_embedding|img_emb|"
                               r"fuser_blocks|net_app)\.|^head\.head\.")
_DIFFUSERS_MARKERS = re.compile(r"(^|\.)(attn1|attn2|condition_embedder|res_blocks|motion_network)\.|"
                                r"^proj_out\.|^face_adapter\.\d+\.")


def _detect_layout(names: list[str]) -> tuple[str, str]:
    """(prefix, layout) from the stored names; layout "" when neither layout is recognised."""
    prefix = ""
    for p in COMMUNITY_PREFIXES:
        if names and sum(n.startswith(p) for n in names) * 2 > len(names):
            prefix = p
            break
    stripped = [n[len(prefix):] if n.startswith(prefix) else n for n in names]
    official = sum(bool(_OFFICIAL_MARKERS.search(n)) for n in stripped)
    diffusers = sum(bool(_DIFFUSERS_MARKERS.search(n)) for n in stripped)
    if official == diffusers == 0:
        return prefix, ""
    return prefix, ("official" if official >= diffusers else "diffusers")


def _config_from_dict(cfg: Mapping[str, Any]) -> WanAnimateConfig:
    cls_name = cfg.get("_class_name", "")
    if cls_name == "WanAnimateTransformer3DModel" or "num_attention_heads" in cfg:
        return WanAnimateConfig.from_diffusers_config(dict(cfg))
    if cls_name in ("WanAnimateModel", "") or "dim" in cfg:
        return WanAnimateConfig.from_official_config(dict(cfg))
    raise CheckpointError(f"config.json has _class_name={cls_name!r}, not a Wan-Animate DiT "
                          "(WanAnimateModel or WanAnimateTransformer3DModel).", cause="wrong model")


def _resolve_config(src: _Source, config: WanAnimateConfig | None) -> tuple[WanAnimateConfig, str]:
    """(config, where it came from)."""
    if config is not None:
        return config, "the config= argument"
    if src.folder_config is not None:
        where, raw = f"{src.root / 'config.json'}", src.folder_config
    elif src.shards[0].metadata.get(CONFIG_METADATA_KEY):
        where, raw = f"the metadata of {src.shards[0].path.name}", src.shards[0].metadata[CONFIG_METADATA_KEY]
    else:
        return WanAnimateConfig.preset("14b"), "the default '14b' preset (no config.json, no file metadata)"
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{where} is not valid JSON ({err}); download it again or pass config=.",
                              cause="corrupt config") from err
    try:
        return _config_from_dict(parsed), where
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{where}: invalid Wan-Animate config ({err}); fix it or pass config=.",
                              cause="invalid config") from err
    return WanAnimateConfig.preset("14b"), "the default '14b' preset (no config.json, no file metadata)"


# ================================================================================================
# Checking names and shapes before reading any weight
# ================================================================================================


def _virtual_official(src: _Source, config: WanAnimateConfig) -> dict[str, torch.Tensor]:
    """Official-named meta tensors describing the checkpoint (from the headers only).

    Names no rule can map are kept as stored, so the key check reports them as unexpected.
    """
    virtual = {}
    for shard in src.shards:
        for name, info in shard.tensors.items():
            if src.prefix and name.startswith(src.prefix):
                name = name[len(src.prefix):]
            virtual[name] = torch.empty(info.shape, dtype=info.dtype, device="meta")
    if src.layout == "diffusers":
        return diffusers_to_official(virtual, config, strict=False, add_blur_kernels=False)
    return virtual


def _infer_sizes(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """A few config sizes read off the checkpoint's shapes (official names), for diagnosis."""
    sizes: dict[str, int] = {}
    if "patch_embedding.weight" in sd:
        sizes["dim"] = sd["patch_embedding.weight"].shape[0]
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks:
        sizes["num_layers"] = max(blocks) + 1
    if "blocks.0.ffn.0.weight" in sd:
        sizes["ffn_dim"] = sd["blocks.0.ffn.0.weight"].shape[0]
    if "face_adapter.fuser_blocks.0.q_norm.weight" in sd and "dim" in sizes:
        sizes["num_heads"] = sizes["dim"] // sd["face_adapter.fuser_blocks.0.q_norm.weight"].shape[0]
    res = {int(m.group(1)) for k in sd if (m := re.match(r"motion_encoder\.enc\.net_app\.convs\.(\d+)\.conv1", k))}
    # residual blocks beyond the config's count keep their diffusers names (0-based)
    res |= {int(m.group(1)) + 1 for k in sd if (m := re.match(r"motion_encoder\.res_blocks\.(\d+)\.conv1", k))}
    if res:
        sizes["motion_encoder_size"] = 2 ** (max(res) + 2)
    return sizes


def _suggest(sizes: Mapping[str, int], config: WanAnimateConfig) -> str:
    diffs = [f"{k}={v} (config: {getattr(config, k)})" for k, v in sizes.items() if getattr(config, k) != v]
    matching = [name for name, p in PRESETS.items() if all(getattr(p, k) == v for k, v in sizes.items())]
    hint = f"checkpoint has {', '.join(diffs)}" if diffs else "sub-module sizes differ from the config"
    if matching:
        hint += f"; it looks like preset {matching[0]!r}: pass config=WanAnimateConfig.preset({matching[0]!r})"
    else:
        hint += "; pass the config the checkpoint was saved with (or load its folder with config.json)"
    return hint


def _index_pattern(name: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.)", "N", name)


def _extra_prefix(unexpected: list[str], missing: set[str]) -> str:
    """A leading name component that, removed, turns most unexpected keys into missing ones."""
    counts: dict[str, int] = {}
    for key in unexpected:
        head, _, rest = key.partition(".")
        if rest in missing:
            counts[head + "."] = counts.get(head + ".", 0) + 1
    best = max(counts, key=counts.get, default="")
    return best if best and counts[best] * 2 > len(missing) else ""


def _check_against_model(
    ckpt: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    config: WanAnimateConfig,
    *,
    where: str,
    layout: str,
    config_source: str,
    optional: set[str],
    src: _Source | None = None,
) -> None:
    missing = sorted(k for k in expected if k not in ckpt and k not in optional)
    unexpected = sorted(k for k in ckpt if k not in expected)
    mismatched = [(k, tuple(ckpt[k].shape), tuple(expected[k].shape))
                  for k in expected if k in ckpt and ckpt[k].shape != expected[k].shape]
    if not (missing or unexpected or mismatched):
        return
    # Wan-Animate names with other block/layer numbers still count as ours (a wrong preset, not a
    # foreign model): compare names with every index replaced by N.
    patterns = {_index_pattern(k) for k in expected}
    known = sum(_index_pattern(k) in patterns for k in ckpt)
    lora = any(".lora_A" in k or ".lora_down" in k for k in ckpt)
    quantised = src is not None and any(
        info.dtype.itemsize == 1 and info.dtype.is_floating_point or name.endswith(_QUANT_SUFFIXES)
        for shard in src.shards for name, info in shard.tensors.items())
    # unexpected names that are diffusers spellings of expected ones: a mixed file (in a diffusers
    # layout file official names are already accepted as they are)
    renamed = 0
    if layout == "official" and unexpected:
        as_official = diffusers_to_official({k: ckpt[k] for k in unexpected}, config, strict=False,
                                            add_blur_kernels=False)
        renamed = len(set(as_official) & set(missing))
    prefixed = _extra_prefix(unexpected, set(missing))
    if lora:
        cause = ("this is a LoRA file, not a full DiT: load the base model with load_dit and apply the LoRA "
                 "with wan_animate.lora")
    elif quantised:
        cause = ("a quantised (fp8/scaled) checkpoint: its scale tensors and fp8 weights are not the model's; "
                 "use a bf16/fp16/fp32 export of the DiT")
    elif prefixed:
        cause = (f"the names carry an extra prefix {prefixed!r} (e.g. from a training wrapper); strip it from "
                 "every key")
    elif renamed:
        cause = (f"mixed layouts: {renamed} missing tensors are present under their diffusers names in a "
                 "checkpoint that is otherwise official; the files come from two different exports, keep one "
                 "(or convert it)")
    elif known * 2 < len(ckpt) or not layout:
        cause = ("foreign keys: these tensors do not belong to a Wan-Animate DiT (another model, e.g. a VAE or "
                 "text encoder, or a different architecture)")
    elif mismatched or (unexpected and missing):
        cause = f"wrong preset/config (config from {config_source}): " + _suggest(_infer_sizes(ckpt), config)
    elif missing:
        cause = (f"incomplete checkpoint: {len(missing)} of {len(expected)} tensors are absent (a partial "
                 "download, a file saved from part of the model, or the wrong layout)")
    else:
        cause = (f"the checkpoint has {len(unexpected)} tensors the model lacks: wrong preset/config (config from "
                 f"{config_source}), e.g. fewer layers than the file: " + _suggest(_infer_sizes(ckpt), config))

    def listing(items: list[str]) -> str:
        return ", ".join(items[:_SHOW]) + (f", ... (+{len(items) - _SHOW} more)" if len(items) > _SHOW else "")

    lines = [f"Cannot load {where} as a Wan-Animate DiT ({layout or 'unrecognised'} layout, "
             f"config from {config_source}):"]
    if missing:
        lines.append(f"  missing keys ({len(missing)} of {len(expected)}): {listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)} of {len(ckpt)}): {listing(unexpected)}")
    if mismatched:
        shown = [f"{k}: checkpoint {a} vs model {b}" for k, a, b in mismatched]
        lines.append(f"  shape mismatches ({len(mismatched)}): {listing(shown)}")
    lines.append(f"Likely cause: {cause}.")
    raise CheckpointError("\n".join(lines), cause=cause, missing=missing, unexpected=unexpected,
                          mismatched=mismatched)


def _inspect(src: _Source, config: WanAnimateConfig | None) -> tuple[WanAnimateConfig, str]:
    names = [n for s in src.shards for n in s.tensors]
    src.prefix, src.layout = _detect_layout(names)
    return _resolve_config(src, config)


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Layout, config source, tensor count and bytes of a checkpoint, from its headers only."""
    src = _resolve(path)
    config, config_source = _inspect(src, None)
    return {
        "path": str(src.root), "layout": src.layout or "unrecognised", "prefix": src.prefix,
        "config": config, "config_source": config_source, "num_shards": len(src.shards),
        "num_tensors": sum(len(s.tensors) for s in src.shards), "total_bytes": src.total_bytes,
    }


# ================================================================================================
# load_dit
# ================================================================================================


def _model_module():
    import wan_animate.model as model_module

    return model_module


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block is moved to the meta device as it is created.

    Buffers (blur kernels, tables) are left alone, so they hold their real computed values. Each
    parameter exists for real only for an instant (one tensor at a time), and initialisers that run
    after registration act on meta tensors, i.e. cost nothing. Not thread-safe (patches nn.Module).
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    # Initialising a meta tensor is meaningless, and some initialisers (normal_) route meta tensors
    # through torch's Python reference kernels, which import torch._dynamo (~3 s). Skip them.
    initialisers = {n: f for n, f in vars(nn.init).items() if n.endswith("_") and not n.startswith("_")
                    and callable(f)}

    def skip_meta(init):
        def wrapped(tensor, *args, **kwargs):
            return tensor if tensor.is_meta else init(tensor, *args, **kwargs)
        return wrapped

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    for n, f in initialisers.items():
        setattr(nn.init, n, skip_meta(f))
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]
        for n, f in initialisers.items():
            setattr(nn.init, n, f)


def _build_skeleton(config: WanAnimateConfig) -> nn.Module:
    """The DiT with parameters on meta and real (computed) buffers such as blur kernels."""
    with _parameters_on_meta():
        return _model_module().WanAnimateDiT(config)


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` itself (no copy) into the model under an official name."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else True)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:  # pre-checked; reaching this is a bug in the key maps
        raise CheckpointError(f"internal error: model has no tensor {name}", cause="bug")


def _stream_official(
    src: _Source, config: WanAnimateConfig, device: torch.device
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Per shard: (shard index, official-named tensors of that shard).

    For the diffusers layout a face-adapter ``to_k``/``to_v`` pair split across two shards is held
    until its partner arrives (two small matrices, never a whole shard).
    """
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    kv = re.compile(r"^face_adapter\.(\d+)\.to_(k|v)\.(weight|bias)$")
    for i, shard in enumerate(src.shards):
        batch: dict[str, torch.Tensor] = {}
        for name, tensor in _read_shard(shard, device):
            if src.prefix and name.startswith(src.prefix):
                name = name[len(src.prefix):]
            m = kv.match(name) if src.layout == "diffusers" else None
            if m:
                parts = pending.setdefault((m.group(1), m.group(3)), {})
                parts[name] = tensor
                if len(parts) == 2:
                    batch.update(pending.pop((m.group(1), m.group(3))))
                continue
            batch[name] = tensor
        if src.layout == "diffusers":
            batch = diffusers_to_official(batch, config, strict=True, add_blur_kernels=False)
        yield i, batch
    if pending:  # pre-check guarantees pairs are complete; keep the invariant explicit
        raise CheckpointError(f"unpaired face-adapter projections {sorted(pending)}", cause="incomplete checkpoint")


def load_dit(
    path: str | os.PathLike,
    dtype: torch.dtype | None = torch.bfloat16,
    device: torch.device | str = "cpu",
    config: WanAnimateConfig | None = None,
    *,
    progress: bool | None = None,
) -> nn.Module:
    """Load a ``WanAnimateDiT`` from an official folder, a diffusers folder or a single file.

    ``dtype=None`` keeps the dtypes stored in the file; otherwise every tensor is cast as it is
    filled in, by the rule of ``set_precision(model, dtype)`` (the fp32-by-design tables stay
    fp32), so a fp32 file never sits whole in memory before a bf16 cast. On the CPU, tensors that
    need no cast stay memory-mapped from the file (copy-on-write) until written or moved.
    ``progress=None`` shows a bar for checkpoints over 1 GB. The model is returned in eval mode.
    """
    device = torch.device(device)
    src = _resolve(path)
    config, config_source = _inspect(src, config)
    model = _build_skeleton(config)
    expected = model.state_dict(keep_vars=True)
    ckpt = _virtual_official(src, config)
    _check_against_model(ckpt, expected, config, where=str(path), layout=src.layout,
                         config_source=config_source, optional=set(blur_kernel_keys(config)), src=src)

    model_module = _model_module()

    def target_dtype(name: str) -> torch.dtype | None:
        if dtype is None:
            return None
        return torch.float32 if model_module.is_fp32_by_design(name) else dtype

    show = src.total_bytes > 1e9 if progress is None else progress
    bar = _progress(show, total=src.total_bytes, desc=f"load {Path(path).name}")
    for _, batch in _stream_official(src, config, device):
        for name, tensor in batch.items():
            bar.update(tensor.numel() * tensor.element_size())
            want = target_dtype(name)
            if want is not None and tensor.is_floating_point() and tensor.dtype != want:
                tensor = tensor.to(want)
            _set_tensor(model, name, tensor)
        del batch
    bar.close()

    # buffers the file lacks (blur kernels of a diffusers file) were computed by the skeleton;
    # move them to the device. Anything still on meta is a bug: never hand out a half model.
    for name, buf in list(model.named_buffers()):
        if buf.device != device and buf.device.type != "meta":
            _set_tensor(model, name, buf.to(device))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"{path}: {len(left)} tensors were never filled: {', '.join(left[:_SHOW])}",
                              cause="incomplete checkpoint", missing=left)
    if dtype is not None:
        model_module.set_precision(model, dtype)  # buffers computed by the skeleton
    return model.eval()


# ================================================================================================
# save_dit and the streaming converter
# ================================================================================================


def parse_size(size: int | str) -> int:
    """Bytes from 5GB / 500MB / 10KiB / 1234 (decimal units like the HF hub; *iB binary)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size={size!r}: use a byte count or a size like '5GB', '500MB', '2GiB'.")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base**power)


def _diffusers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:
        return "0.35.0"


def _config_json(config: WanAnimateConfig, layout: str) -> dict[str, Any]:
    if layout == "official":
        return config.to_official_config()
    cfg = config.to_diffusers_config()
    cfg["_diffusers_version"] = _diffusers_version()
    return cfg


class _ShardWriter:
    """Writes tensors into ``diffusion_pytorch_model-XXXXX-of-YYYYY.safetensors`` shards + index."""

    def __init__(self, dst: Path, max_bytes: int, metadata: dict[str, str], single_file: bool,
                 config_json: dict[str, Any]):
        self.dst, self.max_bytes, self.metadata, self.single_file = dst, max_bytes, metadata, single_file
        self.config_json = config_json
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and not self.single_file and self.buffer_bytes + nbytes > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor.detach().to("cpu").contiguous()
        self.buffer_bytes += nbytes
        self.total += nbytes

    def flush(self) -> None:
        if not self.buffer:
            return
        from safetensors.torch import save_file

        # Always write a temporary file and rename it into place: a model loaded from the old file
        # may still be memory-mapped onto it (safetensors loads lazily), and a rename leaves the
        # old data intact for it where overwriting in place would change or truncate it.
        if self.single_file:
            path = self.dst.with_name(f".{self.dst.name}.tmp")
        else:
            path = self.dst / f".{WEIGHTS_NAME}-part{len(self.written):05d}.tmp"
        save_file(self.buffer, str(path), metadata=self.metadata)
        self.written.append((path, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def abort(self) -> None:
        """Remove the temporary files of a write that failed."""
        for tmp, _ in self.written:
            tmp.unlink(missing_ok=True)
        self.written, self.buffer = [], {}

    def finish(self) -> list[Path]:
        self.flush()
        if self.single_file:
            self.written[0][0].replace(self.dst)
            return [self.dst]
        n = len(self.written)
        final: list[Path] = []
        weight_map: dict[str, str] = {}
        for i, (tmp, names) in enumerate(self.written):
            name = f"{WEIGHTS_NAME}.safetensors" if n == 1 else f"{WEIGHTS_NAME}-{i + 1:05d}-of-{n:05d}.safetensors"
            tmp.replace(self.dst / name)
            final.append(self.dst / name)
            weight_map.update({k: name for k in names})
        keep = {p.name for p in final}
        for stale in list(self.dst.glob(f"{WEIGHTS_NAME}*.safetensors")):
            if stale.name not in keep:  # shards of an earlier save into the same folder
                stale.unlink()
        index = self.dst / f"{WEIGHTS_NAME}.safetensors.index.json"
        if n > 1:
            index.write_text(json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map},
                                        indent=2, sort_keys=True) + "\n")
        elif index.exists():
            index.unlink()
        # written last: a folder whose conversion failed half-way never looks like a model
        (self.dst / "config.json").write_text(json.dumps(self.config_json, indent=2) + "\n")
        return final


def _open_writer(path: Path, config: WanAnimateConfig, layout: str, max_shard_size: int | str,
                 metadata: Mapping[str, str] | None, extra_meta: Mapping[str, str]) -> _ShardWriter:
    if layout not in ("official", "diffusers"):
        raise ValueError(f"layout={layout!r}: choose 'official' or 'diffusers'.")
    single = path.suffix == ".safetensors"
    cfg = _config_json(config, layout)
    user = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in dict(metadata or {}).items()}
    meta = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(cfg), **extra_meta, **user}
    if single:
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        path.mkdir(parents=True, exist_ok=True)
    return _ShardWriter(path, parse_size(max_shard_size), meta, single, cfg)


def save_dit(
    model: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    layout: str = "official",
    max_shard_size: int | str = "5GB",
    metadata: Mapping[str, Any] | None = None,
    *,
    config: WanAnimateConfig | None = None,
) -> list[Path]:
    """Save the DiT as safetensors shards + index + config.json (or one file if ``path`` ends in
    ``.safetensors``). ``layout="diffusers"`` writes a folder diffusers'
    ``WanAnimateTransformer3DModel.from_pretrained`` loads. Returns the written weight files.

    ``model`` is a ``WanAnimateDiT`` (possibly wrapped by torch.compile/DDP), any object with
    ``state_dict()`` and ``config``, or an official-named state dict with ``config=``. The names and
    shapes are checked against the architecture of ``config`` before anything is written.
    """
    path = Path(path)
    if isinstance(model, Mapping):
        state = dict(model)
    else:
        model = _unwrap(model)
        config = config or getattr(model, "config", None)
        state = model.state_dict()
    if not isinstance(config, WanAnimateConfig):
        raise ValueError("save_dit needs the model's WanAnimateConfig (model.config or config=).")
    sd = {k: v.detach() for k, v in state.items()}
    adapters = [k for k in sd if ".lora_" in k or ".base_layer." in k]
    if adapters:
        raise ValueError(
            f"the model carries LoRA layers ({adapters[0]}, ...): save the adapter with wan_animate.lora, "
            "or merge it into the base weights first, then save_dit the plain DiT.")
    meta_sd = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()}
    _check_against_model(meta_sd, _expected_official(config), config, where="the state dict given to save_dit",
                         layout=_detect_layout(list(sd))[1], config_source="the model",
                         optional=set(blur_kernel_keys(config)))
    extra: dict[str, str] = {}
    if layout == "diffusers":
        kernels = [sd[k] for k in blur_kernel_keys(config) if k in sd]
        if kernels:
            extra[BLUR_DTYPE_METADATA_KEY] = str(kernels[0].dtype).removeprefix("torch.")
        sd = official_to_diffusers(sd, config)
    writer = _open_writer(path, config, layout, max_shard_size, metadata, extra)
    try:
        for name, tensor in sd.items():
            writer.add(name, tensor)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain DiT inside torch.compile / DDP / FSDP-style wrappers (their names carry prefixes)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


_FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16, "keep": None}


def convert_checkpoint(
    src_path: str | os.PathLike,
    dst_path: str | os.PathLike,
    to: str,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    config: WanAnimateConfig | None = None,
    progress: bool = True,
) -> list[Path]:
    """Stream a checkpoint into the other (or the same) layout, shard by shard, never building the
    model's weights: peak memory is about one input shard plus one output shard."""
    if to not in ("official", "diffusers"):
        raise ValueError(f"to={to!r}: choose 'official' or 'diffusers'.")
    src = _resolve(src_path)
    config, config_source = _inspect(src, config)
    expected = _expected_official(config)
    ckpt = _virtual_official(src, config)
    _check_against_model(ckpt, expected, config, where=str(src_path), layout=src.layout,
                         config_source=config_source, optional=set(blur_kernel_keys(config)), src=src)
    stored_blur = src.shards[0].metadata.get(BLUR_DTYPE_METADATA_KEY)
    blur_dtype = dtype or _FLOAT_DTYPES.get(stored_blur or "")
    extra: dict[str, str] = {}
    if to == "diffusers":
        kernels = [ckpt[k] for k in blur_kernel_keys(config) if k in ckpt]
        if kernels or blur_dtype is not None:
            kdtype = dtype or (kernels[0].dtype if kernels else blur_dtype)
            extra[BLUR_DTYPE_METADATA_KEY] = str(kdtype).removeprefix("torch.")
    writer = _open_writer(Path(dst_path), config, to, max_shard_size, None, extra)
    try:
        bar = _progress(progress, total=src.total_bytes, desc=f"convert -> {to}")
        have_blur = False
        for _, batch in _stream_official(src, config, torch.device("cpu")):
            read = sum(t.numel() * t.element_size() for t in batch.values())
            if dtype is not None:
                batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
            have_blur = have_blur or any(k.endswith(".kernel") for k in batch)
            if to == "diffusers":
                batch = official_to_diffusers(batch, config)
            for name, tensor in batch.items():
                writer.add(name, tensor)
            bar.update(read)
        if to == "official" and not have_blur:
            # the kernels come last; their dtype follows the conv weights unless recorded in metadata
            sibling = ckpt.get("motion_encoder.enc.net_app.convs.1.conv2.1.weight")
            kdtype = blur_dtype or (dtype or (sibling.dtype if sibling is not None else torch.float32))
            for name in blur_kernel_keys(config):
                writer.add(name, lia_blur_kernel(kdtype))
        bar.close()
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def _expected_official(config: WanAnimateConfig) -> dict[str, torch.Tensor]:
    """Official names and shapes of the model for ``config``, as meta tensors."""
    return {k: v.to("meta") if v.device.type != "meta" else v
            for k, v in _build_skeleton(config).state_dict(keep_vars=True).items()}


def _progress(enabled: bool, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled)


# ================================================================================================
# CLI
# ================================================================================================


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wan_animate.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a DiT checkpoint between the official and diffusers layouts")
    conv.add_argument("src", help="official/diffusers folder, pipeline folder or single .safetensors file")
    conv.add_argument("dst", help="output folder (or a .safetensors file for one file)")
    conv.add_argument("--to", required=True, choices=["official", "diffusers"])
    conv.add_argument("--dtype", default="keep", choices=sorted(_DTYPES))
    conv.add_argument("--max-shard-size", default="5GB")
    conv.add_argument("--preset", default=None, choices=sorted(PRESETS),
                      help="config for a single file without config metadata (default: from the files, else 14b)")
    info = sub.add_parser("inspect", help="print layout, config and size of a checkpoint (headers only)")
    info.add_argument("path")
    tiny = sub.add_parser("make-tiny", help="write a complete tiny random model folder (for tests and demos)")
    tiny.add_argument("dst")
    tiny.add_argument("--layout", default="diffusers", choices=["diffusers", "official"])
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        if args.command == "convert":
            config = WanAnimateConfig.preset(args.preset) if args.preset else None
            files = convert_checkpoint(args.src, args.dst, args.to, dtype=_DTYPES[args.dtype],
                                       max_shard_size=args.max_shard_size, config=config)
            print(f"wrote {len(files)} file(s) to {args.dst} ({args.to} layout)")
        elif args.command == "inspect":
            found = inspect_checkpoint(args.path)
            config = found.pop("config")
            for key, value in found.items():
                print(f"{key}: {value}")
            print("config:", json.dumps(config.to_dict()))
        else:
            from wan_animate.tiny import make_tiny_model_folder

            make_tiny_model_folder(args.dst, layout=args.layout, seed=args.seed)
            print(f"wrote a tiny {args.layout} model folder to {args.dst}")
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
