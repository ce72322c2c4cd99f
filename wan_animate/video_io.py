"""Video reading and writing shared by data_tools, the inference path, training and eval.

Frames are always ``uint8`` arrays ``[T, H, W, 3]`` (RGB). Writing produces H.264 (yuv420p) mp4,
which every player opens. Decoding errors raise ``VideoDecodeError`` naming the file, so callers
can skip and count bad inputs instead of crashing a whole job.
"""

from __future__ import annotations

import io
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
    height: int
    width: int


def _open(source: str | os.PathLike | bytes | BinaryIO):
    import av

    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    name = str(source) if isinstance(source, (str, os.PathLike)) else "<bytes>"
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if not p.exists():
            raise VideoDecodeError(f"{name}: file does not exist")
        if p.stat().st_size == 0:
            raise VideoDecodeError(f"{name}: zero-byte file")
    try:
        container = av.open(source if not isinstance(source, os.PathLike) else str(source))
    except Exception as e:  # av raises many error types (InvalidDataError, OSError, ...)
        raise VideoDecodeError(f"{name}: not a decodable video ({type(e).__name__}: {e})") from e
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{name}: contains no video stream")
    return container, name


def read_video(
    source: str | os.PathLike | bytes | BinaryIO,
    *,
    max_frames: int | None = None,
) -> tuple[np.ndarray, float]:
    """Decode a whole video. Returns ``(frames [T, H, W, 3] uint8, fps)``."""
    container, name = _open(source)
    try:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0.0) or 30.0
        frames = []
        try:
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
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
    return np.stack(frames), fps


def probe_video(source: str | os.PathLike | bytes) -> VideoInfo:
    """Frame count, fps and size; decodes the stream when the container has no frame count."""
    frames, fps = read_video(source)
    return VideoInfo(num_frames=len(frames), fps=fps, height=frames.shape[1], width=frames.shape[2])


def write_video(
    target: str | os.PathLike | BinaryIO,
    frames: np.ndarray | Iterable[np.ndarray],
    fps: float,
    *,
    crf: int = 18,
    deterministic: bool = False,
) -> None:
    """Write uint8 RGB frames ``[T, H, W, 3]`` as H.264 mp4. H and W must be even.

    ``deterministic=True`` encodes on one thread: multi-threaded x264 output (and so the decoded
    pixels) varies from run to run, which matters for byte-reproducible shards and tests.
    """
    import av

    frames = np.asarray(frames) if not isinstance(frames, np.ndarray) else frames
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got shape {tuple(frames.shape)}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}; convert with to_uint8()")
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
        if deterministic:
            stream.thread_count = 1
            stream.options = {**stream.options, "threads": "1"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()


def encode_video_bytes(frames: np.ndarray, fps: float, *, crf: int = 18, deterministic: bool = False) -> bytes:
    buf = io.BytesIO()
    write_video(buf, frames, fps, crf=crf, deterministic=deterministic)
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


def to_uint8(x) -> np.ndarray:
    """Float frames in [-1, 1] (torch or numpy, [T, H, W, 3]) -> uint8."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_float(frames: np.ndarray) -> np.ndarray:
    """uint8 frames -> float32 in [-1, 1]."""
    return frames.astype(np.float32) / 127.5 - 1.0
