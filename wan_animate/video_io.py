"""Video reading and writing shared by data_tools, the inference path, training and eval.

Frames are ``uint8`` arrays ``[T, H, W, 3]`` (RGB), upright (the container's rotation tag applied,
as players do). Reading is PyAV: decord, measured on the real clip and on shard clips
(bench/video_decode.py, docs/data.md), used more CPU and was not faster. Writing is H.264 (yuv420p)
mp4. Decoding errors raise ``VideoDecodeError`` naming the file, so callers can skip and count bad
inputs.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np


class VideoDecodeError(RuntimeError):
    """A video file (or bytes blob) could not be decoded."""


@dataclass
class VideoInfo:
    num_frames: int
    fps: float
    height: int  # as displayed (after the rotation tag)
    width: int
    rotation: int = 0  # degrees counter-clockwise the stored frames are turned for display


@dataclass
class DecodedVideo:
    frames: np.ndarray  # uint8 [T, H, W, 3], upright (the container's rotation applied)
    fps: float  # average frame rate
    times: np.ndarray  # float64 [T] presentation time of each frame in seconds (first frame = 0)
    rotation: int  # degrees counter-clockwise that were applied (0, 90, 180, 270)

    @property
    def variable_frame_rate(self) -> bool:
        return is_variable_frame_rate(self.times, self.fps)


def _open(source: str | os.PathLike | bytes | BinaryIO):
    import av

    if isinstance(source, (str, os.PathLike)):
        name = source = str(source)
        if not os.path.exists(source):
            raise VideoDecodeError(f"{name}: file does not exist")
        if os.path.getsize(source) == 0:
            raise VideoDecodeError(f"{name}: zero-byte file")
    else:
        name = "<bytes>"
        source = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        container = av.open(source)
    except Exception as e:  # av raises many error types (InvalidDataError, OSError, ...)
        raise VideoDecodeError(f"{name}: not a decodable video ({type(e).__name__}: {e})") from e
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{name}: contains no video stream")
    return container, name


def _quarter_turns(rotation: float) -> int:
    """Display-matrix rotation (degrees counter-clockwise, e.g. -90 for most portrait phone
    videos) -> number of counter-clockwise quarter turns, 0..3."""
    return int(round(float(rotation or 0) / 90.0)) % 4


def decode_video(
    source: str | os.PathLike | bytes | BinaryIO,
    *,
    max_frames: int | None = None,
    threads: bool = False,
) -> DecodedVideo:
    """Decode a video upright, with each frame's presentation time (``times``: real timestamps,
    so variable-frame-rate video can be re-sampled by time). ``threads=True``: FFmpeg frame threads
    (up to ~2.7x faster on the real clip when cores are free; identical frames)."""
    container, name = _open(source)
    try:
        stream = container.streams.video[0]
        if threads:
            stream.thread_type = "AUTO"
        fps = float(stream.average_rate or stream.guessed_rate or 0.0) or 30.0
        frames, times, rotation = [], [], 0
        try:
            for frame in container.decode(stream):
                if not frames:
                    rotation = int(round(getattr(frame, "rotation", 0) or 0))
                img = frame.to_ndarray(format="rgb24")
                turns = _quarter_turns(rotation)
                frames.append(np.rot90(img, turns) if turns else img)
                times.append(frame.time if frame.time is not None else len(times) / fps)
                if max_frames is not None and len(frames) >= max_frames:
                    break
        except Exception as e:
            if not frames:
                raise VideoDecodeError(f"{name}: decoding failed ({type(e).__name__}: {e})") from e
            # A truncated file: the frames decoded so far are real, but the file is damaged.
            raise VideoDecodeError(
                f"{name}: truncated or corrupt after {len(frames)} frames ({type(e).__name__}: {e})"
            ) from e
    finally:
        container.close()
    if not frames:
        raise VideoDecodeError(f"{name}: no frames decoded")
    t = np.asarray(times, np.float64)
    return DecodedVideo(np.ascontiguousarray(np.stack(frames)), fps, t - t[0], _quarter_turns(rotation) * 90)


def read_video(source: str | os.PathLike | bytes | BinaryIO, *,
               max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode a whole video (upright). Returns ``(frames [T, H, W, 3] uint8, fps)``."""
    v = decode_video(source, max_frames=max_frames)
    return v.frames, v.fps


