"""One input video -> schema-v1 samples (the per-input work of ``python -m data_tools.prepare``).

Decode (upright, with timestamps), re-sample to ``fps`` by time, cut clips of ``clip_len`` frames
every ``clip_stride``, resize to a resolution bucket (``wan_animate.geometry``), extract keypoints
on the source frames, render the pose video, crop the faces, pick a reference frame, and in replace
mode (or for ``driving=appearance``, the driving video of schema version 2) segment the character.
Problems with one input or clip are returned as reasons, never raised.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from data_tools.animate2.appearance import change_appearance, draw_appearance
from data_tools.config import PrepareConfig
from data_tools.pose.face import crop_boxes, face_boxes
from data_tools.pose.format import PoseSequence
from data_tools.pose.quality import describe_pose_quality, pose_quality
from data_tools.pose.render import render_pose
from data_tools.segment import background
from data_tools.shards import encode_sample, safe_key
from wan_animate.geometry import ResizePlan, choose_bucket
from wan_animate.video_io import VideoDecodeError, decode_video, probe_video, read_video, resample_indices

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def _load_image(path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"reference image {path} cannot be read")
    return img[..., ::-1].copy()


# ---------------------------------------------------------------------------- one input video -> samples
@dataclass
class InputResult:
    input: str
    samples: list = field(default_factory=list)
    keys: list = field(default_factory=list)
    skipped_clips: list = field(default_factory=list)
    reason: str | None = None  # set when the whole input was skipped
    stats: dict = field(default_factory=dict)
    pose_quality: dict = field(default_factory=dict)  # sample key -> pose-quality score


def _clip_starts(num: int, clip_len: int, stride: int, max_clips: int) -> list[int]:
    starts = list(range(0, num - clip_len + 1, stride))
    return starts[:max_clips] if max_clips > 0 else starts


def _pick_reference(cfg: PrepareConfig, key: str, start: int, end: int, num: int) -> tuple[int | None, str]:
    """Index into the re-sampled frames for the reference, and the policy actually used."""
    if cfg.reference_policy == "first":
        return start, "first"
    outside = [i for i in range(num) if i < start or i >= end]
    if not outside:
        return start, "first (no frame outside the clip)"
    rng = np.random.default_rng(int(hashlib.sha1(f"{cfg.seed}:{key}".encode()).hexdigest()[:8], 16))
    return int(rng.choice(outside)), "outside"


def _frames_needed(path: Path, cfg: PrepareConfig) -> int | None:
    """Source frames to decode when ``max_clips_per_video`` bounds the work (None = all): the
    clips' span plus one more clip length of reference candidates."""
    if cfg.max_clips_per_video <= 0:
        return None
    src_fps = probe_video(path, rotation=False).fps
    out_frames = (cfg.max_clips_per_video - 1) * cfg.stride + 2 * cfg.clip_len
    rate = 1.0 if cfg.fps == -1 else src_fps / cfg.fps
    return int(math.ceil(out_frames * rate)) + 2


