"""Raw videos -> validated schema-v1 webdataset shards.

    python -m data_tools.prepare input=PATH output=DIR [fps=30 clip_len=77 target_area=921600
        pose_backend=mediapipe reference_policy=outside replace=false shard_size=32 workers=1 ...]

Per input video: decode, re-sample to ``fps`` (index round(k / fps * src_fps)), cut clips of
``clip_len`` frames every ``clip_stride``, resize to a resolution bucket (multiples of 16; crop
or letterbox), extract keypoints on the source frames, render the pose video, crop 512 x 512
faces (official box rule + temporal smoothing), pick a reference frame, and in replace mode
segment the character (mask + background). Bad inputs and clips are skipped, counted and listed
in ``manifest.json`` with their reasons. Shards are written as ``*.tar.tmp`` and renamed when
complete; a rerun resumes, keeping completed shards and never duplicating a sample.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from data_tools.config import PrepareConfig
from data_tools.pose.face import crop_boxes, face_boxes
from data_tools.pose.format import PoseSequence
from data_tools.pose.render import render_pose
from data_tools.shards import ShardWriter, encode_sample, list_shards, safe_key, shard_index, shard_keys
from wan_animate.files import atomic_write_json
from wan_animate.geometry import ResizePlan, area_bucket, choose_bucket  # noqa: F401  (area_bucket: re-export)
from wan_animate.video_io import VideoDecodeError, decode_video, read_video, resample_indices

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
STATE_FILE = "prepare_state.jsonl"


# =============================================================================================
# inputs
# =============================================================================================
def list_inputs(path: str | os.PathLike) -> list[Path]:
    """A video file, a folder (searched recursively for video extensions) or a list file
    (.txt/.lst, one path per line, relative to the list's folder; '#' comments)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"input {p} does not exist")
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in VIDEO_EXTENSIONS)
    if p.suffix.lower() in (".txt", ".lst"):
        out = []
        for line in p.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                q = Path(line)
                out.append(q if q.is_absolute() else p.parent / q)
        return out
    return [p]


def input_id(path: Path) -> str:
    digest = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:8]
    return f"{safe_key(Path(path).stem)[:48]}-{digest}"


def _sidecar(video: Path, extensions) -> Path | None:
    for ext in extensions:
        q = video.with_suffix(ext)
        if q.is_file():
            return q
    return None


def _load_image(path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"reference image {path} cannot be read")
    return img[..., ::-1].copy()


# =============================================================================================
# one input video -> samples
# =============================================================================================
@dataclass
class InputResult:
    input: str
    samples: list = field(default_factory=list)
    keys: list = field(default_factory=list)
    skipped_clips: list = field(default_factory=list)
    reason: str | None = None  # set when the whole input was skipped
    stats: dict = field(default_factory=dict)


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
    _, src_fps = read_video(path, max_frames=1)
    out_frames = (cfg.max_clips_per_video - 1) * cfg.stride + 2 * cfg.clip_len
    rate = 1.0 if cfg.fps == -1 else src_fps / cfg.fps
    return int(math.ceil(out_frames * rate)) + 2


