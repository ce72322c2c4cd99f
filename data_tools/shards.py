"""Writing shards: one sample (schema version 1, or 2 with a driving video) as webdataset fields, and
an atomic tar writer. The schema and the readers live in ``wan_animate.samples``; fields: docs/data.md.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from wan_animate.files import dumps_strict
from wan_animate.samples import DRIVING_FIELD, SHARD_PATTERN, sample_schema_version
from wan_animate.video_io import encode_video_bytes


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def safe_key(text: str) -> str:
    """A webdataset key: no dots (webdataset splits the member name at the first dot) or slashes."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "sample"


def encode_sample(key: str, *, target: np.ndarray, pose: np.ndarray, face: np.ndarray, ref: np.ndarray,
                  meta: dict, caption: str, fps: float, bg: np.ndarray | None = None,
                  mask: np.ndarray | None = None, driving: np.ndarray | None = None,
                  crf: int = 18) -> dict[str, bytes]:
    """One sample as ``{field: bytes}`` (plus ``__key__``). Checks the streams line up.

    target/pose/bg/driving uint8 [T, H, W, 3]; face uint8 [T, S, S, 3]; ref uint8 [H, W, 3];
    mask uint8 or bool [T, H, W] (nonzero = character). ``driving`` (the same motion performed by
    another appearance) makes it a schema-version-2 sample; without it the sample is version 1.
    """
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must not contain '.' or '/'; use safe_key()")
    t, h, w, _ = target.shape
    if h % 16 or w % 16:
        raise ValueError(f"{key}: target size {h}x{w} must be multiples of 16")
    for name, video in (("pose", pose), ("driving", driving)):
        if video is not None and video.shape != target.shape:
            raise ValueError(f"{key}: {name} video {video.shape} differs from target {target.shape}")
    if len(face) != t or face.shape[1] != face.shape[2]:
        raise ValueError(f"{key}: face crops {face.shape} must be [T={t}, S, S, 3]")
    if ref.shape != (h, w, 3):
        raise ValueError(f"{key}: reference {ref.shape} must be {(h, w, 3)}")
    if (bg is None) != (mask is None):
        raise ValueError(f"{key}: replace mode needs both bg and mask")
    meta = dict(meta)
    meta.update(schema_version=sample_schema_version(driving is not None), num_frames=int(t), height=int(h), width=int(w),
                face_size=int(face.shape[1]), fps=float(fps), caption=caption, replace=bg is not None)
    sample = {
        "__key__": key,
        "mp4": encode_video_bytes(target, fps, crf=crf),
        "pose.mp4": encode_video_bytes(pose, fps, crf=crf),
        "face.mp4": encode_video_bytes(face, fps, crf=crf),
        "ref.png": png_bytes(ref),
        "json": dumps_strict(meta).encode(),
        "txt": caption.encode(),
    }
    if driving is not None:
        sample[DRIVING_FIELD] = encode_video_bytes(driving, fps, crf=crf)
    if bg is not None:
        if bg.shape != target.shape or mask.shape[:3] != (t, h, w):
            raise ValueError(f"{key}: bg {bg.shape} / mask {mask.shape} must match target {target.shape}")
        m = (np.asarray(mask) > 0).astype(np.uint8) * 255
        sample["bg.mp4"] = encode_video_bytes(bg, fps, crf=crf)
        sample["mask.mp4"] = encode_video_bytes(np.repeat(m[..., None], 3, -1), fps, crf=crf)
    return sample


def add_members(tar: tarfile.TarFile, key: str, members: dict[str, bytes], mtime: float | None = None) -> None:
    """``<key>.<field>`` members of one sample (``mtime`` fixed: byte-reproducible shards)."""
    now = time.time() if mtime is None else mtime
    for field, data in members.items():
        info = tarfile.TarInfo(f"{key}.{field}")
        info.size = len(data)
        info.mtime = now
        tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes samples into ``shard-NNNNNN.tar`` files of ``shard_size`` samples each.

    A shard is written as ``shard-NNNNNN.tar.tmp`` and renamed only when it is complete, so a
    killed job never leaves a partial ``.tar``. ``on_shard_done(path, keys)`` runs after each
    rename (prepare uses it to record progress for resuming).
    """

    def __init__(self, output_dir: str | os.PathLike, *, shard_size: int = 64, start_index: int = 0,
                 on_shard_done=None, mtime: float | None = None):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.index = start_index
        self.on_shard_done = on_shard_done
        self.mtime = mtime  # a fixed member mtime makes shards byte-reproducible
        self._tar: tarfile.TarFile | None = None
        self._keys: list[str] = []
        self.shards_written: list[Path] = []

    def write(self, sample: dict[str, bytes]) -> None:
        if self._tar is None:  # a new shard
            self._tmp = self.output_dir / (SHARD_PATTERN.format(self.index) + ".tmp")
            self._tar = tarfile.open(self._tmp, "w")  # self._keys is [] whenever no shard is open
        key = sample["__key__"]
        add_members(self._tar, key, {k: v for k, v in sample.items() if not k.startswith("__")}, self.mtime)
        self._keys.append(key)
        if len(self._keys) >= self.shard_size:
            self._finish()

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        with open(self._tmp, "rb") as f:
            os.fsync(f.fileno())
        final = self._tmp.with_suffix("")  # drop ".tmp"
        os.replace(self._tmp, final)
        self.shards_written.append(final)
        keys, self._tar, self._keys = self._keys, None, []
        self.index += 1
        if self.on_shard_done is not None:
            self.on_shard_done(final, keys)

    def close(self) -> None:
        """Finish the last (possibly short) shard."""
        if self._tar is not None and self._keys:
            self._finish()
        elif self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