def probe_video(source: str | os.PathLike | bytes, *, rotation: bool = True) -> VideoInfo:
    """Frame count, fps, displayed size and rotation from the container's header; decodes (and
    counts) the frames only when the container does not record a frame count. ``rotation=False``
    skips decoding the first frame (where the rotation tag is read): stored size, rotation 0."""
    container, name = _open(source)
    try:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0.0) or 30.0
        num, h, w = int(stream.frames or 0), stream.codec_context.height, stream.codec_context.width
        frames = container.decode(stream) if rotation else ()  # the tag is side data of frames: the first one's
        turned = next((_quarter_turns(getattr(frame, "rotation", 0)) * 90 for frame in frames), 0)
    except Exception as e:
        raise VideoDecodeError(f"{name}: cannot read the header ({type(e).__name__}: {e})") from e
    finally:
        container.close()
    if num <= 0:
        num = len(decode_video(source).frames)
    if turned in (90, 270):
        h, w = w, h
    return VideoInfo(num_frames=num, fps=fps, height=h, width=w, rotation=turned)


# ---- frame timing
def is_variable_frame_rate(times: np.ndarray, fps: float, tolerance: float = 0.25) -> bool:
    """True when some frame interval differs from ``1 / fps`` by more than ``tolerance`` of it."""
    if len(times) < 3 or fps <= 0:
        return False
    gaps = np.diff(np.asarray(times, np.float64))
    return bool(np.abs(gaps * fps - 1.0).max() > tolerance)


def resample_indices(num_frames: int, src_fps: float, fps: float, times: np.ndarray | None = None) -> np.ndarray:
    """Source frame index of each output frame at ``fps`` (-1 keeps all source frames).

    Constant frame rate: output frame k takes source frame ``round(k / fps * src_fps)``. Variable
    frame rate (uneven ``times``, seconds per source frame): the frame whose timestamp is nearest to
    ``k / fps``, so motion keeps its real speed; ``fps=-1`` then re-samples at the average rate.
    """
    if times is not None and is_variable_frame_rate(times[:num_frames], src_fps):
        t = np.asarray(times[:num_frames], np.float64)
        rate = src_fps if fps == -1 else fps
        count = int(math.floor((t[-1] - t[0]) * rate + 1e-9)) + 1
        out_t = t[0] + np.arange(count) / rate
        after = np.clip(np.searchsorted(t, out_t), 1, num_frames - 1)
        before = after - 1
        return np.where(out_t - t[before] <= t[after] - out_t, before, after).astype(np.int64)
    if fps == -1 or abs(fps - src_fps) < 1e-6:
        return np.arange(num_frames)
    count = int(math.floor((num_frames - 1) / src_fps * fps + 1e-9)) + 1
    idx = np.round(np.arange(count) / fps * src_fps).astype(np.int64)
    return idx[idx < num_frames]


def write_video(
    target: str | os.PathLike | BinaryIO,
    frames: np.ndarray | Iterable[np.ndarray],
    fps: float,
    *,
    crf: int = 18,
) -> None:
    """Write uint8 RGB frames ``[T, H, W, 3]`` as H.264 mp4 (H, W even). The bytes may differ from
    run to run (x264's threads); the decoded frames of a lossless encode (``crf=0``) do not."""
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got shape {tuple(frames.shape)}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}; map floats in [-1, 1] to 0..255 (tensor_to_frames)")
    t, h, w, _ = frames.shape
    if t == 0:
        raise ValueError("cannot write a video with zero frames")
    if h % 2 or w % 2:
        raise ValueError(f"H.264 needs even sizes, got {h}x{w}; crop or resize to even sizes")
    if isinstance(target, (str, os.PathLike)):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        target = str(target)
    container = av.open(target, mode="w", format="mp4")
    try:
        rate = Fraction(fps).limit_denominator(1001)
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()


def encode_video_bytes(frames: np.ndarray, fps: float, *, crf: int = 18) -> bytes:
    buf = io.BytesIO()
    write_video(buf, frames, fps, crf=crf)
    return buf.getvalue()


def frames_to_tensor(frames: np.ndarray):
    """uint8 frames ``[T, H, W, 3]`` (or one image ``[H, W, 3]``) -> float32 torch tensor
    ``[3, T, H, W]`` (``[3, H, W]``) in [-1, 1], the layout the VAE and the DiT take."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(frames)).float().div_(127.5).sub_(1.0)
    return x.permute(3, 0, 1, 2) if x.ndim == 4 else x.permute(2, 0, 1)


def tensor_to_frames(x) -> np.ndarray:
    """float torch tensor ``[3, T, H, W]`` (or ``[3, H, W]``) in [-1, 1] -> uint8 numpy
    ``[T, H, W, 3]`` (``[H, W, 3]``); values outside [-1, 1] are clipped."""
    import torch

    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return (x.permute(1, 2, 3, 0) if x.ndim == 4 else x.permute(1, 2, 0)).cpu().numpy()

