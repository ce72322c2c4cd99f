"""What a checkpoint path holds, from headers only: its weight files, config, layout and prefix.

Three on-disk forms are read, the layout always detected from the tensor names, never the file names:

* official folder: ``config.json`` (``_class_name: WanAnimateModel``) + ``diffusion_pytorch_model-*.safetensors``
  shards + ``diffusion_pytorch_model.safetensors.index.json`` (``Wan-AI/Wan2.2-Animate-14B``);
* diffusers folder: ``config.json`` of ``WanAnimateTransformer3DModel`` + shards + index, or a pipeline
  folder whose ``transformer/`` subfolder holds that;
* a single ``.safetensors`` (or ``.pt/.pth/.bin/.ckpt``) file with official names, optionally prefixed
  ``diffusion_model.`` as community files are (config: an explicit ``config=``, else the file's
  metadata, else "14b").
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wan_animate.config import WanAnimateConfig
from wan_animate.weights.diagnose import SHOW, CheckpointError
from wan_animate.weights.files import Shard, iter_tensors, read_header
from wan_animate.weights.keymap import KV_DIFFUSERS_RE, diffusers_to_official

WEIGHTS_NAME = "diffusion_pytorch_model"
CONFIG_METADATA_KEY = "config"
BLUR_DTYPE_METADATA_KEY = "wan_animate_blur_kernel_dtype"
# Prefixes stripped on load: community files ("diffusion_model."), DDP and torch.compile wrappers.
COMMUNITY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "module.", "_orig_mod.")


@dataclass
class Source:
    root: Path                     # the file or the folder holding the weights
    shards: list[Shard]
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
                f"are missing: {', '.join(missing[:SHOW])}. The download is incomplete; fetch the "
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
                              f"{', '.join(f.name for f in files[:SHOW])}; say which one to load.",
                              cause="ambiguous folder")
    return files


def open_source(path: str | os.PathLike) -> Source:
    """The weight files of a folder/pipeline folder/file, every header read and validated."""
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
    shards = [read_header(f) for f in files]
    return Source(root, shards, folder_config)


_OFFICIAL_MARKERS = re.compile(r"(^|\.)(self_attn|cross_attn|time_embedding|text_embedding|img_emb|"
                               r"fuser_blocks|net_app)\.|^head\.head\.")
_DIFFUSERS_MARKERS = re.compile(r"(^|\.)(attn1|attn2|condition_embedder|res_blocks|motion_network)\.|"
                                r"^proj_out\.|^face_adapter\.\d+\.")


def detect_layout(names: list[str]) -> tuple[str, str]:
    """(prefix, layout) from the stored names; layout "" when neither layout is recognised."""
    prefix = next((p for p in COMMUNITY_PREFIXES if names and sum(n.startswith(p) for n in names) * 2 > len(names)), "")
    stripped = [n.removeprefix(prefix) for n in names]
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


def _resolve_config(src: Source, config: WanAnimateConfig | None) -> tuple[WanAnimateConfig, str]:
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


def virtual_official(src: Source, config: WanAnimateConfig) -> dict[str, torch.Tensor]:
    """Official-named meta tensors describing the checkpoint (from the headers only).

    Names no rule can map are kept as stored, so the key check reports them as unexpected.
    """
    virtual = {name.removeprefix(src.prefix): torch.empty(info.shape, dtype=info.dtype, device="meta")
               for shard in src.shards for name, info in shard.tensors.items()}
    if src.layout == "diffusers":
        return diffusers_to_official(virtual, config, strict=False, add_blur_kernels=False)
    return virtual


def identify(src: Source, config: WanAnimateConfig | None) -> tuple[WanAnimateConfig, str]:
    """Set ``src.prefix`` / ``src.layout`` from the names; return (config, where it came from)."""
    names = [n for s in src.shards for n in s.tensors]
    src.prefix, src.layout = detect_layout(names)
    return _resolve_config(src, config)


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Layout, config source, tensor count and bytes of a checkpoint, from its headers only."""
    src = open_source(path)
    config, config_source = identify(src, None)
    return {
        "path": str(src.root), "layout": src.layout or "unrecognised", "prefix": src.prefix,
        "config": config, "config_source": config_source, "num_shards": len(src.shards),
        "num_tensors": sum(len(s.tensors) for s in src.shards), "total_bytes": src.total_bytes,
    }


def stream_official(
    src: Source, config: WanAnimateConfig, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """Per shard, the official-named tensors of that shard.

    For the diffusers layout a face-adapter ``to_k``/``to_v`` pair split across two shards is held
    until its partner arrives (two small matrices, never a whole shard).
    """
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for shard in src.shards:
        batch: dict[str, torch.Tensor] = {}
        for name, tensor in iter_tensors(shard, device):
            name = name.removeprefix(src.prefix)
            m = KV_DIFFUSERS_RE.match(name) if src.layout == "diffusers" else None
            if m:
                parts = pending.setdefault((m.group(1), m.group(3)), {})
                parts[name] = tensor
                if len(parts) == 2:
                    batch.update(pending.pop((m.group(1), m.group(3))))
                continue
            batch[name] = tensor
        if src.layout == "diffusers":
            batch = diffusers_to_official(batch, config, strict=True, add_blur_kernels=False)
        yield batch
    if pending:  # pre-check guarantees pairs are complete; keep the invariant explicit
        raise CheckpointError(f"unpaired face-adapter projections {sorted(pending)}", cause="incomplete checkpoint")
