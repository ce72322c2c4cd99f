"""Eval sets: what a cell generates from and compares against.

* **shards** (self-reconstruction, the paper's protocol): schema-v1 shards (a folder of
  ``shard-*.tar`` or one ``.tar``). Each sample gives its reference frame, its own pose and face
  streams, and its video as ground truth (which is also the "driving" video for keypoints).
* **pairs** (cross-identity, no ground truth): a folder with one subfolder per pair holding either
  preprocessed streams ``src_ref.png``, ``src_pose.mp4``, ``src_face.mp4`` (+ ``src_bg.mp4`` /
  ``src_mask.mp4`` for replace mode; + the driving RGB video as ``driving.mp4`` for motion and
  expression metrics), or a raw reference image + driving video that
  ``data_tools.preprocess_driving`` turns into those streams (cached under
  ``OUT_DIR/_preprocessed/<pair>/``, with the resized driving video as ``driving.mp4``).

Bad samples are skipped, counted and reported by key, never dropped silently.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_tools.pose.format import PoseSequence
from wan_animate.geometry import ResizePlan
from wan_animate.pipeline import load_image
from wan_animate.samples import SampleDecodeError, decode_sample, list_shards, read_shard, shard_kind
from wan_animate.video_io import VideoDecodeError, read_video, tensor_to_frames, write_video

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm")


class EvalSetError(ValueError):
    """The eval set path or layout is unusable as a whole."""


@dataclass
class EvalSample:
    key: str
    ref: np.ndarray  # uint8 [H, W, 3]
    pose: np.ndarray  # uint8 [T, H, W, 3] rendered skeleton video
    face: np.ndarray  # uint8 [T, S, S, 3] face crops
    target: np.ndarray | None = None  # uint8 [T, H, W, 3] ground truth (self-reconstruction)
    driving: np.ndarray | None = None  # uint8 [T, h, w, 3] driving RGB video (keypoint source)
    # uint8 [T, H, W, 3]: what an Animate-2 model is driven by (shards: schema version 2's driving.mp4,
    # the same motion by another appearance; pairs: driving.mp4 when it has the output size)
    raw_driving: np.ndarray | None = None
    bg: np.ndarray | None = None
    mask: np.ndarray | None = None  # uint8 [T, H, W, 3], 255 = character
    caption: str = ""
    stored_keypoints: PoseSequence | None = None  # keypoints stored with the sample, if any
    meta: dict = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return len(self.pose)

    def stream(self, name: str) -> np.ndarray | None:
        """The driving stream a model family reads (``ModelFamily.streams``: pose, face; driving)."""
        return self.raw_driving if name == "driving" else getattr(self, name)


@dataclass
class EvalSet:
    kind: str  # "shards" | "pairs"
    samples: list[EvalSample]
    skipped: list[dict]  # {"key": ..., "reason": ...}

    @property
    def has_ground_truth(self) -> bool:
        return bool(self.samples) and all(s.target is not None for s in self.samples)


def detect_kind(path: Path) -> str:
    if path.is_file() and path.suffix == ".tar":
        return "shards"
    if not path.is_dir():
        raise EvalSetError(f"eval_set {str(path)!r} is neither a .tar shard nor a folder")
    if any(path.glob("shard-*.tar")):
        return "shards"
    if any(p.is_dir() for p in path.iterdir()):
        return "pairs"
    raise EvalSetError(f"eval_set {str(path)!r} holds no shard-*.tar files and no pair subfolders")


def _cut(sample: EvalSample, max_frames: int) -> EvalSample:
    if max_frames <= 0 or sample.num_frames <= max_frames:
        return sample
    for name in ("pose", "face", "target", "driving", "raw_driving", "bg", "mask"):
        v = getattr(sample, name)
        if v is not None:
            setattr(sample, name, v[:max_frames])
    if sample.stored_keypoints is not None:
        sample.stored_keypoints = sample.stored_keypoints.select(np.arange(max_frames))
    return sample


# ---------------------------------------------------------------------------- shards


def load_shard_samples(path: Path, limit: int, max_frames: int, skipped: list) -> list[EvalSample]:
    shards = [path] if path.is_file() else list_shards(path)
    if not shards:
        raise EvalSetError(f"{path}: no shard-*.tar files")
    if shard_kind(shards[0]) == "cached":  # checked once up front, not as N "missing field 'mp4'" skips
        raise EvalSetError(f"eval_set {str(path)!r}: these are cached shards (data_tools.cache_latents output, "
                           "latents without the videos eval compares against): use the raw shards for eval, "
                           "the data=shards folder they were cached from")
    out: list[EvalSample] = []
    for shard in shards:
        for raw in sorted(read_shard(shard), key=lambda r: r["__key__"]):
            if limit and len(out) >= limit:
                return out
            try:
                d = decode_sample(raw)
            except SampleDecodeError as e:
                skipped.append({"key": raw.get("__key__", "?"), "reason": str(e)})
                continue
            video = tensor_to_frames(d["video"])
            kp = d["meta"].get("keypoints")
            s = EvalSample(
                key=d["key"], ref=tensor_to_frames(d["ref"][:, None])[0], pose=tensor_to_frames(d["pose"]),
                face=tensor_to_frames(d["face"]), target=video, driving=video, caption=d.get("caption", ""),
                stored_keypoints=PoseSequence.from_dict(kp) if kp else None, meta=d["meta"],
                raw_driving=tensor_to_frames(d["driving"]) if "driving" in d else None,  # schema version 2
                bg=tensor_to_frames(d["bg"]) if "bg" in d else None,
                mask=np.repeat((d["mask"][0].numpy() > 0.5)[..., None] * np.uint8(255), 3, -1) if "bg" in d else None,
            )
            out.append(_cut(s, max_frames))
    return out


# ---------------------------------------------------------------------------- pairs


def _read(path: Path) -> np.ndarray:
    return read_video(path)[0]


def load_preprocessed(folder: Path, key: str) -> EvalSample:
    for need in ("src_pose.mp4", "src_face.mp4"):
        if not (folder / need).exists():
            raise EvalSetError(f"{folder}: has src_ref.png but no {need}")
    s = EvalSample(key=key, ref=load_image(folder / "src_ref.png"),
                   pose=_read(folder / "src_pose.mp4"), face=_read(folder / "src_face.mp4"))
    if (folder / "src_bg.mp4").exists() and (folder / "src_mask.mp4").exists():
        s.bg, s.mask = _read(folder / "src_bg.mp4"), _read(folder / "src_mask.mp4")
    if (folder / "driving.mp4").exists():
        s.driving = _read(folder / "driving.mp4")
        if s.driving.shape[:3] == s.pose.shape[:3]:  # frame for frame at the output size
            s.raw_driving = s.driving
    if (folder / "src_meta.json").exists():
        s.meta = json.loads((folder / "src_meta.json").read_text())
        if s.meta.get("keypoints"):
            s.stored_keypoints = PoseSequence.from_dict(s.meta["keypoints"])
    return s


def load_pair(folder: Path, preprocess_args: dict, cache_dir: Path | None) -> EvalSample:
    """A preprocessed pair folder as is; a raw (image, video) pair through
    ``data_tools.preprocess_driving`` into ``cache_dir/<pair>`` (reused when already there), with
    the driving video resized the same way saved as ``driving.mp4`` for the keypoint metrics."""
    if (folder / "src_ref.png").exists():
        return load_preprocessed(folder, folder.name)
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    videos = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_EXTS)
    if len(images) != 1 or len(videos) != 1:
        raise EvalSetError(
            f"{folder}: a raw pair needs exactly one image and one video, found {len(images)} images and "
            f"{len(videos)} videos (or give preprocessed src_ref.png / src_pose.mp4 / src_face.mp4)"
        )
    out = (cache_dir or folder / "_preprocessed") / folder.name
    if not (out / "driving.mp4").exists():
        from data_tools.driving import preprocess_driving

        preprocess_driving(videos[0], images[0], out, **preprocess_args)
        meta = json.loads((out / "src_meta.json").read_text())
        frames = _read(videos[0])[np.asarray(meta["frame_indices"])]
        plan = ResizePlan(frames.shape[1], frames.shape[2], meta["height"], meta["width"], "crop")
        write_video(out / "driving.mp4", plan.apply_all(frames), meta["fps"])
    return load_preprocessed(out, folder.name)


def load_pairs(path: Path, limit: int, max_frames: int, skipped: list, preprocess_args: dict,
               cache_dir: Path | None) -> list[EvalSample]:
    out = []
    for folder in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        if limit and len(out) >= limit:
            break
        try:
            out.append(_cut(load_pair(folder, preprocess_args, cache_dir), max_frames))
        except (EvalSetError, VideoDecodeError, OSError, ValueError, RuntimeError) as e:
            skipped.append({"key": folder.name, "reason": str(e)})
    return out


def load_eval_set(path: str | os.PathLike, *, kind: str = "auto", max_samples: int = 0, max_frames: int = 0,
                  preprocess_args: dict | None = None, cache_dir: str | os.PathLike | None = None) -> EvalSet:
    path = Path(path)
    if not path.exists():
        raise EvalSetError(f"eval_set {str(path)!r} does not exist")
    kind = detect_kind(path) if kind == "auto" else kind
    skipped: list[dict] = []
    if kind == "shards":
        samples = load_shard_samples(path, max_samples, max_frames, skipped)
    else:  # "pairs" (eval.config checks eval_set_kind)
        samples = load_pairs(path, max_samples, max_frames, skipped, preprocess_args or {},
                             Path(cache_dir) if cache_dir else None)
    if not samples:
        detail = "; ".join(f"{s['key']}: {s['reason']}" for s in skipped[:3])
        raise EvalSetError(f"eval_set {str(path)!r}: no usable samples ({len(skipped)} skipped{': ' + detail if detail else ''})")
    return EvalSet(kind=kind, samples=samples, skipped=skipped)