def process_input(path: Path, cfg: PrepareConfig, backend, segmenter=None, done_keys=frozenset()) -> InputResult:
    path = Path(path)
    res = InputResult(input=str(path))
    if not path.is_file():
        res.reason = "file not found"
        return res
    vid = input_id(path)
    try:
        frames_src, src_fps = read_video(path, max_frames=_frames_needed(path, cfg))
    except VideoDecodeError as e:
        res.reason = f"undecodable video: {e}"
        return res
    n_src, src_h, src_w = frames_src.shape[:3]
    sel = resample_indices(n_src, src_fps, cfg.fps)
    starts = _clip_starts(len(sel), cfg.clip_len, cfg.stride, cfg.max_clips_per_video)
    out_fps = src_fps if cfg.fps == -1 else cfg.fps
    if not starts:
        res.reason = (f"too short: {len(sel)} frames at {out_fps:g} fps ({n_src} source frames at {src_fps:g} fps) "
                      f"< clip_len {cfg.clip_len}")
        return res
    ref_image = None
    if cfg.reference_policy == "image":
        ref_path = Path(cfg.reference_image) if cfg.reference_image else _sidecar(path, IMAGE_EXTENSIONS)
        if ref_path is None or not ref_path.is_file():
            res.reason = (f"reference_policy=image but no reference image: set reference_image= or put "
                          f"{path.stem}.png/.jpg next to the video")
            return res
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
        if getattr(backend, "has_keypoints", True):
            pose_src = backend.extract(frames_src[used[:last]], source=str(path), frame_indices=used[:last])
        else:
            pose_src = None
    except Exception as e:  # a backend failure on one input must not stop the job
        res.reason = f"pose extraction failed: {type(e).__name__}: {e}"
        return res
    if pose_src is None:
        # Ready videos without keypoints: nothing to check presence with; the json says so.
        pose_src = PoseSequence.empty(last, src_h, src_w)
        person = np.ones(last, bool)
        face_ok = np.ones(last, bool)
        boxes_all = np.zeros((last, 4), np.float32)
        box_source = np.full(last, -1, np.int8)
        hands = np.zeros(last, bool)
        keypoints_available = False
    else:
        keypoints_available = True
        person = pose_src.person_detected()
        face_ok = pose_src.face_detected()
        boxes_all, box_source = face_boxes(pose_src, smooth_window=cfg.face_smooth_window, return_source=True)
        hands = (pose_src.left_hand[..., 2] >= 0.5).any(-1) | (pose_src.right_hand[..., 2] >= 0.5).any(-1)

    stats = dict(frames=0, person_frames=0, face_frames=0, face_box_landmarks=0, face_box_head=0,
                 face_box_filled=0, hand_frames=0, mask_coverage_sum=0.0, reference_fallbacks=0,
                 bucket=f"{h}x{w}")
    for c, start in enumerate(starts):
        end = start + cfg.clip_len
        key = f"{vid}_c{c:04d}"
        share = float(person[start:end].mean())
        if share < cfg.min_person_fraction:
            res.skipped_clips.append({"clip": c, "key": key,
                                      "reason": f"person on {share:.0%} of frames < min_person_fraction "
                                                f"{cfg.min_person_fraction:.0%}"})
            continue
        res.keys.append(key)
        idx = np.arange(start, end)
        stats["frames"] += len(idx)
        stats["person_frames"] += int(person[idx].sum())
        stats["face_frames"] += int(face_ok[idx].sum())
        stats["face_box_landmarks"] += int((box_source[idx] == 2).sum())
        stats["face_box_head"] += int((box_source[idx] == 1).sum())
        stats["face_box_filled"] += int((box_source[idx] == 0).sum())
        stats["hand_frames"] += int(hands[idx].sum())
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
            "source_width": int(src_w), "frame_indices": [int(i) for i in used[idx]],
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
        bg = mask = None
        if segmenter is not None:
            mask = segmenter.masks(target, pose=pose_t)
            from data_tools.segment import background

            bg = background(target, mask)
            stats["mask_coverage_sum"] += float(mask.mean()) * len(idx)
        res.samples.append(encode_sample(key, target=target, pose=pose_video, face=face,
                                         ref=ref, meta=meta, caption=caption, fps=out_fps, bg=bg, mask=mask,
                                         crf=cfg.crf))
    res.stats = stats
    return res


# =============================================================================================
# workers
# =============================================================================================
_WORKER: dict = {}


def _make_tools(cfg: PrepareConfig):
    from data_tools.pose import get_pose_backend

    backend = get_pose_backend(cfg.pose_backend, **dict(cfg.pose_options))
    segmenter = None
    if cfg.replace:
        from data_tools.segment import get_segmenter

        if cfg.segmenter == "sam2":
            segmenter = get_segmenter("sam2", path=cfg.sam2_path, **dict(cfg.segmenter_options))
        else:
            segmenter = get_segmenter(cfg.segmenter, threshold=cfg.mask_threshold, **dict(cfg.segmenter_options))
    return backend, segmenter


