"""One eval cell: load (or reuse) the pipeline, generate every eval sample, compute the metrics,
write ``videos/``, ``frames/`` (reference | driving | generated strips) and ``metrics.json``.

A cell never raises: a failure is written to ``metrics.json`` (``status: failed`` with the error
and traceback) so a sweep goes on and the report lists it. Heavy objects (pipeline, pose backend,
LPIPS / I3D nets, the decoded eval set and the driving keypoints) are cached across the cells of
one process: Hydra's default launcher runs a sweep's cells one after another in one process.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import time
import traceback
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from eval.config import NEEDS_GROUND_TRUTH, OFFICIAL_CLIP_LEN, EvalConfig
from eval.data import EvalSample, EvalSet, load_eval_set
from wan_animate.options import parse_dtype, resolve_device
from wan_animate.video_io import frames_to_tensor

log = logging.getLogger("eval")

METRICS_FILE = "metrics.json"
# Config fields that do not change a cell's numbers (a rerun with other values still skips it).
NON_RESULT_FIELDS = ("out_dir", "skip_finished", "wandb", "save_videos", "device", "name")

_CACHE: dict = {}
# Cells this process skipped because they had finished before (the end-of-sweep report says so).
SKIPPED_THIS_PROCESS: set[str] = set()


# ---------------------------------------------------------------------------- small helpers


def to_eval_config(cfg) -> EvalConfig:
    """DictConfig (from Hydra) or EvalConfig -> validated EvalConfig (runs ``__post_init__``)."""
    if isinstance(cfg, EvalConfig):
        return cfg
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    try:
        obj = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        raise ValueError(f"{e.full_key} is required: python eval/main.py model_dir=MODEL_FOLDER "
                         "eval_set=SHARDS_OR_PAIRS_FOLDER [overrides]") from None
    if isinstance(obj, dict):  # a plain dict config (not from the ConfigStore schema)
        from eval.config import MetricsConfig, WandbConfig

        obj = EvalConfig(**{**obj, "metrics": MetricsConfig(**obj.get("metrics", {})),
                            "wandb": WandbConfig(**obj.get("wandb", {}))})
    return obj


def result_config(cfg: EvalConfig) -> dict:
    d = dataclasses.asdict(cfg)
    for k in NON_RESULT_FIELDS:
        d.pop(k, None)
    return d


def json_safe(x):
    """NaN -> null (JSON has no NaN); inf stays (Python's json writes Infinity)."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json_safe(data), indent=2, ensure_ascii=False))
    os.replace(tmp, path)


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0


# ---------------------------------------------------------------------------- cached resources


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


def clear_cache() -> None:
    _CACHE.clear()
    gc.collect()


def resolve_dtype_device(cfg: EvalConfig) -> tuple[torch.dtype, torch.device]:
    """``dtype=auto``: bfloat16 on CUDA, float32 elsewhere; ``device=auto``: CUDA when available."""
    device = resolve_device(cfg.device)
    return parse_dtype(cfg.dtype, device), device


def eval_set_clip_len(eval_set: EvalSet) -> int:
    """``clip_len=0``: the eval set's own clip length - the shortest sample's frame count (the
    shard json's ``num_frames``, after ``max_frames``) floored to 4n+1, at least 5 and at most the
    official 77 (longer samples are generated in segments)."""
    frames = min(s.num_frames for s in eval_set.samples)
    return int(min(OFFICIAL_CLIP_LEN, max(5, (frames - 1) // 4 * 4 + 1)))


def load_pipeline(cfg: EvalConfig):
    from wan_animate.pipeline import AnimatePipeline

    dtype, device = resolve_dtype_device(cfg)
    for what, p in (("model_dir", cfg.model_dir), ("checkpoint", cfg.checkpoint), ("lora_path", cfg.lora_path)):
        if p is not None and not os.path.exists(p):
            raise FileNotFoundError(f"{what}={p!r} does not exist")
    dit = None
    if cfg.checkpoint:
        from wan_animate.checkpoint import inspect_checkpoint, load_dit

        path = resolve_checkpoint(cfg.checkpoint)
        config = None
        if inspect_checkpoint(path)["config_source"].startswith("the default"):
            # A bare training state (checkpoints/step-N/model.safetensors) stores no config: the
            # DiT has the base model's shape.
            base = Path(cfg.model_dir)
            if AnimatePipeline.detect_layout(base) == "diffusers":
                base = base / "transformer"
            config = inspect_checkpoint(base)["config"]
        dit = load_dit(path, dtype=dtype, device=device, config=config)
    pipe = AnimatePipeline.from_pretrained(cfg.model_dir, dtype=dtype, device=device, dit=dit)
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
        import importlib

        module, attr = name.split(":", 1)
        return getattr(importlib.import_module(module), attr)(**args)
    from data_tools.pose.backends import get_pose_backend

    return get_pose_backend(name, **args)


def get_pose_backend_cached(cfg: EvalConfig):
    m = cfg.metrics
    return _cached("pose_backend", (m.pose_backend, json.dumps(m.pose_backend_args, sort_keys=True)),
                   lambda: make_pose_backend(m.pose_backend, dict(m.pose_backend_args)))


def get_lpips(cfg: EvalConfig, device):
    from eval.metrics.lpips import LPIPS

    m = cfg.metrics
    return _cached("lpips", (m.lpips_backbone, m.lpips_linear, m.lpips_net, str(device)),
                   lambda: LPIPS.from_files(m.lpips_backbone, m.lpips_linear, net=m.lpips_net).to(device))


def get_i3d(cfg: EvalConfig, device):
    from eval.metrics.fvd import load_i3d

    return _cached("i3d", (cfg.metrics.fvd_detector, str(device)), lambda: load_i3d(cfg.metrics.fvd_detector, device))


def driving_keypoints(cfg: EvalConfig, backend, sample: EvalSample, height: int, width: int):
    """Keypoints of the driving video (extracted once per process and sample), or the stored ones."""
    if cfg.metrics.driving_keypoints == "stored":
        return sample.stored_keypoints.resized(height, width)
    store = _CACHE.setdefault("driving_keypoints", (None, {}))[1]
    key = (os.path.abspath(cfg.eval_set), sample.key, cfg.max_frames, cfg.metrics.pose_backend)
    if key not in store:
        store[key] = backend.extract(sample.driving)
    return store[key].resized(height, width)


# ---------------------------------------------------------------------------- generation


def generate(pipe, cfg: EvalConfig, sample: EvalSample) -> np.ndarray:
    replace = cfg.mode == "replace"
    if replace and (sample.bg is None or sample.mask is None):
        raise ValueError(f"sample {sample.key!r} has no bg/mask streams; mode=replace needs them")
    kwargs = dict(steps=cfg.steps, shift=cfg.shift, guide_scale=cfg.guide_scale, seed=cfg.seed,
                  solver=cfg.solver, clip_len=cfg.clip_len, refert_num=cfg.refert_num, progress=False)
    prompt = cfg.prompt if cfg.prompt is not None else (sample.caption or None)
    if prompt is not None:
        kwargs["prompt"] = prompt
    if cfg.negative_prompt is not None:
        kwargs["negative_prompt"] = cfg.negative_prompt
    video = pipe.generate(sample.ref, sample.pose, sample.face,
                          sample.bg if replace else None, sample.mask if replace else None, **kwargs)
    video = np.asarray(video)
    if video.shape[0] != sample.num_frames or video.shape[1:3] != sample.pose.shape[1:3]:
        raise RuntimeError(f"sample {sample.key!r}: the pipeline returned {video.shape} for a "
                           f"{sample.pose.shape} pose video; expected the same frame count and size")
    return video


def side_by_side(sample: EvalSample, generated: np.ndarray, height: int = 160) -> np.ndarray:
    """reference | driving | generated at the middle frame, each panel ``height`` pixels tall."""
    import cv2

    t = len(generated) // 2
    driving = sample.driving[min(t, len(sample.driving) - 1)] if sample.driving is not None else sample.pose[t]
    panels = []
    for img in (sample.ref, driving, generated[t]):
        w = max(2, round(img.shape[1] * height / img.shape[0]))
        panels.append(cv2.resize(img, (w, height), interpolation=cv2.INTER_AREA))
        panels.append(np.full((height, 4, 3), 255, np.uint8))
    return np.concatenate(panels[:-1], axis=1)


# ---------------------------------------------------------------------------- metrics


def planned_metrics(cfg: EvalConfig, eval_set: EvalSet) -> tuple[list[str], dict[str, str]]:
    """Metrics to compute and, for every other metric, why it is not computed."""
    from eval.config import METRICS

    todo, not_computed = [], {}
    for name in METRICS:
        if name not in cfg.metrics.names:
            not_computed[name] = "not requested (add it to metrics.names)"
        elif name in NEEDS_GROUND_TRUTH and not eval_set.has_ground_truth:
            not_computed[name] = "needs ground truth; the eval set is cross-identity"
        elif (name in ("motion", "expression") and cfg.metrics.driving_keypoints == "extract"
              and any(s.driving is None for s in eval_set.samples)):
            not_computed[name] = ("needs the driving RGB video (driving.mp4 in each pair folder) or "
                                  "metrics.driving_keypoints=stored")
        elif (name in ("motion", "expression") and cfg.metrics.driving_keypoints == "stored"
              and any(s.stored_keypoints is None for s in eval_set.samples)):
            not_computed[name] = "metrics.driving_keypoints=stored but some samples store no keypoints"
        else:
            todo.append(name)
    return todo, not_computed


def sample_metrics(cfg: EvalConfig, todo: list[str], pipe, sample: EvalSample, video: np.ndarray,
                   timer: Timer, device) -> dict:
    from eval.metrics import (expression_metrics, flicker, identity_similarity, motion_metrics, psnr, ssim,
                              temporal_error)

    m = cfg.metrics
    out: dict = {}
    gt = sample.target
    if "psnr" in todo:
        with timer("psnr"):
            out["psnr"] = psnr(video, gt)
    if "ssim" in todo:
        with timer("ssim"):
            out["ssim"] = ssim(video, gt)
    if "lpips" in todo:
        with timer("lpips"):
            out["lpips"] = get_lpips(cfg, device).video_distance(video, gt)
    if "flicker" in todo:
        with timer("flicker"):
            out["flicker"] = flicker(video)
            if gt is not None:
                out["flicker_gt"] = flicker(gt)
                out["temporal_error"] = temporal_error(video, gt)
    if "identity" in todo:
        with timer("identity"):
            out["identity"] = identity_similarity(pipe.image_encoder, sample.ref, video, max_frames=m.identity_max_frames)
    if "motion" in todo or "expression" in todo:
        backend = get_pose_backend_cached(cfg)
        with timer("keypoints"):
            gen_kp = backend.extract(video)
            drv_kp = driving_keypoints(cfg, backend, sample, video.shape[1], video.shape[2])
        if "motion" in todo:
            with timer("motion"):
                out.update(motion_metrics(gen_kp, drv_kp, threshold=m.keypoint_threshold,
                                          pck_thresholds=tuple(m.pck_thresholds)))
        if "expression" in todo:
            with timer("expression"):
                out.update(expression_metrics(gen_kp, drv_kp, threshold=m.keypoint_threshold))
    return out


def aggregate(per_sample: dict[str, dict]) -> dict:
    """Mean of each metric over samples, ignoring NaN (undefined for that sample); counts kept."""
    names = sorted({k for d in per_sample.values() for k in d})
    out = {}
    for k in names:
        vals = [d[k] for d in per_sample.values() if k in d and d[k] is not None]
        if k.endswith("_points") or k.endswith("_frames") or k.endswith("_without_person"):
            out[k] = int(sum(vals))
            continue
        finite_or_inf = [float(v) for v in vals if not math.isnan(float(v))]
        out[k] = float(np.mean(finite_or_inf)) if finite_or_inf else float("nan")
    return out


def heldout_cached(cfg: EvalConfig, pipe, eval_set: EvalSet) -> dict:
    """Held-out loss of the cell's DiT; it does not depend on the sampling settings, so cells that
    share model, checkpoint and LoRA share one computation."""
    m = cfg.metrics
    key = (cfg.model_dir, cfg.checkpoint, cfg.lora_path, cfg.lora_scale, cfg.dtype, os.path.abspath(cfg.eval_set),
           cfg.max_samples, cfg.max_frames, cfg.clip_len, tuple(m.heldout_timesteps), m.heldout_seed)
    store = _CACHE.setdefault("heldout", (None, {}))[1]
    if key not in store:
        store[key] = compute_heldout(pipe, eval_set, timesteps=m.heldout_timesteps, seed=m.heldout_seed,
                                     clip_len=cfg.clip_len)
    return store[key]


def compute_heldout(pipe, eval_set: EvalSet, *, timesteps, seed: int, clip_len: int) -> dict:
    """Encode the first clip (``clip_len`` frames, or the longest 4n+1 prefix of a shorter sample)
    of every sample with the pipeline's frozen encoders (``wan_animate.batch.build_dit_inputs``, no
    temporal-reference frames, animate mode) and run ``eval.metrics.heldout_loss``."""
    from eval.metrics.heldout import heldout_loss
    from wan_animate.batch import build_dit_inputs
    from wan_animate.pipeline import DEFAULT_PROMPT, resize_face_video

    dtype = next(pipe.dit.parameters()).dtype
    size = pipe.config.motion_encoder_size

    def batches():
        for s in eval_set.samples:
            n = (min(s.num_frames, clip_len) - 1) // 4 * 4 + 1
            face = resize_face_video(frames_to_tensor(s.face[:n])[None], size)[0]
            ex = {"key": s.key, "video": frames_to_tensor(s.target[:n]), "pose": frames_to_tensor(s.pose[:n]),
                  "ref": frames_to_tensor(s.ref[None])[:, 0], "face": face, "mode": "animate", "num_given": 0,
                  "caption": s.caption or DEFAULT_PROMPT, "noise_seed": 0}
            yield build_dit_inputs([ex], pipe, pipe.device, dtype, clip_len=n)

    return heldout_loss(pipe.dit, batches(), timesteps=timesteps, seed=seed, progress=True)


# ---------------------------------------------------------------------------- one cell


def run_cell(cfg, cell_dir: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """Run one cell; never raises (failures are recorded). Returns the metrics.json record."""
    cell_dir = Path(cell_dir)
    cell_dir.mkdir(parents=True, exist_ok=True)
    path = cell_dir / METRICS_FILE
    record: dict = {"cell": cell_dir.name, "overrides": list(overrides or []), "status": "running"}
    started = time.perf_counter()
    try:
        ecfg = to_eval_config(cfg)
        record["config"] = result_config(ecfg)
        if ecfg.skip_finished and path.exists():
            try:
                prev = json.loads(path.read_text())
            except json.JSONDecodeError:
                prev = {}
            if prev.get("status") == "ok" and prev.get("config") == record["config"]:
                log.info("cell %s already finished; skipping (skip_finished=false recomputes it)", cell_dir.name)
                prev["skipped"] = True
                SKIPPED_THIS_PROCESS.add(str(cell_dir.resolve()))
                return prev
            if prev.get("status") == "ok":
                log.warning("cell %s holds results of a different config; recomputing", cell_dir.name)
        record.update(_run(ecfg, cell_dir))
        record["status"] = "ok"
    except Exception as e:  # a cell failure must not stop the sweep
        record["status"] = "failed"
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc()
        log.error("cell %s failed: %s", cell_dir.name, record["error"])
    record["seconds_total"] = time.perf_counter() - started
    write_json_atomic(path, record)
    return record


def _run(cfg: EvalConfig, cell_dir: Path) -> dict:
    from tqdm.auto import tqdm

    from wan_animate.video_io import write_video

    timer = Timer()
    with timer("load_eval_set"):
        eval_set = get_eval_set(cfg)
    dtype, device = resolve_dtype_device(cfg)
    resolved = {"clip_len": cfg.clip_len or eval_set_clip_len(eval_set), "dtype": str(dtype).removeprefix("torch."),
                "device": str(device)}
    if not cfg.clip_len:
        log.info("clip_len=0: using the eval set's own clip length %d", resolved["clip_len"])
    cfg = dataclasses.replace(cfg, clip_len=resolved["clip_len"])
    todo, not_computed = planned_metrics(cfg, eval_set)
    with timer("load_pipeline"):
        pipe = get_pipeline(cfg)
    per_sample: dict[str, dict] = {}
    videos: list[np.ndarray] = []
    (cell_dir / "frames").mkdir(exist_ok=True)
    for sample in tqdm(eval_set.samples, desc=f"cell {cell_dir.name}", unit="sample"):
        with timer("generate"):
            video = generate(pipe, cfg, sample)
        if cfg.save_videos:
            with timer("write_video"):
                write_video(cell_dir / "videos" / f"{sample.key}.mp4", video, cfg.fps)
        from PIL import Image

        Image.fromarray(side_by_side(sample, video)).save(cell_dir / "frames" / f"{sample.key}.png")
        per_sample[sample.key] = sample_metrics(cfg, todo, pipe, sample, video, timer, device)
        if "fvd" in todo:
            videos.append(video)
    metrics = aggregate(per_sample)
    if "heldout" in todo:
        with timer("heldout"):
            metrics.update(heldout_cached(cfg, pipe, eval_set))
    if "fvd" in todo:
        from eval.metrics.fvd import fvd

        with timer("fvd"):
            metrics["fvd"], metrics["fvd_clips"] = fvd(get_i3d(cfg, device), videos,
                                                       [s.target for s in eval_set.samples],
                                                       clip_frames=cfg.metrics.fvd_clip_frames, device=device)
    return {
        "resolved": resolved,  # what clip_len=0, dtype=auto and device=auto became
        "eval_set": {"kind": eval_set.kind, "samples": len(eval_set.samples), "skipped": eval_set.skipped},
        "metrics": metrics,
        "not_computed": not_computed,
        "per_sample": per_sample,
        "seconds": dict(timer.seconds),
        "seconds_per_sample": {k: v / len(eval_set.samples) for k, v in timer.seconds.items()
                               if k not in ("load_eval_set", "load_pipeline", "fvd")},
    }
