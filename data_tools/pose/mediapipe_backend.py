"""The ``mediapipe`` pose backend: mediapipe holistic (body 33 -> OpenPose 20, face mesh 468 -> 68,
hands 2 x 21), embedded in the wheel, CPU."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from data_tools.pose.base import PoseBackend, PoseBackendError, check_frames
from data_tools.pose.format import NUM_BODY, NUM_FACE, NUM_HAND, PoseSequence
from data_tools.pose.quiet import import_mediapipe, native_stderr_filtered

# Mediapipe pose (33 points) -> our 20 OpenPose points. A tuple means the mean of the points.
MP_BODY_TO_OPENPOSE = (0, (11, 12), 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7, 31, 32)
# Face mesh (468) -> the 68 iBUG / dlib landmarks: jaw 17, brows 5 + 5, nose bridge 4,
# nose base 5, eyes 6 + 6, outer lips 12, inner lips 8.
MP_FACE_TO_68 = (
    162, 234, 93, 58, 172, 136, 149, 148, 152, 377, 378, 365, 397, 288, 323, 454, 389,
    71, 63, 105, 66, 107, 336, 296, 334, 293, 301,
    168, 197, 5, 4, 75, 97, 2, 326, 305,
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,
    78, 82, 13, 312, 308, 317, 14, 87,
)
assert len(MP_BODY_TO_OPENPOSE) == NUM_BODY and len(MP_FACE_TO_68) == NUM_FACE


def _landmarks_array(landmarks, n: int, width: int, height: int, use_visibility: bool) -> np.ndarray:
    out = np.zeros((n, 3), np.float32)  # undetected: all zero
    for i, lm in enumerate(landmarks.landmark[:n] if landmarks is not None else ()):
        out[i] = (lm.x * width, lm.y * height, float(lm.visibility) if use_visibility else 1.0)
    return out


class MediapipeBackend(PoseBackend):
    """Mediapipe holistic tracking (body 33 -> OpenPose 20, face mesh 468 -> 68, hands 2 x 21).

    Frames are downscaled so the longer side is at most ``max_side`` pixels (speed) and the
    keypoints are mapped back to the input frame's pixels. By default every frame is detected
    afresh (``static_image_mode=True``): on the sample clip, tracking mode locked onto a wrong body
    region from an early frame (neck above the chin on 2/3 of frames) while per-frame detection got
    it right on 95% at the same speed. A fresh holistic graph is made per ``extract`` call so no
    state leaks from one video into the next. Only ``model_complexity=1`` ships in the mediapipe
    wheel; 0 and 2 need a one-time model download by mediapipe.
    """

    name = "mediapipe"

    def __init__(self, *, model_complexity: int = 1, max_side: int = 640, min_detection_confidence: float = 0.5,
                 min_tracking_confidence: float = 0.5, static_image_mode: bool = True):
        mediapipe = import_mediapipe()
        if model_complexity not in (0, 1, 2):
            raise ValueError(f"model_complexity must be 0, 1 or 2, got {model_complexity}")
        if model_complexity != 1:
            model = Path(mediapipe.__file__).parent / "modules" / "pose_landmark" / (
                "pose_landmark_lite.tflite" if model_complexity == 0 else "pose_landmark_heavy.tflite")
            if not model.is_file():
                raise PoseBackendError(f"model_complexity={model_complexity} needs {model.name}, which is not in the "
                                       "mediapipe wheel (mediapipe downloads it on first use); use model_complexity=1")
        if max_side < 64:
            raise ValueError(f"max_side must be >= 64 pixels, got {max_side}")
        self.options = dict(model_complexity=model_complexity, min_detection_confidence=min_detection_confidence,
                            min_tracking_confidence=min_tracking_confidence)
        self.max_side = max_side
        self.static_image_mode = static_image_mode

    def _holistic(self, static: bool):
        mp = import_mediapipe()
        return mp.solutions.holistic.Holistic(static_image_mode=static, refine_face_landmarks=False,
                                              **self.options)

    def extract(self, frames, *, source=None, frame_indices=None, static: bool | None = None,
                progress=None) -> PoseSequence:
        frames = check_frames(frames)
        t_len, h, w = frames.shape[:3]
        scale = min(1.0, self.max_side / max(h, w))
        small = (max(int(round(w * scale)), 1), max(int(round(h * scale)), 1))
        pose = PoseSequence.empty(t_len, h, w)
        static = self.static_image_mode if static is None else static
        with native_stderr_filtered(), self._holistic(static) as tracker:
            for t, frame in enumerate(frames):
                img = frame if scale == 1.0 else cv2.resize(frame, small, interpolation=cv2.INTER_AREA)
                res = tracker.process(np.ascontiguousarray(img))
                pose33 = _landmarks_array(res.pose_landmarks, 33, w, h, use_visibility=True)
                for j, src in enumerate(MP_BODY_TO_OPENPOSE):
                    pose.body[t, j] = pose33[list(src)].mean(0) if isinstance(src, tuple) else pose33[src]
                if res.pose_landmarks is not None:
                    # The neck is the shoulders' midpoint; its score is the weaker shoulder's.
                    pose.body[t, 1, 2] = min(pose33[11, 2], pose33[12, 2])
                mesh = _landmarks_array(res.face_landmarks, 468, w, h, use_visibility=False)
                pose.face[t] = mesh[list(MP_FACE_TO_68)]
                pose.left_hand[t] = _landmarks_array(res.left_hand_landmarks, NUM_HAND, w, h, use_visibility=False)
                pose.right_hand[t] = _landmarks_array(res.right_hand_landmarks, NUM_HAND, w, h, use_visibility=False)
                if progress is not None:
                    progress(1)
        return pose

    def extract_image(self, image) -> PoseSequence:
        return self.extract(np.asarray(image)[None], static=True)
