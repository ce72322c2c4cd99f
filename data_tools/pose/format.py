"""The one keypoint format every pose backend produces and every consumer (renderer, face
cropper, retargeting, eval metrics) reads.

Per frame: 20 body points in OpenPose order, two hands of 21 points, 68 face landmarks. Each point
is ``(x, y, score)`` with x, y in **pixels** of the frame the keypoints belong to and score in
[0, 1]; a point that was not detected has score 0 (its x, y are then meaningless).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_BODY = 20
NUM_HAND = 21
NUM_FACE = 68
STREAMS = {"body": NUM_BODY, "left_hand": NUM_HAND, "right_hand": NUM_HAND, "face": NUM_FACE}  # name -> points

# OpenPose body order used by Wan-Animate's renderer (18 COCO-style points + 2 toes).
BODY_NAMES = (
    "nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist",
    "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear",
    "l_ear", "l_toe", "r_toe",
)


@dataclass
class PoseSequence:
    """Keypoints of T frames of one video. Arrays are float32 ``[T, N, 3]`` = (x, y, score)."""

    body: np.ndarray  # [T, 20, 3]
    left_hand: np.ndarray  # [T, 21, 3]
    right_hand: np.ndarray  # [T, 21, 3]
    face: np.ndarray  # [T, 68, 3]
    height: int
    width: int

    def __post_init__(self) -> None:
        for name, n in STREAMS.items():
            a = np.asarray(getattr(self, name), dtype=np.float32)
            if a.ndim != 3 or a.shape[1:] != (n, 3):
                raise ValueError(f"PoseSequence.{name} must be [T, {n}, 3], got {a.shape}")
            setattr(self, name, a)
        lengths = {len(a) for a in self.streams()}
        if len(lengths) != 1:
            raise ValueError(f"PoseSequence streams have different frame counts: {sorted(lengths)}")

    def __len__(self) -> int:
        return len(self.body)

    def streams(self) -> list[np.ndarray]:
        """body, left hand, right hand, face (the constructor's order)."""
        return [getattr(self, name) for name in STREAMS]

    @classmethod
    def empty(cls, num_frames: int, height: int, width: int) -> "PoseSequence":
        return cls(*(np.zeros((num_frames, n, 3), np.float32) for n in STREAMS.values()), height, width)

    def select(self, indices) -> "PoseSequence":
        idx = np.asarray(indices)
        return PoseSequence(*(a[idx] for a in self.streams()), self.height, self.width)

    # ---- geometry -------------------------------------------------------------------------
    def resized(self, height: int, width: int) -> "PoseSequence":
        """The same keypoints expressed in pixels of a frame resized to ``height x width``."""
        if (height, width) == (self.height, self.width):
            return self
        return self.transformed(width / self.width, height / self.height, 0.0, 0.0, height, width)

    def transformed(self, scale_x: float, scale_y: float, offset_x: float, offset_y: float,
                    height: int, width: int) -> "PoseSequence":
        """Keypoints after ``x' = x * scale_x + offset_x`` (same for y) into a new frame size."""
        arrays = [a.copy() for a in self.streams()]
        for a in arrays:
            a[..., 0] = a[..., 0] * scale_x + offset_x
            a[..., 1] = a[..., 1] * scale_y + offset_y
        return PoseSequence(*arrays, int(height), int(width))

    def person_detected(self, threshold: float = 0.5, min_points: int = 4) -> np.ndarray:
        """bool [T]: frames with at least ``min_points`` confident body points."""
        return (self.body[..., 2] >= threshold).sum(-1) >= min_points

    def face_detected(self, threshold: float = 0.5, min_points: int = 34) -> np.ndarray:
        """bool [T]: frames with at least half of the 68 face landmarks confident."""
        return (self.face[..., 2] >= threshold).sum(-1) >= min_points

    def to_dict(self) -> dict:
        """JSON-friendly form (rounded to 0.01 px / 0.001 score) stored in shard metadata."""
        return {"height": self.height, "width": self.width,
                **{name: np.round(getattr(self, name), 3).tolist() for name in STREAMS}}

    @classmethod
    def from_dict(cls, d: dict) -> "PoseSequence":
        return cls(*(np.asarray(d[name]) for name in STREAMS), int(d["height"]), int(d["width"]))

    def save_npz(self, path) -> None:
        np.savez_compressed(path, **{name: getattr(self, name) for name in STREAMS},
                            size=np.array([self.height, self.width]))

    @classmethod
    def load_npz(cls, path) -> "PoseSequence":
        with np.load(path, allow_pickle=False) as z:
            h, w = (int(v) for v in z["size"])
            return cls(*(z[name] for name in STREAMS), h, w)
