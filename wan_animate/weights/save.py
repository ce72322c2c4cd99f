"""``save_dit`` and the streaming ``convert_checkpoint``.

Shards are planned by ``huggingface_hub.split_torch_state_dict_into_shards`` (on meta tensors, so a
conversion plans before reading any weight), written with ``files.save_safetensors`` (group-readable)
under temporary names and renamed into place only when every shard is written: a write that fails
half-way leaves no partial model, and a model memory-mapped from the old files keeps its data.
``config.json`` is written last, so a folder never looks like a model before it is one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from torch import nn

from wan_animate.config import WanAnimateConfig
from wan_animate.weights import source
from wan_animate.weights.diagnose import check_against_model
from wan_animate.weights.files import save_safetensors
from wan_animate.weights.keymap import blur_kernel_keys, lia_blur_kernel, official_to_diffusers
from wan_animate.weights.load import expected_official, progress_bar
from wan_animate.weights.source import BLUR_DTYPE_METADATA_KEY, CONFIG_METADATA_KEY, WEIGHTS_NAME

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


class _ShardWriter:
    """Writes the planned shards (+ index) as their tensors arrive; renames them at ``finish``."""

    def __init__(self, dst: Path, plan: Mapping[str, torch.Tensor], max_bytes: int, metadata: dict[str, Any],
                 config_json: dict[str, Any]):
        self.dst, self.metadata, self.config_json = dst, metadata, config_json
        self.single_file = dst.suffix == ".safetensors"
        # planned on meta tensors: tensors sharing a storage (views, memory-mapped files) would
        # otherwise be grouped and sized by their whole storage
        self.split = split_torch_state_dict_into_shards(
            {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in plan.items()}, filename_pattern=WEIGHTS_NAME + "{suffix}.safetensors",
            max_shard_size=max(2**62, max_bytes) if self.single_file else max_bytes)
        self.waiting = {f: set(names) for f, names in self.split.filename_to_tensors.items()}
        self.buffers: dict[str, dict[str, torch.Tensor]] = {f: {} for f in self.waiting}
        self.written: dict[str, Path] = {}  # final name -> temporary file
        (dst.parent if self.single_file else dst).mkdir(parents=True, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        file = self.split.tensor_to_filename[name]
        self.buffers[file][name] = tensor
        self.waiting[file].discard(name)
        if not self.waiting[file]:
            folder = self.dst.parent if self.single_file else self.dst
            part = folder / f".{WEIGHTS_NAME}-part{len(self.written):05d}.tmp"
            self.written[file] = save_safetensors(self.buffers.pop(file), part, self.metadata)

    def abort(self) -> None:
        """Remove the temporary files of a write that failed."""
        for tmp in self.written.values():
            tmp.unlink(missing_ok=True)
        self.written, self.buffers = {}, {}

    def finish(self) -> list[Path]:
        left = sorted(n for names in self.waiting.values() for n in names)
        if left:  # a bug in the caller: every planned tensor must arrive
            raise RuntimeError(f"internal error: tensors never written: {left[:5]}")
        if self.single_file:
            return [next(iter(self.written.values())).replace(self.dst)]
        final = [tmp.replace(self.dst / name) for name, tmp in sorted(self.written.items())]
        keep = {p.name for p in final}
        for stale in list(self.dst.glob(f"{WEIGHTS_NAME}*.safetensors")):
            if stale.name not in keep:  # shards of an earlier save into the same folder
                stale.unlink()
        index = self.dst / f"{WEIGHTS_NAME}.safetensors.index.json"
        if self.split.is_sharded:
            index.write_text(json.dumps({"metadata": self.split.metadata, "weight_map": self.split.tensor_to_filename},
                                        indent=2, sort_keys=True) + "\n")
        elif index.exists():
            index.unlink()
        (self.dst / "config.json").write_text(json.dumps(self.config_json, indent=2) + "\n")
        return final


def open_writer(path: Path, plan: Mapping[str, torch.Tensor], config: WanAnimateConfig, layout: str,
                 max_shard_size: int | str, metadata: Mapping[str, Any] | None,
                 extra_meta: Mapping[str, str]) -> _ShardWriter:
    if layout not in ("official", "diffusers"):
        raise ValueError(f"layout={layout!r}: choose 'official' or 'diffusers'.")
    cfg = (config.to_official_config() if layout == "official"
           else {**config.to_diffusers_config(), "_diffusers_version": version("diffusers")})
    meta = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(cfg), **extra_meta, **(metadata or {})}
    return _ShardWriter(path, plan, parse_size(max_shard_size), meta, cfg)


def write_all(writer: _ShardWriter, tensors) -> list[Path]:
    try:
        for name, tensor in tensors:
            writer.add(name, tensor)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain DiT inside torch.compile / DDP / FSDP-style wrappers (their names carry prefixes)."""
    while isinstance(inner := getattr(model, "_orig_mod", None) or getattr(model, "module", None), nn.Module):
        model = inner
    return model


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
    check_against_model(meta_sd, expected_official(config), config, where="the state dict given to save_dit",
                        layout=source.detect_layout(list(sd))[1], config_source="the model",
                        optional=set(blur_kernel_keys(config)))
    extra: dict[str, str] = {}
    if layout == "diffusers":
        kernels = [sd[k] for k in blur_kernel_keys(config) if k in sd]
        if kernels:
            extra[BLUR_DTYPE_METADATA_KEY] = str(kernels[0].dtype).removeprefix("torch.")
        sd = official_to_diffusers(sd, config)
    writer = open_writer(path, sd, config, layout, max_shard_size, metadata, extra)
    return write_all(writer, sd.items())


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
    src = source.open_source(src_path)
    config, config_source = source.identify(src, config)
    ckpt = source.virtual_official(src, config)
    check_against_model(ckpt, expected_official(config), config, where=str(src_path), layout=src.layout,
                        config_source=config_source, optional=set(blur_kernel_keys(config)), src=src)
    stored_blur = FLOAT_DTYPES.get(src.shards[0].metadata.get(BLUR_DTYPE_METADATA_KEY) or "")
    kernels = [ckpt[k] for k in blur_kernel_keys(config) if k in ckpt]
    extra: dict[str, str] = {}
    if to == "diffusers" and (kdtype := dtype or (kernels[0].dtype if kernels else stored_blur)):
        extra[BLUR_DTYPE_METADATA_KEY] = str(kdtype).removeprefix("torch.")
    # to official from a file without kernels: re-created in the dtype asked for, else the one recorded
    # in the metadata, else the conv weights' one
    add_kernels = to == "official" and not kernels
    sibling = ckpt.get("motion_encoder.enc.net_app.convs.1.conv2.1.weight")
    blur_dtype = dtype or stored_blur or (sibling.dtype if sibling is not None else torch.float32)

    def target(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if dtype is not None:
            batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
        return official_to_diffusers(batch, config) if to == "diffusers" else batch

    plan = target(dict(ckpt))
    if add_kernels:  # the diffusers layout has no blur kernels: re-created, written last
        plan.update({k: lia_blur_kernel(blur_dtype).to("meta") for k in blur_kernel_keys(config)})
    writer = open_writer(Path(dst_path), plan, config, to, max_shard_size, None, extra)
    bar = progress_bar(progress, total=src.total_bytes, desc=f"convert -> {to}")

    def tensors():
        for batch in source.stream_official(src, config, torch.device("cpu")):
            bar.update(sum(t.numel() * t.element_size() for t in batch.values()))
            yield from target(batch).items()
        if add_kernels:
            yield from ((k, lia_blur_kernel(blur_dtype)) for k in blur_kernel_keys(config))

    try:
        return write_all(writer, tensors())
    finally:
        bar.close()
