"""Pose backends. Every backend turns RGB frames uint8 [T, H, W, 3] into a ``PoseSequence`` in
pixels of those frames (20 OpenPose body points, 2 x 21 hand points, 68 face landmarks).

- ``mediapipe``   : the embedded default (mediapipe 0.10.21 holistic; no download, CPU).
- ``vitpose``     : the official ONNX pair (YOLOv10m person detector + ViTPose-H WholeBody).
- ``precomputed`` : keypoints supplied by the user (PoseSequence NPZ / JSON).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path

import cv2
import numpy as np

from data_tools.pose.format import NUM_BODY, NUM_FACE, NUM_HAND, PoseSequence
from data_tools.pose.quiet import import_mediapipe, native_stderr_filtered


class PoseBackendError(RuntimeError):
    """A pose backend could not be created or run (missing model file, package, ...)."""


class PoseBackend(ABC):
    name = "base"

    @abstractmethod
    def extract(self, frames: np.ndarray, *, source: str | None = None,
                frame_indices=None) -> PoseSequence:
        """Keypoints of every frame, in pixels of ``frames``. ``source`` (the video path) and
        ``frame_indices`` (which source frames these are) matter only to ``precomputed``."""

    def extract_image(self, image: np.ndarray) -> PoseSequence:
        """Keypoints of one still image (e.g. the reference), a 1-frame sequence."""
        return self.extract(np.asarray(image)[None])

    def close(self) -> None:
        pass


def _check_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"pose backends take uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if len(frames) == 0:
        raise ValueError("pose backends need at least one frame")
    return frames


# =============================================================================================
# mediapipe
# =============================================================================================
# Mediapipe pose (33 points) -> our 20 OpenPose points. A tuple means the mean of the points.
MP_BODY_TO_OPENPOSE = (
    0, (11, 12), 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7, 31, 32,
)
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
    out = np.zeros((n, 3), np.float32)
    if landmarks is None:
        return out
    for i, lm in enumerate(landmarks.landmark[:n]):
        score = float(lm.visibility) if use_visibility else 1.0
        out[i] = (lm.x * width, lm.y * height, score)
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
                 min_tracking_confidence: float = 0.5, static_image_mode: bool = True, **unused):
        if unused:
            raise TypeError(f"unknown mediapipe backend options {sorted(unused)}; valid: model_complexity, "
                            "max_side, min_detection_confidence, min_tracking_confidence, static_image_mode")
        try:
            mediapipe = import_mediapipe()
        except ImportError as e:  # pragma: no cover - depends on the install
            raise PoseBackendError("the mediapipe pose backend needs mediapipe: pip install -e '.[pose]'") from e
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

    def extract(self, frames, *, source=None, frame_indices=None, static: bool | None = None) -> PoseSequence:
        frames = _check_frames(frames)
        t_len, h, w = frames.shape[:3]
        scale = min(1.0, self.max_side / max(h, w))
        small = (max(int(round(w * scale)), 1), max(int(round(h * scale)), 1))
        body = np.zeros((t_len, NUM_BODY, 3), np.float32)
        lhand = np.zeros((t_len, NUM_HAND, 3), np.float32)
        rhand = np.zeros((t_len, NUM_HAND, 3), np.float32)
        face = np.zeros((t_len, NUM_FACE, 3), np.float32)
        static = self.static_image_mode if static is None else static
        with native_stderr_filtered(), self._holistic(static) as tracker:
            for t, frame in enumerate(frames):
                img = frame if scale == 1.0 else cv2.resize(frame, small, interpolation=cv2.INTER_AREA)
                res = tracker.process(np.ascontiguousarray(img))
                pose33 = _landmarks_array(res.pose_landmarks, 33, w, h, use_visibility=True)
                for j, src in enumerate(MP_BODY_TO_OPENPOSE):
                    body[t, j] = pose33[list(src)].mean(0) if isinstance(src, tuple) else pose33[src]
                if res.pose_landmarks is not None:
                    # The neck is the shoulders' midpoint; its score is the weaker shoulder's.
                    body[t, 1, 2] = min(pose33[11, 2], pose33[12, 2])
                mesh = _landmarks_array(res.face_landmarks, 468, w, h, use_visibility=False)
                face[t] = mesh[list(MP_FACE_TO_68)]
                lhand[t] = _landmarks_array(res.left_hand_landmarks, NUM_HAND, w, h, use_visibility=False)
                rhand[t] = _landmarks_array(res.right_hand_landmarks, NUM_HAND, w, h, use_visibility=False)
        return PoseSequence(body, lhand, rhand, face, h, w)

    def extract_image(self, image) -> PoseSequence:
        return self.extract(np.asarray(image)[None], static=True)


# =============================================================================================
# vitpose (official ONNX pair)
# =============================================================================================
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# COCO-WholeBody (133) -> our 20 body points: mean of the two listed points (same point twice =
# that point). Neck = mean of the shoulders; toes = mean of the big and small toe.
WHOLEBODY_BODY_PAIRS = (
    (0, 0), (5, 6), (6, 6), (8, 8), (10, 10), (5, 5), (7, 7), (9, 9), (12, 12), (14, 14), (16, 16),
    (11, 11), (13, 13), (15, 15), (2, 2), (1, 1), (4, 4), (3, 3), (17, 18), (20, 21),
)
WHOLEBODY_FACE = slice(23, 91)
WHOLEBODY_LEFT_HAND = slice(91, 112)
WHOLEBODY_RIGHT_HAND = slice(112, 133)


def wholebody_to_pose(kps: np.ndarray, height: int, width: int) -> PoseSequence:
    """COCO-WholeBody keypoints float [T, 133, 3] (pixels, score) -> PoseSequence."""
    kps = np.asarray(kps, np.float32)
    a = kps[:, [p[0] for p in WHOLEBODY_BODY_PAIRS]]
    b = kps[:, [p[1] for p in WHOLEBODY_BODY_PAIRS]]
    body = (a + b) / 2
    return PoseSequence(body, kps[:, WHOLEBODY_LEFT_HAND], kps[:, WHOLEBODY_RIGHT_HAND], kps[:, WHOLEBODY_FACE],
                        height, width)


def _onnx_session(path: str | Path, device: str):
    import onnxruntime as ort

    path = Path(path)
    if path.is_dir():  # the official pose2d checkpoint is a folder holding end2end.onnx
        path = path / "end2end.onnx"
    if not path.is_file():
        raise PoseBackendError(f"ONNX model not found: {path}; set the vitpose backend's detector_path / pose_path")
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise PoseBackendError("device=cuda asked for, but onnxruntime has no CUDAExecutionProvider; "
                                   "install onnxruntime-gpu or use device=cpu")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), providers=providers)


def nms_boxes(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS on xyxy boxes (OpenCV's ``cv2.dnn.NMSBoxes``); returns kept indices, best first.
    A box is dropped when its IoU with a kept, higher-scoring box is above ``iou``."""
    boxes = np.asarray(boxes, np.float64)
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:4] - boxes[:, :2]], 1)
    # OpenCV keeps scores > score_threshold (>= 0); the caller has already applied its confidence
    # threshold, so shift the scores above 0 (order-preserving in float64) to keep every box.
    scores = np.asarray(scores, np.float64)
    keep = cv2.dnn.NMSBoxes(xywh.tolist(), (scores - scores.min() + 1.0).tolist(), 0.0, float(iou))
    return np.asarray(keep, np.int64).reshape(-1)


