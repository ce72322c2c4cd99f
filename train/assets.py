"""Quick-start assets: a tiny random model folder and a synthetic shard set, written once under
``<cache_dir>`` by the local main process (atomically: a finished folder holds ``.complete``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from data_tools.synthetic_data import make_synthetic_dataset
from train.config import Config
from train.data import resolve_urls
from wan_animate.family import get_family
from wan_animate.files import atomic_dir
from wan_animate.testing import make_tiny_model_folder


def synthetic_face_size(cfg: Config) -> int:
    m, d = cfg.model, cfg.data
    family = get_family(m.family)
    face = family.stream_sizes(family.config(preset=m.preset)[0]).get("face")
    return d.face_size or (face if face and not m.path else 64)


def synthetic_driving(cfg: Config) -> bool:
    """Whether the family reads a driving video: the synthetic set then renders it (schema v2)."""
    return "driving" in get_family(cfg.model.family).streams


def asset_paths(cfg: Config) -> tuple[Path, Path | None]:
    """(model folder, synthetic data folder or None) for this config, built or not."""
    cache = Path(cfg.cache_dir)
    m, d = cfg.model, cfg.data
    family = "" if m.family == "animate" else f"{m.family}-"
    model_path = Path(m.path) if m.path else cache / f"model-{family}{m.preset}-seed{m.init_seed}"
    data_dir = None
    if d.source == "synthetic":
        key = [d.synthetic_clips, d.synthetic_frames, d.synthetic_height, d.synthetic_width,
               synthetic_face_size(cfg), cfg.train.seed] + (["driving"] if synthetic_driving(cfg) else [])
        tag = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:8]
        data_dir = cache / f"synthetic-{tag}"
    return model_path, data_dir


def build_model(cfg: Config) -> Path:
    """The quick-start random model folder of ``model.preset`` (written once; one process)."""
    m = cfg.model
    return atomic_dir(asset_paths(cfg)[0], lambda p: make_tiny_model_folder(
        p, layout="diffusers", seed=m.init_seed, config_preset=m.preset, family=m.family))


def build_assets(cfg: Config) -> None:
    """Write the quick-start model folder / synthetic data the config asks for (one process)."""
    d = cfg.data
    data_dir = asset_paths(cfg)[1]
    if not cfg.model.path:
        build_model(cfg)
    if data_dir is not None:
        atomic_dir(data_dir, lambda p: make_synthetic_dataset(
            p, num_clips=d.synthetic_clips, clip_len=d.synthetic_frames, height=d.synthetic_height,
            width=d.synthetic_width, seed=cfg.train.seed, shard_size=max(1, d.synthetic_clips // 2),
            face_size=synthetic_face_size(cfg), driving=synthetic_driving(cfg)))


def prepare_assets(cfg: Config, acc) -> tuple[Path, list[str]]:
    """Model folder and shard URLs; the quick-start ones are written once by the local main process."""
    if acc.is_local_main_process:
        build_assets(cfg)
    acc.wait_for_everyone()
    model_path, data_dir = asset_paths(cfg)
    urls = resolve_urls([str(data_dir)] if data_dir is not None else list(cfg.data.urls))
    return model_path, urls
