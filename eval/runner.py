"""One eval cell: load (or reuse) the pipeline, generate every eval sample, compute the metrics,
write ``videos/``, ``frames/`` (reference | driving | generated strips) and ``metrics.json``.

A cell never raises: a failure is written to ``metrics.json`` (``status: failed`` with the error
and traceback) so a sweep goes on and the report lists it. Heavy objects are cached across the
cells of one process (``eval.resources``); the metrics are computed by ``eval.scoring`` and the
record is written as strict JSON by ``eval.records``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import traceback
from pathlib import Path

import numpy as np

from eval.config import LOSS_METRICS, OFFICIAL_CLIP_LEN, EvalConfig
from eval.data import EvalSample, EvalSet
from eval.records import METRICS_FILE, loads_record, result_config, to_eval_config, write_record
from eval.resources import get_eval_set, get_i3d, get_pipeline, model_family, resolve_dtype_device
from eval.scoring import Timer, aggregate, heldout_cached, planned_metrics, sample_metrics, sensitivity_cached

log = logging.getLogger("eval")

# Cells this process skipped because they had finished before (the end-of-sweep report says so).
SKIPPED_THIS_PROCESS: set[str] = set()


def eval_set_clip_len(eval_set: EvalSet) -> int:
    """``clip_len=0``: the eval set's own clip length - the shortest sample's frame count (the
    shard json's ``num_frames``, after ``max_frames``) floored to 4n+1, at least 5 and at most the
    official 77 (longer samples are generated in segments)."""
    frames = min(s.num_frames for s in eval_set.samples)
    return int(min(OFFICIAL_CLIP_LEN, max(5, (frames - 1) // 4 * 4 + 1)))


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
    if getattr(pipe.config, "family", "") == "animate2":  # the raw driving video, attended in context
        if replace:
            raise ValueError("mode=replace is Wan-Animate-14B's; a Wan-Animate-2 model animates (mode=animate)")
        if sample.raw_driving is None:
            raise ValueError(f"sample {sample.key!r} has no driving video for a Wan-Animate-2 model: use schema-v2 "
                             "shards (driving.mp4) or pair folders with driving.mp4 at the output size")
        video = pipe.generate(sample.ref, sample.raw_driving, **kwargs)
    else:
        video = pipe.generate(sample.ref, sample.pose, sample.face,
                              sample.bg if replace else None, sample.mask if replace else None, **kwargs)
    video = np.asarray(video)
    if video.shape[0] != sample.num_frames or video.shape[1:3] != sample.pose.shape[1:3]:
        raise RuntimeError(f"sample {sample.key!r}: the pipeline returned {video.shape} for a "
                           f"{sample.pose.shape} pose video; expected the same frame count and size")
    return video


def side_by_side(sample: EvalSample, generated: np.ndarray, height: int = 160, *, raw_driving: bool = False) -> np.ndarray:
    """reference | driving | generated at the middle frame, each panel ``height`` pixels tall
    (``raw_driving``: the Animate-2 input, ``sample.raw_driving``, in the middle)."""
    import cv2

    t = len(generated) // 2
    source = sample.raw_driving if raw_driving else sample.driving
    driving = source[min(t, len(source) - 1)] if source is not None else sample.pose[t]
    panels = []
    for img in (sample.ref, driving, generated[t]):
        w = max(2, round(img.shape[1] * height / img.shape[0]))
        panels.append(cv2.resize(img, (w, height), interpolation=cv2.INTER_AREA))
        panels.append(np.full((height, 4, 3), 255, np.uint8))
    return np.concatenate(panels[:-1], axis=1)


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
                prev = loads_record(path.read_text())
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
    write_record(path, record)
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
    todo, not_computed = planned_metrics(cfg, eval_set, model_family(cfg.model_dir))
    with timer("load_pipeline"):
        pipe = get_pipeline(cfg)
    per_sample: dict[str, dict] = {}
    videos: list[np.ndarray] = []
    # the loss metrics need one DiT forward per sample and timestep, never the sampler
    generating = any(name not in LOSS_METRICS for name in todo)
    if not generating:
        log.info("cell %s: only loss metrics (%s) requested; no video is generated", cell_dir.name, ", ".join(todo))
    else:
        (cell_dir / "frames").mkdir(exist_ok=True)
    for sample in tqdm(eval_set.samples if generating else [], desc=f"cell {cell_dir.name}", unit="sample"):
        with timer("generate"):
            video = generate(pipe, cfg, sample)
        if cfg.save_videos:
            with timer("write_video"):
                write_video(cell_dir / "videos" / f"{sample.key}.mp4", video, cfg.fps)
        from PIL import Image

        raw = getattr(pipe.config, "family", "") == "animate2"
        Image.fromarray(side_by_side(sample, video, raw_driving=raw)).save(cell_dir / "frames" / f"{sample.key}.png")
        per_sample[sample.key] = sample_metrics(cfg, todo, pipe, sample, video, timer, device)
        if "fvd" in todo:
            videos.append(video)
    metrics = aggregate(per_sample)
    if "heldout" in todo:
        with timer("heldout"):
            metrics.update(heldout_cached(cfg, pipe, eval_set))
    if "sensitivity" in todo:
        with timer("sensitivity"):
            metrics.update(sensitivity_cached(cfg, pipe, eval_set))
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
        "generated_videos": generating,
        "per_sample": per_sample,
        "seconds": dict(timer.seconds),
        "seconds_per_sample": {k: v / len(eval_set.samples) for k, v in timer.seconds.items()
                               if k not in ("load_eval_set", "load_pipeline", "fvd")},
    }