def process_input(path: Path, cfg: PrepareConfig, backend, segmenter=None, done_keys=frozenset(),
                  progress=None) -> InputResult:
    """One video -> encoded samples. ``progress(1)`` is called once per clip (written or not)."""
    path = Path(path)
    if not path.is_file():  # every problem before the first clip skips the whole input, with its reason
        return InputResult(str(path), reason="file not found")
    vid = f"{safe_key(path.stem)[:48]}-{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"  # input id
    try:
        # upright (rotation tag applied) and with timestamps: variable-rate video is sampled by time
        decoded = decode_video(path, max_frames=_frames_needed(path, cfg), threads=cfg.workers <= 1)
    except VideoDecodeError as e:
        return InputResult(str(path), reason=f"undecodable video: {e}")
    frames_src, src_fps = decoded.frames, decoded.fps
    n_src, src_h, src_w = frames_src.shape[:3]
    sel = resample_indices(n_src, src_fps, cfg.fps, decoded.times)
    starts = _clip_starts(len(sel), cfg.clip_len, cfg.stride, cfg.max_clips_per_video)
    out_fps = src_fps if cfg.fps == -1 else cfg.fps
    if not starts:
        return InputResult(str(path), reason=f"too short: {len(sel)} frames at {out_fps:g} fps ({n_src} source "
                                             f"frames at {src_fps:g} fps) < clip_len {cfg.clip_len}")
    ref_image = None
    if cfg.reference_policy == "image":
        sidecars = (path.with_suffix(ext) for ext in IMAGE_EXTENSIONS)  # <video stem>.png / .jpg / ...
        ref_path = Path(cfg.reference_image) if cfg.reference_image else next((q for q in sidecars if q.is_file()), None)
        if ref_path is None or not ref_path.is_file():
            return InputResult(str(path), reason=f"reference_policy=image but no reference image: set "
                                                 f"reference_image= or put {path.stem}.png/.jpg next to the video")
        ref_image = _load_image(ref_path)
    caption_file = path.with_suffix(".txt")
    caption = caption_file.read_text().strip() if caption_file.is_file() else cfg.caption

    h, w = choose_bucket(src_h, src_w, cfg.target_area, cfg.buckets)
    plan = ResizePlan(src_h, src_w, h, w, cfg.resize_mode)
    # Keypoints of the re-sampled frames the clips cover, tracked in order once.
    used = np.asarray(sel)
    last = starts[-1] + cfg.clip_len
    ready_pose = ready_face = None
    try:
        if getattr(backend, "videos", None) is not None:  # precomputed pose / face videos
            pose_path, face_path = backend.video_paths(path)
            ready_pose, _ = read_video(pose_path, max_frames=int(used[last - 1]) + 1)
            ready_face, _ = read_video(face_path, max_frames=int(used[last - 1]) + 1)
            for name, v in (("pose", ready_pose), ("face", ready_face)):
                if len(v) <= used[last - 1]:
                    raise ValueError(f"ready {name} video has {len(v)} frames, the clips need {used[last - 1] + 1}")
            if ready_pose.shape[1:3] != (src_h, src_w):
                raise ValueError(f"ready pose video is {ready_pose.shape[2]}x{ready_pose.shape[1]}, the video is "
                                 f"{src_w}x{src_h}")
        pose_src = (backend.extract(frames_src[used[:last]], source=str(path), frame_indices=used[:last])
                    if getattr(backend, "has_keypoints", True) else None)
    except Exception as e:  # a backend failure on one input must not stop the job
        return InputResult(str(path), reason=f"pose extraction failed: {type(e).__name__}: {e}")
    keypoints_available = pose_src is not None
    if pose_src is None:
        # Ready videos without keypoints: nothing to check presence with; the json says so.
        pose_src = PoseSequence.empty(last, src_h, src_w)
        person = face_ok = np.ones(last, bool)
        boxes_all, box_source = np.zeros((last, 4), np.float32), np.full(last, -1, np.int8)
        hands = np.zeros(last, bool)
    else:
        person = pose_src.person_detected()
        face_ok = pose_src.face_detected()
        boxes_all, box_source = face_boxes(pose_src, smooth_window=cfg.face_smooth_window, return_source=True)
        hands = (pose_src.left_hand[..., 2] >= 0.5).any(-1) | (pose_src.right_hand[..., 2] >= 0.5).any(-1)

    stats = dict(frames=0, person_frames=0, face_frames=0, face_box_landmarks=0, face_box_head=0,
                 face_box_filled=0, hand_frames=0, mask_coverage_sum=0.0, reference_fallbacks=0,
                 pose_quality_sum=0.0, pose_quality_clips=0, pose_flagged_clips=0, bucket=f"{h}x{w}")
    res = InputResult(str(path), stats=stats)  # filled clip by clip below
    for c, start in enumerate(starts):
        end = start + cfg.clip_len
        key = f"{vid}_c{c:04d}"
        if progress is not None:
            progress(1)
        share = float(person[start:end].mean())
        if share < cfg.min_person_fraction:
            res.skipped_clips.append({"clip": c, "key": key,
                                      "reason": f"person on {share:.0%} of frames < min_person_fraction "
                                                f"{cfg.min_person_fraction:.0%}"})
            continue
        idx = np.arange(start, end)
        quality = pose_quality(pose_src.select(idx)) if keypoints_available else None
        if quality is not None and quality["score"] < cfg.min_pose_quality:
            res.skipped_clips.append({"clip": c, "key": key, "reason": f"{describe_pose_quality(quality)} < "
                                                                      f"min_pose_quality {cfg.min_pose_quality}"})
            continue
        res.keys.append(key)
        if quality is not None:
            res.pose_quality[key] = quality["score"]
            stats["pose_quality_sum"] += quality["score"]
            stats["pose_quality_clips"] += 1
            stats["pose_flagged_clips"] += int(bool(quality["flags"]))
        stats["frames"] += len(idx)
        for name, frame_flags in (("person_frames", person), ("face_frames", face_ok), ("hand_frames", hands),
                                  ("face_box_landmarks", box_source == 2), ("face_box_head", box_source == 1),
                                  ("face_box_filled", box_source == 0)):
            stats[name] += int(frame_flags[idx].sum())
        ref_idx, ref_policy = (None, "image") if ref_image is not None else _pick_reference(cfg, key, start, end,
                                                                                          len(sel))
        if ref_policy.startswith("first") and cfg.reference_policy == "outside":
            stats["reference_fallbacks"] += 1
        if key in done_keys:  # already in a completed shard from an earlier (killed) run
            continue
        target = plan.apply_all(frames_src[used[idx]])
        pose_t = plan.pose(pose_src.select(idx))
        ref = plan.apply(ref_image if ref_image is not None else frames_src[used[ref_idx]])
        meta = {
            "source": str(path.resolve()), "source_fps": float(src_fps), "source_height": int(src_h),
            "source_width": int(src_w), "source_rotation": decoded.rotation,
            "variable_frame_rate": decoded.variable_frame_rate, "frame_indices": [int(i) for i in used[idx]],
            "frame_times": [round(float(decoded.times[i]), 4) for i in used[idx]],
            "bucket": [h, w], "resize_mode": cfg.resize_mode,
            "source_to_target": {"scale": plan.scale, "offset_x": plan.offset_x, "offset_y": plan.offset_y},
            "reference": {"policy": ref_policy,
                          "index": None if ref_idx is None else int(used[ref_idx]),
                          "image": cfg.reference_image if ref_image is not None else None},
            "pose_backend": cfg.pose_backend,
            "keypoints": pose_t.to_dict(),
            "face_boxes": np.round(plan.boxes(boxes_all[idx]), 2).tolist(),
            "face_boxes_source": np.round(boxes_all[idx], 2).tolist(),
            "person_detected": person[idx].tolist(), "face_detected": face_ok[idx].tolist(),
            "keypoints_available": keypoints_available,
            "pose_quality": None if quality is None else {k: quality[k] for k in ("score", "flags", "bad_frames")},
        }
        if ready_pose is not None:
            pose_video = plan.apply_all(ready_pose[used[idx]])
            face = np.stack([cv2.resize(f, (cfg.face_size, cfg.face_size), interpolation=cv2.INTER_AREA)
                             for f in ready_face[used[idx]]])
            meta["streams"] = "precomputed pose/face videos"
            if not keypoints_available:
                meta["face_boxes"] = meta["face_boxes_source"] = None
        else:
            pose_video = render_pose(pose_t, h, w)
            face = crop_boxes(frames_src[used[idx]], boxes_all[idx], cfg.face_size)
        bg = mask = driving = None
        if segmenter is not None:
            masks = segmenter.masks(target, pose=pose_t)
            if cfg.replace:
                bg, mask = background(target, masks), masks
                stats["mask_coverage_sum"] += float(masks.mean()) * len(idx)
            if cfg.driving == "appearance":
                driving = _appearance_driving(cfg, key, target, masks, meta)
        res.samples.append(encode_sample(key, target=target, pose=pose_video, face=face,
                                         ref=ref, meta=meta, caption=caption, fps=out_fps, bg=bg, mask=mask,
                                         driving=driving, crf=cfg.crf))
    return res


def _appearance_driving(cfg: PrepareConfig, key: str, target: np.ndarray, masks: np.ndarray, meta: dict) -> np.ndarray:
    """``driving=appearance``: the clip with the character recoloured and textured over a new
    background (``data_tools.animate2.appearance``), every choice seeded by ``(seed, key)``; recorded in the json."""
    seed = int(hashlib.sha1(f"{cfg.seed}:{key}:driving".encode()).hexdigest()[:8], 16)
    params = draw_appearance(np.random.default_rng(seed))
    meta["driving"] = {"method": "appearance", "seed": seed, "params": params.to_dict(),
                       "mask_coverage": round(float(np.mean(masks)), 4)}
    return change_appearance(target, masks, params, seed=seed)


def estimate_clips(path: str, cfg: PrepareConfig) -> int:
    """Clips an input will give, from its header (for the progress bar; 0 when unreadable)."""
    try:
        info = probe_video(path, rotation=False)
    except VideoDecodeError:
        return 0
    frames = info.num_frames if cfg.fps == -1 else int((info.num_frames - 1) / info.fps * cfg.fps) + 1
    return len(_clip_starts(frames, cfg.clip_len, cfg.stride, cfg.max_clips_per_video))
