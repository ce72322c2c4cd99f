"""The metrics of one eval cell: which ones it can compute (and why not the others), each sample's
values, the mean over samples, and the loss metrics (held-out loss, condition sensitivity; shared
by cells with the same DiT, computed without generating videos)."""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from contextlib import contextmanager

import numpy as np

from eval.config import EvalConfig, METRICS, NEEDS_GROUND_TRUTH
from eval.data import EvalSample, EvalSet
from eval.metrics import expression_metrics, flicker, identity_similarity, motion_metrics, psnr, ssim, temporal_error
from eval.resources import driving_keypoints, get_lpips, get_pose_backend_cached, store
from wan_animate.config import DEFAULT_PROMPT
from wan_animate.heldout import condition_sensitivity, heldout_loss
from wan_animate.pipeline import resize_face_video
from wan_animate.video_io import frames_to_tensor


class Timer:
    """Seconds spent per named step, summed over calls: ``with timer("generate"): ...``."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0


def planned_metrics(cfg: EvalConfig, eval_set: EvalSet, family) -> tuple[list[str], dict[str, str]]:
    """Metrics to compute and, for every other metric, why it is not computed (``family``: the model's)."""
    todo, not_computed = [], {}
    extract = cfg.metrics.driving_keypoints == "extract"  # else "stored" (eval.config checks it)
    for name in METRICS:
        if name not in cfg.metrics.names:
            not_computed[name] = "not requested (add it to metrics.names)"
        elif name == "sensitivity" and not set(cfg.metrics.sensitivity_conditions) <= set(family.conditions):
            not_computed[name] = (f"metrics.sensitivity_conditions={cfg.metrics.sensitivity_conditions} are not all "
                                  f"conditions of a model.family={family.name} model ({', '.join(family.conditions)});"
                                  " leave it empty for every one")
        elif name in NEEDS_GROUND_TRUTH and not eval_set.has_ground_truth:
            not_computed[name] = "needs ground truth; the eval set is cross-identity"
        elif name == "sensitivity" and len(eval_set.samples) < 2:
            not_computed[name] = "needs at least two samples (each borrows the next one's conditions)"
        elif name in ("motion", "expression") and any(
                (s.driving if extract else s.stored_keypoints) is None for s in eval_set.samples):
            not_computed[name] = ("needs the driving RGB video (driving.mp4 in each pair folder) or "
                                  "metrics.driving_keypoints=stored" if extract else
                                  "metrics.driving_keypoints=stored but some samples store no keypoints")
        else:
            todo.append(name)
    return todo, not_computed


def sample_metrics(cfg: EvalConfig, todo: list[str], pipe, sample: EvalSample, video: np.ndarray,
                   timer: Timer, device) -> dict:
    m = cfg.metrics
    out: dict = {}
    gt = sample.target
    single = {"psnr": lambda: psnr(video, gt), "ssim": lambda: ssim(video, gt),
              "lpips": lambda: get_lpips(cfg, device).video_distance(video, gt),
              "identity": lambda: identity_similarity(pipe.image_encoder, sample.ref, video,
                                                      max_frames=m.identity_max_frames)}
    for name in (n for n in single if n in todo):
        with timer(name):
            out[name] = single[name]()
    if "flicker" in todo:
        with timer("flicker"):
            out["flicker"] = flicker(video)
            if gt is not None:
                out["flicker_gt"] = flicker(gt)
                out["temporal_error"] = temporal_error(video, gt)
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
    out = {}
    for k in sorted({k for d in per_sample.values() for k in d}):
        vals = [d[k] for d in per_sample.values() if d.get(k) is not None]
        if k.endswith(("_points", "_frames", "_without_person")):
            out[k] = int(sum(vals))
        else:
            finite_or_inf = [float(v) for v in vals if not math.isnan(float(v))]
            out[k] = float(np.mean(finite_or_inf)) if finite_or_inf else float("nan")
    return out


def _loss_key(cfg: EvalConfig) -> tuple:
    """What a loss metric depends on: model, checkpoint, LoRA, dtype, eval set and clip; not the
    sampling settings."""
    m = cfg.metrics
    return (cfg.model_dir, cfg.checkpoint, cfg.lora_path, cfg.lora_scale, cfg.dtype, os.path.abspath(cfg.eval_set),
            cfg.max_samples, cfg.max_frames, cfg.clip_len, tuple(m.heldout_timesteps), m.heldout_seed)


def loss_metric(name: str, cfg: EvalConfig, pipe, family, eval_set: EvalSet) -> dict:
    """``heldout`` (``wan_animate.heldout.heldout_loss``) or ``sensitivity`` (``condition_sensitivity``:
    the held-out loss with each sample's conditions swapped for the next sample's, minus its own) of
    the cell's DiT, shared by the cells with the same ``_loss_key``."""
    m = cfg.metrics
    results = store(name)
    key = (*_loss_key(cfg), tuple(m.sensitivity_conditions) if name == "sensitivity" else ())
    if key not in results:
        batches = list(loss_batches(pipe, family, eval_set, cfg.clip_len))
        common = dict(timesteps=m.heldout_timesteps, seed=m.heldout_seed, progress=True, family=family)
        results[key] = (heldout_loss(pipe.dit, batches, **common) if name == "heldout" else
                        condition_sensitivity(pipe.dit, batches, conditions=m.sensitivity_conditions or None, **common))
    return results[key]


def loss_batches(pipe, family, eval_set: EvalSet, clip_len: int):
    """One batch of the family's model inputs per sample (``family.build_inputs`` with the
    pipeline's frozen encoders): its first clip (``clip_len`` frames, or the longest 4n+1 prefix of a
    shorter sample), its driving streams at the family's sizes, no temporal-reference frames, animate mode."""
    dtype = next(pipe.dit.parameters()).dtype
    sizes = family.stream_sizes(pipe.config)
    for s in eval_set.samples:
        n = (min(s.num_frames, clip_len) - 1) // 4 * 4 + 1
        ex = {"key": s.key, "video": frames_to_tensor(s.target[:n]), "ref": frames_to_tensor(s.ref[None])[:, 0],
              "mode": "animate", "num_given": 0, "caption": s.caption or DEFAULT_PROMPT, "noise_seed": 0}
        for name, size in sizes.items():
            video = frames_to_tensor(s.stream(name)[:n])
            ex[name] = resize_face_video(video[None], size)[0] if size else video
        yield family.build_inputs([ex], pipe, pipe.device, dtype, n)
