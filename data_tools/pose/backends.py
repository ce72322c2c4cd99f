"""Pose backends: RGB frames uint8 [T, H, W, 3] -> ``PoseSequence`` in pixels of those frames.
``mediapipe`` (the embedded default, CPU, no download; ``data_tools.pose.mediapipe_backend``),
``vitpose`` (the official ONNX pair: YOLOv10m detector + ViTPose-H WholeBody), ``precomputed``
(keypoints or pose / face videos the user supplies).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import cv2
import numpy as np

from data_tools.pose.base import PoseBackend, PoseBackendError, check_frames
from data_tools.pose.format import PoseSequence
from data_tools.pose.mediapipe_backend import MediapipeBackend


# ---------------------------------------------------------------------------- vitpose (official ONNX pair)
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
    a, b = (kps[:, list(points)] for points in zip(*WHOLEBODY_BODY_PAIRS))
    return PoseSequence((a + b) / 2, kps[:, WHOLEBODY_LEFT_HAND], kps[:, WHOLEBODY_RIGHT_HAND], kps[:, WHOLEBODY_FACE],
                        height, width)


def _onnx_model(path: str | Path, device: str):
    import onnxruntime as ort

    path = Path(path)
    if path.is_dir():  # the official pose2d checkpoint is a folder holding end2end.onnx
        path = path / "end2end.onnx"
    if not path.is_file():
        raise PoseBackendError(f"ONNX model not found: {path}; set the vitpose backend's detector_path / pose_path")
    cuda = device.startswith("cuda")
    if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise PoseBackendError("device=cuda asked for, but onnxruntime has no CUDAExecutionProvider; "
                               "install onnxruntime-gpu or use device=cpu")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), providers=providers)


def _input_hw(onnx_model, default: tuple[int, int]) -> tuple[int, int]:
    """The model input's (H, W); ``default`` where the ONNX file leaves a side dynamic."""
    return tuple(int(s) if isinstance(s, int) else d for s, d in zip(onnx_model.get_inputs()[0].shape[2:4], default))


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
        classes, scores = out[:, 4:].argmax(-1), out[:, 4:].max(-1)
        cx, cy, bw, bh = out[:, :4].T
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
    else:
        raise ValueError(f"unexpected detector output shape {output.shape}: want [N, 6] or [84, N]")
    sy, sx = frame_hw[0] / input_hw[0], frame_hw[1] / input_hw[1]
    boxes *= np.array([sx, sy, sx, sy], np.float32)
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
    preds = preds * (crop_whs[:, None] / (w, h)) + centres[:, None] - crop_whs[:, None] / 2  # heatmap -> frame px
    preds = np.where(scores[..., None] > 0, preds, -1.0)
    return np.concatenate([preds, scores[..., None]], -1).astype(np.float32)


class VitPoseBackend(PoseBackend):
    """The official ONNX pair: YOLOv10m person detector (640 x 640, conf 0.05, NMS IoU 0.5, largest
    person box, full frame when none) and ViTPose-H WholeBody (box x1.25, 256 x 192 crop,
    133 COCO-WholeBody keypoints) run with onnxruntime on CPU or CUDA."""

    name = "vitpose"

    def __init__(self, *, detector_path: str | None = None, pose_path: str | None = None, device: str = "cpu",
                 batch_size: int = 16, det_conf: float = 0.05, det_iou: float = 0.5, box_rescale: float = 1.25):
        if pose_path is None:
            raise PoseBackendError("the vitpose backend needs pose_path (process_checkpoint/pose2d/"
                                   "vitpose_h_wholebody.onnx, a folder holding end2end.onnx, or a .onnx file)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.detector = _onnx_model(detector_path, device) if detector_path else None
        self.pose = _onnx_model(pose_path, device)
        self.det_conf, self.det_iou, self.box_rescale, self.batch_size = det_conf, det_iou, box_rescale, batch_size
        # (H, W) of each model's image input; the official size where an axis is dynamic
        self.pose_input_hw = _input_hw(self.pose, (256, 192))
        if self.detector is not None:
            self.det_input_hw = _input_hw(self.detector, (640, 640))
        self.last_detected = np.zeros(0, bool)

    def detect(self, frame: np.ndarray) -> np.ndarray | None:
        h, w = frame.shape[:2]
        in_h, in_w = self.det_input_hw
        x = cv2.resize(frame, (in_w, in_h)).astype(np.float32).transpose(2, 0, 1)[None] / 255.0
        out = self.detector.run(None, {self.detector.get_inputs()[0].name: np.ascontiguousarray(x)})[0]
        return decode_detections(out, (h, w), (in_h, in_w), conf=self.det_conf, iou=self.det_iou)

    def extract(self, frames, *, source=None, frame_indices=None, progress=None) -> PoseSequence:
        frames = check_frames(frames)
        t_len, h, w = frames.shape[:3]
        crops = []  # (centre, crop size) per frame
        detected = np.zeros(t_len, bool)
        for t, frame in enumerate(frames):
            box = self.detect(frame) if self.detector is not None else None
            too_small = box is not None and (box[2] - box[0] < 10 or box[3] - box[1] < 10)
            if box is None or too_small:
                box = np.array([0, 0, w, h, 0], np.float32)  # the official full-frame fallback
            else:
                detected[t] = True
            crops.append(person_crop_params(box, self.pose_input_hw, self.box_rescale))
        centres, whs = (np.stack(a) for a in zip(*crops))
        inputs = [crop_person(frame, c, wh, self.pose_input_hw) for frame, c, wh in zip(frames, centres, whs)]
        name = self.pose.get_inputs()[0].name
        kps = []
        for s in range(0, t_len, self.batch_size):
            batch = slice(s, s + self.batch_size)
            heat = self.pose.run(None, {name: np.stack(inputs[batch])})[0]
            kps.append(decode_heatmaps(heat, centres[batch], whs[batch]))
            if progress is not None:
                progress(len(heat))
        kps = np.concatenate(kps)
        if kps.shape[1] != 133:
            raise PoseBackendError(f"the pose model returned {kps.shape[1]} keypoints; the vitpose backend needs "
                                   "a COCO-WholeBody model with 133")
        self.last_detected = detected
        return wholebody_to_pose(kps, h, w)


# ---------------------------------------------------------------------------- precomputed
def load_keypoints(path: str | Path) -> PoseSequence:
    """A PoseSequence from ``.npz`` (``PoseSequence.save_npz``) or ``.json`` (``to_dict``)."""
    path = Path(path)
    if path.suffix == ".npz":
        return PoseSequence.load_npz(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
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

    def __init__(self, *, path: str | None = None, videos: str | None = None):
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

    def extract(self, frames, *, source=None, frame_indices=None, progress=None) -> PoseSequence:
        frames = check_frames(frames)
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
        if progress is not None:  # a file read: every frame at once
            progress(len(frames))
        return pose.resized(frames.shape[1], frames.shape[2])


BACKENDS = {"mediapipe": MediapipeBackend, "vitpose": VitPoseBackend, "precomputed": PrecomputedBackend}


def get_pose_backend(name: str, **options) -> PoseBackend:
    """Create a pose backend by name: "mediapipe", "vitpose" or "precomputed"."""
    if name not in BACKENDS:
        raise ValueError(f"unknown pose backend {name!r}; choose one of {sorted(BACKENDS)}")
    valid = list(inspect.signature(BACKENDS[name]).parameters)
    if unknown := sorted(set(options) - set(valid)):
        raise TypeError(f"unknown {name} backend options {unknown}; valid: {', '.join(valid)}")
    return BACKENDS[name](**options)