def decode_detections(output: np.ndarray, frame_hw: tuple[int, int], input_hw: tuple[int, int], *,
                      conf: float = 0.05, iou: float = 0.5, person_class: int = 0) -> np.ndarray | None:
    """Largest person box [x0, y0, x1, y1, score] in frame pixels from one YOLO output, or None.

    Accepts the end-to-end YOLOv10 layout [N, 6] (x0, y0, x1, y1, score, class) and the raw YOLOv8
    layout [84, N] (cx, cy, w, h, 80 class scores).
    """
    out = np.squeeze(np.asarray(output, np.float32), 0) if output.ndim == 3 else np.asarray(output, np.float32)
    if out.ndim != 2:
        raise ValueError(f"unexpected detector output shape {output.shape}")
    if out.shape[-1] == 6:
        boxes, scores, classes = out[:, :4].copy(), out[:, 4], out[:, 5]
    elif out.shape[0] == 84:
        out = out.T
        class_scores = out[:, 4:]
        classes = class_scores.argmax(-1)
        scores = class_scores.max(-1)
        cx, cy, bw, bh = out[:, 0], out[:, 1], out[:, 2], out[:, 3]
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
    else:
        raise ValueError(f"unexpected detector output shape {output.shape}: want [N, 6] or [84, N]")
    sy, sx = frame_hw[0] / input_hw[0], frame_hw[1] / input_hw[1]
    boxes[:, [0, 2]] *= sx
    boxes[:, [1, 3]] *= sy
    ok = (scores >= conf) & (np.round(classes) == person_class)
    boxes, scores = boxes[ok], scores[ok]
    if len(boxes) == 0:
        return None
    keep = nms_boxes(boxes, scores, iou)
    boxes, scores = boxes[keep], scores[keep]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    i = int(np.argmax(areas))
    return np.array([*boxes[i], scores[i]], np.float32)


