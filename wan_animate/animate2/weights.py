"""Animate-2 weights: load, save and convert the official and diffusers layouts.

On-disk forms (the layout always detected from the tensor names, never from file names):

* official: one ``.safetensors`` file with ``blocks.N.block.*`` names (the official release ships
  ``wan_animate_2_bf16.safetensors`` / ``..._distillation.safetensors``; community prefixes such as
  ``model.diffusion_model.`` are stripped), or a folder of such shards + index + ``config.json``
  (``_class_name: WanAnimate2Transformer``, the official configuration's keys);
* diffusers: a ``WanAnimate2Transformer3DModel`` folder (``config.json`` + shards + index), or a
  pipeline folder whose ``transformer/`` holds one.

The file machinery is Animate v1's (``wan_animate.weights``: headers read first, every name and
shape checked before a byte of weights is read, ``CheckpointError`` reports, shard planning,
atomic writes); this module supplies the Animate-2 names and configs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wan_animate.animate2.config import DIFFUSERS_CLASS_NAME, OFFICIAL_CLASS_NAME, PRESETS, Animate2Config
from wan_animate.animate2.keymap import detect_family, diffusers_to_official, official_to_diffusers
from wan_animate.weights import source
from wan_animate.weights.diagnose import CheckpointError, check_against_model
from wan_animate.weights.files import iter_tensors
from wan_animate.weights.load import empty_model, fill_model, progress_bar
from wan_animate.weights.save import _unwrap, open_writer, write_all

__all__ = ["convert_animate2", "inspect_animate2", "load_animate2", "save_animate2",
           "config_from_dict"]

MODEL_NAME = "Wan-Animate-2 DiT"


# ------------------------------------------------------------------------------------------------
# What a path holds
# ------------------------------------------------------------------------------------------------


def config_from_dict(cfg: Mapping[str, Any]) -> Animate2Config:
    """An Animate-2 config from either ``config.json`` flavour (diffusers: by ``_class_name``)."""
    if cfg.get("_class_name") == DIFFUSERS_CLASS_NAME:
        return Animate2Config.from_diffusers_config(dict(cfg))
    if cfg.get("_class_name", OFFICIAL_CLASS_NAME) == OFFICIAL_CLASS_NAME:
        return Animate2Config.from_official_config(dict(cfg))
    raise CheckpointError(f"config.json has _class_name={cfg.get('_class_name')!r}, not an Animate-2 DiT "
                          f"({OFFICIAL_CLASS_NAME} or {DIFFUSERS_CLASS_NAME}).", cause="wrong model")


def _identify(src: source.Source, config: Animate2Config | None) -> tuple[Animate2Config, str]:
    names = [n for s in src.shards for n in s.tensors]
    src.prefix = source.detect_layout(names)[0]
    family, src.layout = detect_family(names, src.prefix)
    if family != "animate2":
        raise CheckpointError(f"{src.root}: the tensor names are not an Animate-2 DiT's (no blocks.N.block.* or "
                              "blocks.N.self_attn.to_q names); an Animate v1 checkpoint loads with "
                              "wan_animate.load_dit.", cause="wrong model family")
    if config is not None:
        return config, "the config= argument"
    if src.folder_config is not None:
        where, raw = str(src.root / "config.json"), src.folder_config
    elif src.shards[0].metadata.get(source.CONFIG_METADATA_KEY):
        where, raw = f"the metadata of {src.shards[0].path.name}", src.shards[0].metadata[source.CONFIG_METADATA_KEY]
    else:
        return Animate2Config.preset("14b"), "the default '14b' preset (no config.json, no file metadata)"
    try:
        return config_from_dict(json.loads(raw)), where
    except (json.JSONDecodeError, ValueError, TypeError) as err:
        raise CheckpointError(f"{where}: not a valid Animate-2 config ({err}); fix it or pass config=.",
                              cause="invalid config") from err


def _virtual_official(src: source.Source) -> dict[str, torch.Tensor]:
    virtual = {}
    for shard in src.shards:
        for name, info in shard.tensors.items():
            virtual[name.removeprefix(src.prefix) if src.prefix else name] = torch.empty(
                info.shape, dtype=info.dtype, device="meta")
    return diffusers_to_official(virtual, strict=False) if src.layout == "diffusers" else virtual


def _expected(config: Animate2Config) -> dict[str, torch.Tensor]:
    from wan_animate.animate2.model import Animate2DiT

    return {k: v.to("meta") for k, v in empty_model(lambda: Animate2DiT(config)).state_dict(keep_vars=True).items()}


def _check(src: source.Source, config: Animate2Config, config_source: str, where: str) -> dict[str, torch.Tensor]:
    ckpt = _virtual_official(src)
    check_against_model(ckpt, _expected(config), config, where=where, layout=src.layout,  # type: ignore[arg-type]
                        config_source=config_source, optional=set(), src=src, model_name=MODEL_NAME,
                        presets=PRESETS, rename=lambda sd: diffusers_to_official(sd, strict=False))
    return ckpt


def _stream_official(src: source.Source, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    for shard in src.shards:
        batch = {(n.removeprefix(src.prefix) if src.prefix else n): t for n, t in iter_tensors(shard, device)}
        yield diffusers_to_official(batch) if src.layout == "diffusers" else batch


def inspect_animate2(path: str | os.PathLike) -> dict[str, Any]:
    """Family, layout, config source, tensor count and bytes, from the headers only."""
    src = source.open_source(path)
    config, config_source = _identify(src, None)
    return {"family": "animate2", "path": str(src.root), "layout": src.layout, "prefix": src.prefix,
            "config": config, "config_source": config_source, "num_shards": len(src.shards),
            "num_tensors": sum(len(s.tensors) for s in src.shards), "total_bytes": src.total_bytes}


# ------------------------------------------------------------------------------------------------
# Load
# ------------------------------------------------------------------------------------------------


def load_animate2(
    path: str | os.PathLike,
    dtype: torch.dtype | None = torch.bfloat16,
    device: torch.device | str = "cpu",
    config: Animate2Config | None = None,
    *,
    progress: bool | None = None,
) -> nn.Module:
    """``Animate2DiT`` from an official file/folder, a diffusers folder or a pipeline folder.

    As ``wan_animate.load_dit``: parameters on meta, names and shapes checked from the
    headers, then filled shard by shard; ``dtype`` casts as ``set_precision`` does (fp32-by-design
    tensors stay fp32), ``None`` keeps the stored dtypes. Returned in eval mode.
    """
    from wan_animate.animate2.model import Animate2DiT

    device = torch.device(device)
    src = source.open_source(path)
    config, config_source = _identify(src, config)
    _check(src, config, config_source, str(path))
    return fill_model(empty_model(lambda: Animate2DiT(config)), _stream_official(src, device), device=device,
                      dtype=dtype, total_bytes=src.total_bytes, what=str(path), progress=progress)


# ------------------------------------------------------------------------------------------------
# Save and convert
# ------------------------------------------------------------------------------------------------


def save_animate2(
    model: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    layout: str = "official",
    max_shard_size: int | str = "5GB",
    metadata: Mapping[str, Any] | None = None,
    *,
    config: Animate2Config | None = None,
) -> list[Path]:
    """Shards + index + ``config.json`` (or one file if ``path`` ends in ``.safetensors``) in the
    ``official`` or ``diffusers`` layout; names and shapes checked against ``config`` first."""
    if isinstance(model, Mapping):
        state = dict(model)
    else:
        model = _unwrap(model)  # torch.compile / DDP wrappers
        config = config or getattr(model, "config", None)
        state = model.state_dict()
    if not isinstance(config, Animate2Config):
        raise ValueError("save_animate2 needs the model's Animate2Config (model.config or config=).")
    sd = {k: v.detach() for k, v in state.items()}
    if any(".lora_" in k or ".base_layer." in k for k in sd):
        raise ValueError("the model carries LoRA layers: save the adapter with wan_animate.lora, or merge it first.")
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()}
    check_against_model(meta, _expected(config), config, where="the state dict given to save_animate2",  # type: ignore[arg-type]
                        layout=detect_family(list(sd))[1], config_source="the model", optional=set(),
                        model_name=MODEL_NAME, presets=PRESETS, rename=lambda d: diffusers_to_official(d, strict=False))
    if layout == "diffusers":
        sd = official_to_diffusers(sd)
    writer = open_writer(Path(path), sd, config, layout, max_shard_size, metadata, {})  # type: ignore[arg-type]
    return write_all(writer, sd.items())


def convert_animate2(
    src_path: str | os.PathLike,
    dst_path: str | os.PathLike,
    to: str,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    config: Animate2Config | None = None,
    progress: bool = True,
) -> list[Path]:
    """Stream a checkpoint into the ``official`` or ``diffusers`` layout shard by shard (peak memory
    about one input shard plus one output shard)."""
    if to not in ("official", "diffusers"):
        raise ValueError(f"to={to!r}: choose 'official' or 'diffusers'.")
    src = source.open_source(src_path)
    config, config_source = _identify(src, config)
    ckpt = _check(src, config, config_source, str(src_path))

    def target(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if dtype is not None:
            batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
        return official_to_diffusers(batch) if to == "diffusers" else batch

    writer = open_writer(Path(dst_path), target(dict(ckpt)), config, to, max_shard_size, None, {})  # type: ignore[arg-type]
    bar = progress_bar(progress, total=src.total_bytes, desc=f"convert -> {to}")

    def tensors():
        for batch in _stream_official(src, torch.device("cpu")):
            bar.update(sum(t.numel() * t.element_size() for t in batch.values()))
            yield from target(batch).items()

    try:
        return write_all(writer, tensors())
    finally:
        bar.close()
