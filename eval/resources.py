"""What eval cells share within one process: the pipeline, the decoded eval set, the pose backend,
the LPIPS / I3D nets and the driving keypoints, each built once and reused while its key holds.

Hydra's default launcher runs a sweep's cells one after another in one process, so cells that
share a model (or eval set, ...) load it once; a cell with another key drops the old object first.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
from pathlib import Path

import torch

from data_tools.pose.backends import get_pose_backend
from eval.config import EvalConfig
from eval.data import EvalSample, EvalSet, load_eval_set
from eval.metrics.fvd import load_i3d
from eval.metrics.lpips import LPIPS
from wan_animate.family import family_of
from wan_animate.options import parse_dtype, resolve_device
from wan_animate.weights.source import CONFIG_METADATA_KEY, open_source

_CACHE: dict = {}


def _cached(name: str, key, build):
    """One live object per name; a different key drops the old object first (frees GPU memory)."""
    entry = _CACHE.get(name)
    if entry is not None and entry[0] == key:
        return entry[1]
    _CACHE.pop(name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    obj = build()
    _CACHE[name] = (key, obj)
    return obj


def store(name: str) -> dict:
    """A dict that lives as long as the process (results keyed by everything they depend on)."""
    return _CACHE.setdefault(name, (None, {}))[1]


def clear_cache() -> None:
    _CACHE.clear()
    gc.collect()


def resolve_dtype_device(cfg: EvalConfig) -> tuple[torch.dtype, torch.device]:
    """``dtype=auto``: bfloat16 on CUDA, float32 elsewhere; ``device=auto``: CUDA when available."""
    device = resolve_device(cfg.device)
    return parse_dtype(cfg.dtype, device), device


def model_family(model_dir: str):
    """The ``wan_animate.family.ModelFamily`` of ``model_dir`` (its DiT's tensor names, headers only)."""
    if not os.path.exists(model_dir):
        raise FileNotFoundError(f"model_dir={model_dir!r} does not exist")
    return family_of(model_dir)


def load_pipeline(cfg: EvalConfig):
    """The family's pipeline of ``model_dir``; ``checkpoint`` replaces its DiT, ``lora_path`` is merged."""
    dtype, device = resolve_dtype_device(cfg)
    for what, p in (("model_dir", cfg.model_dir), ("checkpoint", cfg.checkpoint), ("lora_path", cfg.lora_path)):
        if p is not None and not os.path.exists(p):
            raise FileNotFoundError(f"{what}={p!r} does not exist")
    family, dit = model_family(cfg.model_dir), None
    if cfg.checkpoint:
        path = resolve_checkpoint(cfg.checkpoint)
        src = open_source(path)
        # a bare training state (checkpoints/step-N/model.safetensors) stores no config: the base model's shape
        own = src.folder_config is not None or src.shards[0].metadata.get(CONFIG_METADATA_KEY)
        config = None if own else family.config(folder=family.dit_path(cfg.model_dir))[0]
        dit = family.load(path, dtype=dtype, device=device, config=config)
    pipe = family.pipeline_class.from_pretrained(cfg.model_dir, dtype=dtype, device=device, dit=dit)
    if cfg.lora_path:
        pipe.load_lora(cfg.lora_path, scale=cfg.lora_scale)
    return pipe


def resolve_checkpoint(path: str) -> str:
    """What ``load_dit`` should read for ``checkpoint=PATH``.

    A weights file or a model folder (official ``config.json`` / diffusers) loads as is; a trainer
    export folder (``output_dir/export``) resolves to its ``official/`` (else ``diffusers/``)
    layout; a training checkpoint (``checkpoints/step-N``, accelerate state) to its
    ``model.safetensors``. LoRA runs: pass ``lora_path=output_dir/export/lora.safetensors`` instead.
    """
    p = Path(path)
    if p.is_file() or (p / "config.json").exists() or (p / "model_index.json").exists():
        return str(p)
    for sub in ("official", "diffusers", "transformer"):
        if (p / sub).is_dir():
            return str(p / sub)
    if (p / "model.safetensors").is_file():
        return str(p / "model.safetensors")
    listing = sorted(x.name for x in p.iterdir())[:10] if p.is_dir() else []
    raise FileNotFoundError(
        f"checkpoint={path!r}: no DiT weights found (expected a .safetensors file, an official/diffusers folder, "
        f"an export/ folder or a checkpoints/step-N folder with model.safetensors); it holds {listing}"
    )


def get_pipeline(cfg: EvalConfig):
    key = (cfg.model_dir, cfg.checkpoint, cfg.lora_path, cfg.lora_scale, cfg.dtype, cfg.device)
    return _cached("pipeline", key, lambda: load_pipeline(cfg))


def get_eval_set(cfg: EvalConfig) -> EvalSet:
    key = (os.path.abspath(cfg.eval_set), cfg.eval_set_kind, cfg.max_samples, cfg.max_frames,
           json.dumps(cfg.preprocess, sort_keys=True, default=str))
    return _cached("eval_set", key, lambda: load_eval_set(
        cfg.eval_set, kind=cfg.eval_set_kind, max_samples=cfg.max_samples, max_frames=cfg.max_frames,
        preprocess_args=dict(cfg.preprocess), cache_dir=Path(cfg.out_dir) / "_preprocessed"))


def make_pose_backend(name: str, args: dict):
    """A data_tools backend name, or ``package.module:factory`` for a custom backend."""
    if ":" in name:
        module, attr = name.split(":", 1)
        return getattr(importlib.import_module(module), attr)(**args)
    return get_pose_backend(name, **args)


def get_pose_backend_cached(cfg: EvalConfig):
    m = cfg.metrics
    return _cached("pose_backend", (m.pose_backend, json.dumps(m.pose_backend_args, sort_keys=True)),
                   lambda: make_pose_backend(m.pose_backend, dict(m.pose_backend_args)))


def get_lpips(cfg: EvalConfig, device):
    m = cfg.metrics
    return _cached("lpips", (m.lpips_backbone, m.lpips_linear, m.lpips_net, str(device)),
                   lambda: LPIPS.from_files(m.lpips_backbone, m.lpips_linear, net=m.lpips_net).to(device))


def get_i3d(cfg: EvalConfig, device):
    return _cached("i3d", (cfg.metrics.fvd_detector, str(device)), lambda: load_i3d(cfg.metrics.fvd_detector, device))


def driving_keypoints(cfg: EvalConfig, backend, sample: EvalSample, height: int, width: int):
    """Keypoints of the driving video (extracted once per process and sample), or the stored ones."""
    if cfg.metrics.driving_keypoints == "stored":
        return sample.stored_keypoints.resized(height, width)
    keypoints = store("driving_keypoints")
    key = (os.path.abspath(cfg.eval_set), sample.key, cfg.max_frames, cfg.metrics.pose_backend)
    if key not in keypoints:
        keypoints[key] = backend.extract(sample.driving)
    return keypoints[key].resized(height, width)
