"""The pose backend interface every backend implements (see ``data_tools.pose.backends``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np

from data_tools.pose.format import PoseSequence


class PoseBackendError(RuntimeError):
    """A pose backend could not be created or run (missing model file, package, ...)."""


class PoseBackend(ABC):
    name = "base"

    @abstractmethod
    def extract(self, frames: np.ndarray, *, source: str | None = None,
                frame_indices=None, progress: Callable[[int], None] | None = None) -> PoseSequence:
        """Keypoints of every frame, in pixels of ``frames``. ``source`` (the video path) and
        ``frame_indices`` (which source frames these are) matter only to ``precomputed``.
        ``progress(n)``: called as frames finish (``n`` more; the calls sum to ``len(frames)``)."""

    def extract_image(self, image: np.ndarray) -> PoseSequence:
        """Keypoints of one still image (e.g. the reference), a 1-frame sequence."""
        return self.extract(np.asarray(image)[None])

    def close(self) -> None:
        pass


def check_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"pose backends take uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if len(frames) == 0:
        raise ValueError("pose backends need at least one frame")
    return frames
