"""One home for frame geometry (data preparation, training, evaluation and inference alike):
resolution buckets, resize + centre-crop, letterbox, on numpy frames and on torch tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

RESIZE_MODES = ("crop", "letterbox")


# ---- buckets
def area_bucket(src_h: int, src_w: int, target_area: int, multiple: int = 16) -> tuple[int, int]:
    """Official rule: h = sqrt(area / aspect), w = area / h, each floored to a multiple of 16."""
    aspect = src_w / src_h
    h = math.sqrt(target_area / aspect)
    w = target_area / h
    return max(int(h // multiple) * multiple, multiple), max(int(w // multiple) * multiple, multiple)


def nearest_bucket(height: int, width: int, buckets: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The ``(h, w)`` bucket with the nearest log aspect ratio; ties -> larger area, then first listed
    (so the choice never depends on how equally good buckets happen to be ordered)."""
    if not buckets:
        raise ValueError("nearest_bucket needs at least one (h, w) bucket")
    aspect = math.log(height / width)
    cands = [(int(b[0]), int(b[1])) for b in buckets]
    # distances rounded so that mirrored buckets (480x832 / 832x480 for a square clip) tie exactly
    return min(cands, key=lambda b: (round(abs(math.log(b[0] / b[1]) - aspect), 9), -b[0] * b[1]))


def choose_bucket(src_h: int, src_w: int, target_area: int, buckets=()) -> tuple[int, int]:
    """``nearest_bucket`` among ``buckets``, or the area rule when there are none."""
    return nearest_bucket(src_h, src_w, buckets) if buckets else area_bucket(src_h, src_w, target_area)


# ---- numpy / OpenCV frames
@dataclass
class ResizePlan:
    """Source frame -> target (h, w): scale to cover and centre-crop (``"crop"``, offset < 0) or to
    fit and centre on black (``"letterbox"``, offset > 0); maps frames, keypoints and boxes alike.

    The binding side gets the target size exactly; the free side is rounded by ``rounding``:
    ``"round"`` (default) or ``"floor"`` (the official letterbox).
    ``interpolation``: ``"auto"`` (area when shrinking, bilinear when enlarging) or ``"linear"``.
    """

    src_h: int
    src_w: int
    h: int
    w: int
    mode: str = "crop"
    rounding: str = "round"
    interpolation: str = "auto"

    def __post_init__(self):
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"resize mode={self.mode!r}: choose one of {RESIZE_MODES}")
        if self.rounding not in ("round", "floor") or self.interpolation not in ("auto", "linear"):
            raise ValueError(f"rounding={self.rounding!r} / interpolation={self.interpolation!r}: "
                             "choose round|floor and auto|linear")
        taller = self.src_h / self.src_w > self.h / self.w
        # crop covers the target (the wider side binds), letterbox fits it (the taller side binds)
        height_binds = taller if self.mode == "letterbox" else not taller
        fit = max if self.mode == "crop" else min
        self.scale = fit(self.h / self.src_h, self.w / self.src_w)
        free = (lambda v: int(v)) if self.rounding == "floor" else (lambda v: int(round(v)))
        if height_binds:
            self.rh, self.rw = self.h, max(free(self.h / self.src_h * self.src_w), 1)
        else:
            self.rh, self.rw = max(free(self.w / self.src_w * self.src_h), 1), self.w
        self.offset_x = (self.w - self.rw) // 2
        self.offset_y = (self.h - self.rh) // 2

    def apply(self, frame: np.ndarray) -> np.ndarray:
        import cv2

        shrink = self.interpolation == "auto" and self.scale < 1
        img = cv2.resize(frame, (self.rw, self.rh), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        img = img.reshape(self.rh, self.rw, *frame.shape[2:])  # cv2 drops a trailing channel axis of size 1
        out = np.zeros((self.h, self.w) + frame.shape[2:], frame.dtype)
        sx, sy = max(-self.offset_x, 0), max(-self.offset_y, 0)
        dx, dy = max(self.offset_x, 0), max(self.offset_y, 0)
        cw, ch = min(self.rw - sx, self.w - dx), min(self.rh - sy, self.h - dy)
        out[dy:dy + ch, dx:dx + cw] = img[sy:sy + ch, sx:sx + cw]
        return out

    def apply_all(self, frames: np.ndarray) -> np.ndarray:
        return np.stack([self.apply(f) for f in frames])

    def pose(self, pose):
        """Map a keypoint sequence (anything with ``.resized(h, w)`` and ``.transformed(sx, sy, dx,
        dy, h, w)``, e.g. ``data_tools.pose.format.PoseSequence``) into the target frame."""
        p = pose.resized(self.src_h, self.src_w)
        return p.transformed(self.scale, self.scale, self.offset_x, self.offset_y, self.h, self.w)

    def boxes(self, boxes: np.ndarray) -> np.ndarray:
        offset = [self.offset_x, self.offset_y] * 2  # x0, y0, x1, y1
        return (np.asarray(boxes, np.float64) * self.scale + offset).astype(np.float32)


def letterbox(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fit ``image`` inside ``height x width`` keeping its aspect, centred on black (official
    reference preprocessing: free side floored, bilinear)."""
    return ResizePlan(image.shape[0], image.shape[1], height, width, "letterbox", rounding="floor",
                      interpolation="linear").apply(image)


# ---- torch tensors
def crop_box_map(h: int, w: int, size: tuple[int, int]) -> tuple[float, int, int]:
    """``(scale, top, left)`` of ``resize_crop_tensor`` from ``(h, w)`` to ``size``, for mapping
    pixel boxes: ``x' = x * scale - left``."""
    th, tw = size
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    return scale, (nh - th) // 2, (nw - tw) // 2


def resize_crop_tensor(x, size: tuple[int, int], mode: str = "bilinear"):
    """Resize ``x [..., H, W]`` to cover ``size`` then centre-crop to it (antialiased bilinear, or
    ``mode="nearest"`` for masks). Returns float."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    th, tw = size
    if (h, w) == (th, tw):
        return x
    scale, top, left = crop_box_map(h, w, size)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    smooth = {} if mode == "nearest" else dict(align_corners=False, antialias=True)
    flat = F.interpolate(x.reshape(-1, 1, h, w).float(), size=(nh, nw), mode=mode, **smooth)
    return flat[..., top: top + th, left: left + tw].reshape(*x.shape[:-2], th, tw)