def person_crop_params(box: np.ndarray, input_hw=(256, 192), rescale: float = 1.25):
    """Centre (x, y) and crop size (w, h) in pixels for the top-down pose model: the box grown to
    the model's aspect and scaled by ``rescale`` (1.25)."""
    in_h, in_w = input_hw
    aspect = in_h / in_w
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    size = max((box[2] - box[0]) * aspect, box[3] - box[1]) * rescale
    return np.array([cx, cy], np.float64), np.array([size / aspect, size], np.float64)


def crop_person(frame: np.ndarray, centre, crop_wh, input_hw=(256, 192)) -> np.ndarray:
    """Affine crop (zero padding) of the region centred at ``centre`` with size ``crop_wh`` to
    the model input, normalised with ImageNet mean/std -> float32 [3, H, W]."""
    in_h, in_w = input_hw
    sx, sy = in_w / crop_wh[0], in_h / crop_wh[1]
    m = np.array([[sx, 0, in_w / 2 - centre[0] * sx], [0, sy, in_h / 2 - centre[1] * sy]], np.float64)
    crop = cv2.warpAffine(frame, m, (in_w, in_h), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
    x = crop.astype(np.float32) / 255.0
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _blur_heatmaps(heatmaps: np.ndarray, kernel: int) -> np.ndarray:
    """Gaussian-modulate each heatmap (DARK), keeping its original maximum."""
    out = heatmaps.copy()
    border = (kernel - 1) // 2
    for n in range(out.shape[0]):
        for k in range(out.shape[1]):
            hm = out[n, k]
            peak = hm.max()
            padded = cv2.copyMakeBorder(hm, border, border, border, border, cv2.BORDER_CONSTANT, value=0)
            blurred = cv2.GaussianBlur(padded, (kernel, kernel), 0)[border:-border, border:-border]
            out[n, k] = blurred * (peak / max(blurred.max(), 1e-12))
    return out


def decode_heatmaps(heatmaps: np.ndarray, centres: np.ndarray, crop_whs: np.ndarray, *,
                    kernel: int = 11) -> np.ndarray:
    """Top-down heatmaps [N, K, h, w] -> keypoints [N, K, 3] (x, y, score) in frame pixels.

    Arg-max, then the distribution-aware (DARK) sub-pixel refinement: log of the Gaussian-
    modulated heatmap, one Newton step from its local derivative and Hessian; then the
    heatmap -> crop -> frame transform.
    """
    heatmaps = np.asarray(heatmaps, np.float32)
    n, k, h, w = heatmaps.shape
    flat = heatmaps.reshape(n, k, -1)
    idx = flat.argmax(-1)
    scores = flat.max(-1)
    preds = np.stack([idx % w, idx // w], -1).astype(np.float64)
    log_hm = np.log(np.maximum(_blur_heatmaps(heatmaps, kernel), 1e-10)).astype(np.float64)
    for i in range(n):
        for j in range(k):
            px, py = int(preds[i, j, 0]), int(preds[i, j, 1])
            if not (1 < px < w - 2 and 1 < py < h - 2):
                continue
            hm = log_hm[i, j]
            dx = 0.5 * (hm[py, px + 1] - hm[py, px - 1])
            dy = 0.5 * (hm[py + 1, px] - hm[py - 1, px])
            dxx = 0.25 * (hm[py, px + 2] - 2 * hm[py, px] + hm[py, px - 2])
            dyy = 0.25 * (hm[py + 2, px] - 2 * hm[py, px] + hm[py - 2, px])
            dxy = 0.25 * (hm[py + 1, px + 1] - hm[py - 1, px + 1] - hm[py + 1, px - 1] + hm[py - 1, px - 1])
            det = dxx * dyy - dxy * dxy
            if det != 0:
                preds[i, j, 0] -= (dyy * dx - dxy * dy) / det
                preds[i, j, 1] -= (dxx * dy - dxy * dx) / det
    preds[..., 0] = preds[..., 0] * (crop_whs[:, None, 0] / w) + centres[:, None, 0] - crop_whs[:, None, 0] / 2
    preds[..., 1] = preds[..., 1] * (crop_whs[:, None, 1] / h) + centres[:, None, 1] - crop_whs[:, None, 1] / 2
    preds = np.where(scores[..., None] > 0, preds, -1.0)
    return np.concatenate([preds, scores[..., None]], -1).astype(np.float32)


class VitPoseBackend(PoseBackend):
    """The official ONNX pair: YOLOv10m person detector (640 x 640, conf 0.05, NMS IoU 0.5, largest
    person box, full frame when none) and ViTPose-H WholeBody (box x1.25, 256 x 192 crop,
    133 COCO-WholeBody keypoints) run with onnxruntime on CPU or CUDA."""

    name = "vitpose"

    def __init__(self, *, detector_path: str | None = None, pose_path: str | None = None, device: str = "cpu",
                 batch_size: int = 16, det_conf: float = 0.05, det_iou: float = 0.5, box_rescale: float = 1.25,
                 **unused):
        if unused:
            raise TypeError(f"unknown vitpose backend options {sorted(unused)}; valid: detector_path, pose_path, "
                            "device, batch_size, det_conf, det_iou, box_rescale")
        if pose_path is None:
            raise PoseBackendError("the vitpose backend needs pose_path (process_checkpoint/pose2d/"
                                   "vitpose_h_wholebody.onnx, a folder holding end2end.onnx, or a .onnx file)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.detector = _onnx_session(detector_path, device) if detector_path else None
        self.pose = _onnx_session(pose_path, device)
        self.det_conf, self.det_iou, self.box_rescale, self.batch_size = det_conf, det_iou, box_rescale, batch_size
        shape = self.pose.get_inputs()[0].shape
        self.pose_input_hw = (int(shape[2]) if isinstance(shape[2], int) else 256,
                              int(shape[3]) if isinstance(shape[3], int) else 192)
        if self.detector is not None:
            dshape = self.detector.get_inputs()[0].shape
            self.det_input_hw = (int(dshape[2]) if isinstance(dshape[2], int) else 640,
                                 int(dshape[3]) if isinstance(dshape[3], int) else 640)
        self.last_detected = np.zeros(0, bool)

    def detect(self, frame: np.ndarray) -> np.ndarray | None:
        h, w = frame.shape[:2]
        in_h, in_w = self.det_input_hw
        x = cv2.resize(frame, (in_w, in_h)).astype(np.float32).transpose(2, 0, 1)[None] / 255.0
        out = self.detector.run(None, {self.detector.get_inputs()[0].name: np.ascontiguousarray(x)})[0]
        return decode_detections(out, (h, w), (in_h, in_w), conf=self.det_conf, iou=self.det_iou)

    def extract(self, frames, *, source=None, frame_indices=None) -> PoseSequence:
        frames = _check_frames(frames)
        t_len, h, w = frames.shape[:3]
        centres, whs, inputs = [], [], []
        detected = np.zeros(t_len, bool)
        for t, frame in enumerate(frames):
            box = self.detect(frame) if self.detector is not None else None
            too_small = box is not None and (box[2] - box[0] < 10 or box[3] - box[1] < 10)
            if box is None or too_small:
                box = np.array([0, 0, w, h, 0], np.float32)  # the official full-frame fallback
            else:
                detected[t] = True
            c, wh = person_crop_params(box, self.pose_input_hw, self.box_rescale)
            centres.append(c)
            whs.append(wh)
            inputs.append(crop_person(frame, c, wh, self.pose_input_hw))
        name = self.pose.get_inputs()[0].name
        kps = []
        for s in range(0, t_len, self.batch_size):
            heat = self.pose.run(None, {name: np.stack(inputs[s:s + self.batch_size])})[0]
            kps.append(decode_heatmaps(heat, np.stack(centres[s:s + self.batch_size]),
                                       np.stack(whs[s:s + self.batch_size])))
        kps = np.concatenate(kps)
        if kps.shape[1] != 133:
            raise PoseBackendError(f"the pose model returned {kps.shape[1]} keypoints; the vitpose backend needs "
                                   "a COCO-WholeBody model with 133")
        self.last_detected = detected
        return wholebody_to_pose(kps, h, w)


# =============================================================================================
# precomputed
# =============================================================================================
def load_keypoints(path: str | Path) -> PoseSequence:
    """A PoseSequence from ``.npz`` (``PoseSequence.save_npz``) or ``.json`` (``to_dict``)."""
    path = Path(path)
    if path.suffix == ".npz":
        return PoseSequence.load_npz(path)
    if path.suffix == ".json":
        with open(path) as f:
            data = json.load(f)
        return PoseSequence.from_dict(data.get("keypoints", data))
    raise PoseBackendError(f"{path}: precomputed keypoints must be .npz or .json")


class PrecomputedBackend(PoseBackend):
    """Keypoints and/or ready pose / face videos the user computed elsewhere.

    ``path``: one keypoint file, or a folder holding ``<video stem>.npz`` / ``<video stem>.json``
    per video (matched through ``source``); keypoints are per source frame and ``frame_indices``
    selects the frames that were kept. ``videos``: a folder holding ``<video stem>.pose.mp4`` and
    ``<video stem>.face.mp4`` with one frame per source frame; ``prepare`` then uses these streams
    instead of rendering / cropping (with ``path`` too, the keypoints still go into the json).
    """

    name = "precomputed"

    def __init__(self, *, path: str | None = None, videos: str | None = None, **unused):
        if unused:
            raise TypeError(f"unknown precomputed backend options {sorted(unused)}; valid: path, videos")
        if path is None and videos is None:
            raise PoseBackendError("the precomputed backend needs path= (keypoint file or folder) and/or "
                                   "videos= (folder of <stem>.pose.mp4 + <stem>.face.mp4)")
        self.path = Path(path) if path is not None else None
        self.videos = Path(videos) if videos is not None else None
        for p in (self.path, self.videos):
            if p is not None and not p.exists():
                raise PoseBackendError(f"precomputed input not found: {p}")
        if self.videos is not None and not self.videos.is_dir():
            raise PoseBackendError(f"videos={self.videos} must be a folder of <stem>.pose.mp4 / <stem>.face.mp4")

    @property
    def has_keypoints(self) -> bool:
        return self.path is not None

    def video_paths(self, source) -> tuple[Path, Path]:
        """(pose video, face video) for one input video; raises when either is missing."""
        stem = Path(source).stem
        pose, face = self.videos / f"{stem}.pose.mp4", self.videos / f"{stem}.face.mp4"
        missing = [str(p) for p in (pose, face) if not p.is_file()]
        if missing:
            raise PoseBackendError(f"no ready pose/face videos for {source}: missing {missing}")
        return pose, face

    def _file_for(self, source) -> Path:
        if self.path.is_file():
            return self.path
        if source is None:
            raise PoseBackendError(f"{self.path} is a folder; extract() needs source= (the video path) to pick a file")
        stem = Path(source).stem
        for ext in (".npz", ".json"):
            if (self.path / f"{stem}{ext}").is_file():
                return self.path / f"{stem}{ext}"
        raise PoseBackendError(f"no precomputed keypoints for {source}: expected {self.path}/{stem}.npz or .json")

    def extract(self, frames, *, source=None, frame_indices=None) -> PoseSequence:
        frames = _check_frames(frames)
        if self.path is None:
            raise PoseBackendError("this precomputed backend has ready videos but no keypoints (path=); "
                                   "keypoints cannot be extracted from it")
        pose = load_keypoints(self._file_for(source))
        if frame_indices is not None:
            idx = np.asarray(frame_indices)
            if idx.max() >= len(pose):
                raise PoseBackendError(f"precomputed keypoints have {len(pose)} frames, frame index {idx.max()} asked")
            pose = pose.select(idx)
        if len(pose) != len(frames):
            raise PoseBackendError(f"precomputed keypoints have {len(pose)} frames for {len(frames)} video frames; "
                                   "give keypoints for every source frame")
        return pose.resized(frames.shape[1], frames.shape[2])


BACKENDS = {"mediapipe": MediapipeBackend, "vitpose": VitPoseBackend, "precomputed": PrecomputedBackend}


def get_pose_backend(name: str, **options) -> PoseBackend:
    """Create a pose backend by name: "mediapipe", "vitpose" or "precomputed"."""
    if name not in BACKENDS:
        raise ValueError(f"unknown pose backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name](**options)
