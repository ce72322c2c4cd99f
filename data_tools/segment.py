"""Character masks for replace mode: mediapipe selfie segmentation (embedded, CPU).

``CharacterSegmenter.masks(frames) -> bool [T, H, W]`` (True = character);
``background(frames, masks)`` blanks the character out: frame x (1 - mask).
"""

from __future__ import annotations

import cv2
import numpy as np


class CharacterSegmenter:
    def __init__(self, *, threshold: float = 0.5, dilate: int = 0, model_selection: int = 1):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"mask threshold must be in (0, 1), got {threshold}")
        try:
            import mediapipe as mp
        except ImportError as e:  # pragma: no cover - depends on the install
            raise RuntimeError("replace-mode masks need mediapipe: pip install -e '.[pose]'") from e
        self._seg = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=model_selection)
        self.threshold = threshold
        self.dilate = dilate

    def masks(self, frames: np.ndarray) -> np.ndarray:
        out = np.zeros(frames.shape[:3], bool)
        kernel = np.ones((2 * self.dilate + 1,) * 2, np.uint8) if self.dilate > 0 else None
        for t, frame in enumerate(frames):
            prob = self._seg.process(np.ascontiguousarray(frame)).segmentation_mask
            m = (prob > self.threshold).astype(np.uint8)
            if kernel is not None:
                m = cv2.dilate(m, kernel)
            out[t] = m > 0
        return out

    def close(self) -> None:
        self._seg.close()


def background(frames: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """frame x (1 - mask): the environment with the character blacked out. uint8 [T, H, W, 3]."""
    return (frames * (~masks[..., None])).astype(np.uint8)
