"""Face boxes with the official rule (facts section 8) and the 512 x 512 face cropper.

Official rule per frame: the box of the 68 landmarks, area x1.3 (each side x sqrt(1.3)); width
grows symmetrically, height grows 3 parts up and 1 part down; clipped to the frame; the crop is
resized to 512 x 512 without keeping the aspect. We add temporal smoothing of the box (centre
and size, before clipping) so the crops do not jitter, and fill frames without a detected face
from their neighbours (or from the head points of the body) instead of failing the clip.
"""

from __future__ import annotations

import cv2
import numpy as np

from data_tools.pose.format import PoseSequence

FACE_AREA_SCALE = 1.3
HEAD_POINTS = (0, 14, 15, 16, 17)  # nose, eyes, ears in our OpenPose body


def official_face_box(landmarks_xy: np.ndarray, *, area_scale: float = FACE_AREA_SCALE) -> np.ndarray:
    """Unclipped face box [x0, y0, x1, y1] from landmark pixels [N, 2] (the official rule)."""
    x_min, y_min = landmarks_xy.min(0)
    x_max, y_max = landmarks_xy.max(0)
    w, h = max(x_max - x_min, 1e-3), max(y_max - y_min, 1e-3)
    grow = np.sqrt(area_scale)
    dw = (w * grow - w) / 2
    dh = (h * grow - h) / 4
    return np.array([x_min - dw, y_min - 3 * dh, x_max + dw, y_max + dh], np.float64)


def _head_box(body: np.ndarray, threshold: float) -> np.ndarray | None:
    """A face-sized box from the body's head points, for frames where the face mesh failed."""
    pts = body[list(HEAD_POINTS)]
    pts = pts[pts[:, 2] >= threshold, :2]
    if len(pts) < 2:
        return None
    span = np.ptp(pts, axis=0).max()
    size = max(span * 1.6, 8.0)
    cx, cy = pts.mean(0)
    return np.array([cx - size / 2, cy - size * 0.6, cx + size / 2, cy + size * 0.4], np.float64)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average along time with edge replication. values [T, C]."""
    if window <= 1 or len(values) < 2:
        return values
    half = window // 2
    padded = np.concatenate([np.repeat(values[:1], half, 0), values, np.repeat(values[-1:], half, 0)])
    kernel = np.ones(2 * half + 1) / (2 * half + 1)
    return np.stack([np.convolve(padded[:, c], kernel, mode="valid") for c in range(values.shape[1])], 1)


def face_boxes(pose: PoseSequence, *, threshold: float = 0.5, smooth_window: int = 5,
               area_scale: float = FACE_AREA_SCALE, min_landmarks: int = 10,
               return_source: bool = False):
    """Face boxes float [T, 4] (x0, y0, x1, y1, pixels of the pose's frame), clipped to the frame.

    Each frame uses its confident face landmarks (>= ``min_landmarks``); frames without them are
    interpolated between (or held from) the nearest landmark frames. Only a sequence with no
    landmarks at all falls back to boxes from the body's head points, and one with neither gets a
    box over the upper-middle of the frame. ``return_source=True`` also returns int8 [T]:
    2 = landmarks, 1 = head points, 0 = filled from neighbours / default.
    """
    t_len = len(pose)
    from_landmarks = np.full((t_len, 4), np.nan)
    from_head = np.full((t_len, 4), np.nan)
    for t in range(t_len):
        face = pose.face[t]
        ok = face[:, 2] >= threshold
        if ok.sum() >= min_landmarks:
            from_landmarks[t] = official_face_box(face[ok, :2], area_scale=area_scale)
        else:
            head = _head_box(pose.body[t], threshold)
            if head is not None:
                from_head[t] = head
    # Landmark boxes are far more reliable than head-point boxes, so frames without landmarks are
    # interpolated from landmark frames; head points are used only when no frame has landmarks.
    source = np.zeros(t_len, np.int8)
    for raw, level in ((from_landmarks, 2), (from_head, 1)):
        known = ~np.isnan(raw[:, 0])
        if known.any():
            source[known] = level
            break
    else:
        h, w = pose.height, pose.width
        side = min(h, w) / 3
        raw = np.tile([w / 2 - side / 2, h * 0.05, w / 2 + side / 2, h * 0.05 + side], (t_len, 1))
        known = np.ones(t_len, bool)
    idx = np.flatnonzero(known)  # missing frames: interpolated between / held from the nearest boxes
    raw = np.stack([np.interp(np.arange(t_len), idx, raw[idx, c]) for c in range(4)], 1)
    # Smooth centre and size (not corners) so the crop neither jitters nor breathes.
    centre = (raw[:, :2] + raw[:, 2:]) / 2
    size = raw[:, 2:] - raw[:, :2]
    centre, size = _smooth(centre, smooth_window), _smooth(size, smooth_window)
    frame = np.array([pose.width, pose.height])
    lo, hi = np.clip(centre - size / 2, 0, frame), np.clip(centre + size / 2, 0, frame)
    # Keep at least 2 px so a crop always exists.
    hi = np.maximum(hi, np.minimum(lo + 2, frame))
    lo = np.minimum(lo, hi - 2)
    boxes = np.concatenate([lo, hi], 1).astype(np.float32)
    return (boxes, source) if return_source else boxes


def crop_boxes(frames: np.ndarray, boxes: np.ndarray, size: int = 512) -> np.ndarray:
    """Crop integer-rounded boxes [T, 4] out of frames [T, H, W, 3] and resize to size x size."""
    out = np.empty((len(frames), size, size, 3), np.uint8)
    for t, (frame, box) in enumerate(zip(frames, boxes)):
        x0, y0, x1, y1 = (int(v) for v in np.round(box))
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
        crop = frame[y0:y1, x0:x1]
        interp = cv2.INTER_AREA if crop.shape[0] > size else cv2.INTER_LINEAR
        out[t] = cv2.resize(crop, (size, size), interpolation=interp)
    return out


def crop_faces(frames: np.ndarray, pose: PoseSequence, size: int = 512, *, boxes: np.ndarray | None = None,
               **box_options) -> tuple[np.ndarray, np.ndarray]:
    """Face crops uint8 [T, size, size, 3] and their boxes float [T, 4] in pixels of ``frames``.

    ``pose`` may be in any frame size; it is rescaled to the frames first.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.shape}")
    if len(frames) != len(pose):
        raise ValueError(f"frames ({len(frames)}) and pose ({len(pose)}) have different frame counts")
    h, w = frames.shape[1:3]
    if boxes is None:
        boxes = face_boxes(pose.resized(h, w), **box_options)
    return crop_boxes(frames, boxes, size), np.asarray(boxes, np.float32)