def _worker_init(cfg_dict: dict) -> None:
    # Nothing here may raise: a failing Pool initializer makes the pool respawn workers forever.
    cv2.setNumThreads(1)
    _WORKER["cfg"] = cfg_dict


def _worker_run(args) -> InputResult:
    path, done_keys = args
    try:
        if "backend" not in _WORKER:  # created lazily so that a failure is reported, not retried
            cfg = PrepareConfig(**_WORKER["cfg"])
            _WORKER["cfg"] = cfg
            _WORKER["backend"], _WORKER["segmenter"] = _make_tools(cfg)
        return process_input(path, _WORKER["cfg"], _WORKER["backend"], _WORKER["segmenter"], done_keys)
    except Exception as e:  # never lose the whole job to one input
        return InputResult(input=str(path), reason=f"internal error: {type(e).__name__}: {e}")


# =============================================================================================
# resumable job
# =============================================================================================
def _config_fingerprint(cfg: PrepareConfig) -> str:
    d = asdict(cfg)
    for k in ("output", "workers", "input"):
        d.pop(k)
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _read_state(path: Path) -> list[dict]:
    records = []
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill; everything before it is valid
    return records


def _append_state(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def build_manifest(out: Path, cfg: PrepareConfig, records: list[dict], seconds: float, clips_this_run: int) -> dict:
    inputs = [r for r in records if r.get("type") == "input"]
    skipped = [{"input": r["input"], "reason": r["reason"]} for r in inputs if r.get("reason")]
    skipped_clips = [dict(input=r["input"], **c) for r in inputs for c in r.get("skipped_clips", [])]
    totals: dict = {}
    buckets: dict = {}
    for r in inputs:
        for k, v in r.get("stats", {}).items():
            if k == "bucket":
                buckets[v] = buckets.get(v, 0) + len(r.get("keys", []))
            else:
                totals[k] = totals.get(k, 0) + v
    frames = max(totals.get("frames", 0), 1)
    shards = list_shards(out)
    shard_info = [{"name": p.name, "samples": len(shard_keys(p))} for p in shards]
    stats = {
        "frames": totals.get("frames", 0),
        "person_frame_share": round(totals.get("person_frames", 0) / frames, 4),
        "face_frame_share": round(totals.get("face_frames", 0) / frames, 4),
        "face_box_from_landmarks_share": round(totals.get("face_box_landmarks", 0) / frames, 4),
        "face_box_from_head_points_share": round(totals.get("face_box_head", 0) / frames, 4),
        "face_box_filled_share": round(totals.get("face_box_filled", 0) / frames, 4),
        "hand_frame_share": round(totals.get("hand_frames", 0) / frames, 4),
        "reference_fallbacks": totals.get("reference_fallbacks", 0),
        "buckets": buckets,
    }
    if cfg.replace:
        stats["mask_coverage_mean"] = round(totals.get("mask_coverage_sum", 0.0) / frames, 4)
    return {
        "schema_version": 1, "kind": "prepare", "config": asdict(cfg),
        "counts": {
            "inputs": len(inputs), "inputs_processed": len(inputs) - len(skipped), "inputs_skipped": len(skipped),
            "clips_written": sum(s["samples"] for s in shard_info), "clips_skipped": len(skipped_clips),
            "shards": len(shards),
        },
        "skipped_inputs": skipped, "skipped_clips": skipped_clips, "stats": stats, "shards": shard_info,
        "last_run": {"seconds": round(seconds, 2), "clips": clips_this_run,
                     "clips_per_second": round(clips_this_run / max(seconds, 1e-9), 3)},
    }


def prepare(cfg: PrepareConfig, *, progress: bool = True) -> dict:
    """Run (or resume) a prepare job; returns the manifest dict (also written to manifest.json)."""
    from tqdm import tqdm

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    fingerprint = _config_fingerprint(cfg)
    for tmp in out.glob("shard-*.tar.tmp"):  # partial shards of a killed run
        tmp.unlink()
    records = _read_state(state_path)
    if records and records[0].get("fingerprint") != fingerprint:
        raise SystemExit(f"error: {out} holds shards made with different options (fingerprint "
                         f"{records[0].get('fingerprint')} != {fingerprint}); use a new output= folder or delete it")
    if not records:
        if list_shards(out):
            raise SystemExit(f"error: {out} has shards but no {STATE_FILE}; use a new output= folder")
        state_path.write_text("")
        _append_state(state_path, {"type": "header", "fingerprint": fingerprint, "schema_version": 1})
        records = _read_state(state_path)
    else:
        # Keep only the valid prefix (drop a line cut by a kill).
        state_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    done_inputs = {r["input"] for r in records if r.get("type") == "input"}
    shards = list_shards(out)
    done_keys = frozenset(k for p in shards for k in shard_keys(p))
    start_index = max((shard_index(p) for p in shards), default=-1) + 1

    inputs = [str(p) for p in list_inputs(cfg.input)]
    todo = [p for p in inputs if p not in done_inputs]
    if len(todo) < len(inputs):
        print(f"resuming: {len(inputs) - len(todo)} inputs already done, {len(shards)} shards kept")

    pending: list[tuple[dict, set]] = []  # input records waiting for their samples' shards to complete

    def flush_pending() -> None:
        while pending and not pending[0][1]:
            _append_state(state_path, pending.pop(0)[0])

    def on_shard_done(_path, keys) -> None:
        ks = set(keys)
        for _, remaining in pending:
            remaining -= ks
        flush_pending()

    started = time.time()
    clips = 0
    writer = ShardWriter(out, shard_size=cfg.shard_size, start_index=start_index, on_shard_done=on_shard_done)
    bar = tqdm(total=len(todo), desc="prepare", unit="video", disable=not progress, dynamic_ncols=True)

    def consume(res: InputResult) -> None:
        nonlocal clips
        record = {"type": "input", "input": res.input, "reason": res.reason, "keys": res.keys,
                  "skipped_clips": res.skipped_clips, "stats": res.stats}
        pending.append((record, {s["__key__"] for s in res.samples}))
        for sample in res.samples:
            writer.write(sample)
            clips += 1
        flush_pending()
        bar.update(1)
        bar.set_postfix(clips=clips, clips_per_s=f"{clips / max(time.time() - started, 1e-9):.2f}")

    try:
        if cfg.workers == 0:
            backend, segmenter = _make_tools(cfg)
            for p in todo:
                try:
                    consume(process_input(Path(p), cfg, backend, segmenter, done_keys))
                except Exception as e:
                    consume(InputResult(input=p, reason=f"internal error: {type(e).__name__}: {e}"))
        else:
            # Fail fast on bad backend options in the main process, before any worker starts.
            backend, segmenter = _make_tools(cfg)
            backend.close()
            if segmenter is not None:
                segmenter.close()
            ctx = mp.get_context("spawn")
            with ctx.Pool(cfg.workers, initializer=_worker_init, initargs=(asdict(cfg),)) as pool:
                for res in pool.imap(_worker_run, [(Path(p), done_keys) for p in todo]):
                    consume(res)
        writer.close()
        flush_pending()
    finally:
        bar.close()
    manifest = build_manifest(out, cfg, _read_state(state_path), time.time() - started, clips)
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def _main(cfg: PrepareConfig) -> None:
    m = prepare(cfg)
    c = m["counts"]
    print(f"{c['clips_written']} clips in {c['shards']} shards at {cfg.output}; inputs: {c['inputs_processed']} "
          f"processed, {c['inputs_skipped']} skipped; clips skipped: {c['clips_skipped']}; "
          f"person on {m['stats']['person_frame_share']:.1%} of frames, face on {m['stats']['face_frame_share']:.1%}")
    for s in m["skipped_inputs"]:
        print(f"  skipped {s['input']}: {s['reason']}")


if __name__ == "__main__":
    from data_tools.config import run_hydra

    run_hydra("prepare", PrepareConfig, _main)
