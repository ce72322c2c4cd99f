"""Character masks for replace mode (and ``driving=appearance``): ``get_segmenter(name, **options)``
gives ``masks(frames, pose=None) -> bool [T, H, W]`` (True = character) and ``close()``.

- ``"mediapipe"`` (default): mediapipe selfie segmentation, per frame, CPU.
- ``"sam2"``: SAM2 video segmentation (a transformers-format folder the user gives), prompted with
  the body keypoints the pipeline already computed and propagated through the video.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np

from data_tools.pose.backends import IMAGENET_MEAN, IMAGENET_STD

SEGMENTERS = ("mediapipe", "sam2")
SAM2_PROMPTS = ("points", "box", "both")


def _dilate(mask: np.ndarray, dilate: int) -> np.ndarray:
    if dilate <= 0:
        return mask
    kernel = np.ones((2 * dilate + 1,) * 2, np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


# ---------------------------------------------------------------------------- mediapipe
class CharacterSegmenter:
    """mediapipe selfie segmentation, frame by frame; the pose is not needed (and ignored)."""

    def __init__(self, *, threshold: float = 0.5, dilate: int = 0, model_selection: int = 1):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"mask threshold must be in (0, 1), got {threshold}")
        from data_tools.pose.quiet import import_mediapipe, native_stderr_filtered

        mp = import_mediapipe("replace-mode masks")
        self._quiet = native_stderr_filtered  # mediapipe's native log lines stay out of progress bars
        with self._quiet():
            self._seg = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=model_selection)
        self.threshold = threshold
        self.dilate = dilate

    def masks(self, frames: np.ndarray, pose=None) -> np.ndarray:
        out = np.zeros(frames.shape[:3], bool)
        with self._quiet():
            for t, frame in enumerate(frames):
                prob = self._seg.process(np.ascontiguousarray(frame)).segmentation_mask
                out[t] = _dilate(prob > self.threshold, self.dilate)
        return out

    def close(self) -> None:
        with self._quiet():  # the graph's threads finish (and may log) while it closes
            self._seg.close()


# ---------------------------------------------------------------------------- SAM2 (transformers Sam2VideoModel)
# Body points used as positive clicks (OpenPose order of data_tools.pose.format): nose, neck,
# both shoulders, both hips, both ankles -- the same joints the official Wan-Animate
# preprocessing clicks on. They sit inside the body outline, so each one is a safe "this is the
# character" click; elbows/wrists are left out because they often lie on the outline.
SAM2_PROMPT_JOINTS = (0, 1, 2, 5, 8, 11, 10, 13)


def _sam2_folder_error(path: Path, why: str, error: type[Exception] = ValueError) -> Exception:
    return error(
        f"sam2_path={str(path)!r} is not a SAM2 model folder: {why}. Expected a folder in the transformers "
        f"format (config.json with model_type 'sam2_video' + model.safetensors), e.g. a download of "
        f"facebook/sam2.1-hiera-large")


class Sam2Segmenter:
    """SAM2 video segmentation of the person, prompted from the pose.

    Per chunk of at most ``chunk_len`` frames: up to ``keyframes`` frames where the pose has a
    person (>= 4 body points with score >= ``min_score``), spread evenly over those frames, get
    positive clicks on the confident ``SAM2_PROMPT_JOINTS`` (``prompt="points"``, as the official
    preprocessing does), and/or the box around all confident keypoints grown by ``box_margin`` of
    its size on each side (``"box"`` / ``"both"``). SAM2 then propagates the object forward from the
    first keyframe and backward to the chunk start; mask = logit > 0 at the frame size.

    ``pose`` must be the ``PoseSequence`` of ``frames`` (same frame count, keypoints in pixels of
    the frames; another size is rescaled). Frames are resized to the model's square input size
    and normalised here (ImageNet mean/std, or those of the folder's preprocessor config), so
    torchvision is not needed.
    """

    def __init__(self, path, *, device: str = "auto", dtype: str = "auto", prompt: str = "points",
                 keyframes: int = 4, chunk_len: int = 400, min_score: float = 0.5, box_margin: float = 0.1,
                 dilate: int = 0, progress: bool = False):
        import torch

        if prompt not in SAM2_PROMPTS:
            raise ValueError(f"sam2 prompt={prompt!r}: choose one of {SAM2_PROMPTS}")
        if keyframes < 1 or chunk_len < 1:
            raise ValueError(f"sam2 keyframes ({keyframes}) and chunk_len ({chunk_len}) must be >= 1")
        if not 0.0 < min_score <= 1.0:
            raise ValueError(f"sam2 min_score={min_score} must be in (0, 1]")
        from wan_animate.options import parse_dtype, resolve_device

        self.path = Path(path) if path is not None else None
        self.device = resolve_device(device, "sam2 device")
        self.dtype = parse_dtype(dtype, self.device, "sam2 dtype")  # auto: bf16 on CUDA, fp32 elsewhere
        self.prompt, self.keyframes, self.chunk_len = prompt, keyframes, chunk_len
        self.min_score, self.box_margin, self.dilate = min_score, box_margin, dilate
        self.progress = progress  # tqdm bars over the propagation (long videos)
        self.model = self._load()
        size = self.model.config.image_size
        self.image_size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self._mean, self._std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in self._normalisation())
        self.frames_without_prompt = 0  # frames of chunks where no keyframe had a person (mask left empty)

    # ---- loading ------------------------------------------------------------------------------
    def _load(self):
        path = self.path
        if path is None:
            raise ValueError("the sam2 segmenter needs the SAM2 weights folder: set sam2_path=DIR "
                             "(transformers format, e.g. a download of facebook/sam2.1-hiera-large)")
        if not path.is_dir():
            raise _sam2_folder_error(path, "it does not exist or is not a folder", FileNotFoundError)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise _sam2_folder_error(path, "no config.json")
        try:
            model_type = json.loads(config_file.read_text()).get("model_type")
        except (json.JSONDecodeError, AttributeError) as e:
            raise _sam2_folder_error(path, f"config.json is not a JSON object ({e})") from e
        if model_type not in ("sam2_video", "sam2"):
            raise _sam2_folder_error(path, f"config.json has model_type {model_type!r}")
        from transformers import Sam2VideoModel

        try:
            model, info = Sam2VideoModel.from_pretrained(str(path), dtype=self.dtype, output_loading_info=True)
        except (OSError, ValueError) as e:
            raise _sam2_folder_error(path, f"the weights do not load ({type(e).__name__}: {e})") from e
        missing = sorted(info.get("missing_keys", []))
        if missing:  # e.g. an image-only SAM2 checkpoint: its video memory would be random
            raise _sam2_folder_error(path, f"{len(missing)} weights are missing from the checkpoint "
                                           f"(e.g. {missing[:3]}); the video model needs all of them")
        return model.to(self.device).eval()

    def _normalisation(self) -> tuple:  # (mean, std) per RGB channel
        for name in ("video_preprocessor_config.json", "preprocessor_config.json", "processor_config.json"):
            f = self.path / name
            if f.is_file():
                d = json.loads(f.read_text())
                d = d.get("video_processor", d.get("image_processor", d)) if "image_mean" not in d else d
                if "image_mean" in d and "image_std" in d:
                    return tuple(d["image_mean"]), tuple(d["image_std"])
        return IMAGENET_MEAN, IMAGENET_STD

    # ---- prompts ------------------------------------------------------------------------------
    def prompts(self, pose, height: int, width: int) -> list[dict]:
        """The clicks/boxes of one chunk: [{frame, points [N, 2] (x, y px), box [4] or None}], one
        per keyframe; [] when no frame of ``pose`` has a person."""
        body = pose.body
        inside = (body[..., 0] >= 0) & (body[..., 0] < width) & (body[..., 1] >= 0) & (body[..., 1] < height)
        usable = (body[..., 2] >= self.min_score) & inside  # confident and in the frame, [T, 20]
        joints = list(SAM2_PROMPT_JOINTS)
        # a keyframe needs a person and, for click prompts, at least one click joint in the frame
        ok = usable.sum(-1) >= 4
        if self.prompt != "box":
            ok &= usable[:, joints].any(-1)
        candidates = np.flatnonzero(ok)
        if len(candidates) == 0:
            return []
        picks = np.unique(np.round(np.linspace(0, len(candidates) - 1, min(self.keyframes, len(candidates)))))
        out = []
        for t in candidates[picks.astype(int)]:
            points = box = None
            if self.prompt in ("points", "both"):
                sel = [j for j in joints if usable[t, j]]
                points = body[t, sel, :2].astype(np.float32)
            if self.prompt in ("box", "both"):
                all_pts = np.concatenate([a[t] for a in pose.streams()])
                xy = all_pts[all_pts[:, 2] >= self.min_score, :2]
                (x0, y0), (x1, y1) = xy.min(0), xy.max(0)
                mx, my = self.box_margin * (x1 - x0), self.box_margin * (y1 - y0)
                box = np.array([max(x0 - mx, 0), max(y0 - my, 0), min(x1 + mx, width - 1), min(y1 + my, height - 1)],
                               np.float32)
            out.append({"frame": int(t), "points": points, "box": box})
        return out

    # ---- video --------------------------------------------------------------------------------
    def _pixels(self, frames: np.ndarray):
        """uint8 [T, H, W, 3] -> normalised float [T, 3, S, S] (square resize, as SAM2 was trained)."""
        import torch
        import torch.nn.functional as F

        out = []
        for i in range(0, len(frames), 16):  # bounded peak memory for large frames
            x = torch.from_numpy(np.ascontiguousarray(frames[i:i + 16])).to(self.device)
            x = x.permute(0, 3, 1, 2).float() / 255.0  # [t, 3, H, W]
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
            out.append(((x - self._mean.to(x.device)) / self._std.to(x.device)).cpu())
        return torch.cat(out)

    def _chunk(self, frames: np.ndarray, prompts: list[dict]) -> np.ndarray:
        import torch
        import torch.nn.functional as F
        from transformers import Sam2VideoInferenceSession

        n, h, w = frames.shape[:3]
        video_state = Sam2VideoInferenceSession(
            video=self._pixels(frames), video_height=h, video_width=w, inference_device=self.device,
            inference_state_device=self.device, video_storage_device="cpu", dtype=self.dtype)
        obj_id = 1
        obj_idx = video_state.obj_id_to_idx(obj_id)
        scale = torch.tensor([self.image_size / w, self.image_size / h])
        logits: dict[int, torch.Tensor] = {}
        for p in prompts:
            coords, labels = [], []
            if p["box"] is not None:  # a box is two clicks labelled 2 (top-left) and 3 (bottom-right)
                coords.append(torch.from_numpy(p["box"]).view(2, 2))
                labels += [2, 3]
            if p["points"] is not None:
                coords.append(torch.from_numpy(p["points"]))
                labels += [1] * len(p["points"])
            video_state.add_point_inputs(obj_idx, p["frame"], {
                "point_coords": (torch.cat(coords) * scale).view(1, 1, -1, 2).float(),  # [1, 1, N, 2] model px
                "point_labels": torch.tensor(labels, dtype=torch.int32).view(1, 1, -1),
            })
            video_state.obj_with_new_inputs = [obj_id]
            # run each prompted frame now: it becomes a conditioning frame that every other frame's
            # memory attends to (prompts added without this step would be ignored by propagation)
            logits[p["frame"]] = self.model(inference_session=video_state, frame_idx=p["frame"]).pred_masks
        first = min(p["frame"] for p in prompts)
        for reverse in (False, True) if first > 0 else (False,):  # forward from the first keyframe, then back
            for out in self.model.propagate_in_video_iterator(video_state, start_frame_idx=first, reverse=reverse,
                                                              show_progress_bar=self.progress):
                logits[out.frame_idx] = out.pred_masks
        masks = np.zeros((n, h, w), bool)
        for t, lo in logits.items():  # lo: [objects=1, 1, h', w'] logits
            up = F.interpolate(lo[:1].float(), size=(h, w), mode="bilinear", align_corners=False)
            masks[t] = _dilate((up[0, 0] > 0).cpu().numpy(), self.dilate)
        return masks

    def masks(self, frames: np.ndarray, pose=None) -> np.ndarray:
        import torch

        if pose is None:
            raise ValueError("the sam2 segmenter is prompted from the pose: call masks(frames, pose=PoseSequence)")
        n, h, w = frames.shape[:3]
        if len(pose) != n:
            raise ValueError(f"sam2 segmenter: pose has {len(pose)} frames, the video {n}")
        pose = pose.resized(h, w)  # keypoints in pixels of the frames
        out = np.zeros((n, h, w), bool)
        skipped = 0
        with torch.inference_mode():
            for start in range(0, n, self.chunk_len):
                end = min(start + self.chunk_len, n)
                prompts = self.prompts(pose.select(np.arange(start, end)), h, w)
                if not prompts:  # nobody to click on: no character in this chunk
                    skipped += end - start
                    continue
                out[start:end] = self._chunk(frames[start:end], prompts)
        if skipped:
            self.frames_without_prompt += skipped
            warnings.warn(f"sam2 segmenter: {skipped} of {n} frames are in chunks where the pose found no person "
                          f"to prompt SAM2 with; their masks are empty", stacklevel=2)
        return out

    def close(self) -> None:
        self.model = None


# ---------------------------------------------------------------------------- factory + background
def get_segmenter(name: str = "mediapipe", **options):
    """``"mediapipe"`` -> CharacterSegmenter(threshold=, dilate=, model_selection=);
    ``"sam2"`` -> Sam2Segmenter(path=, device=, dtype=, prompt=, keyframes=, chunk_len=, min_score=,
    box_margin=, dilate=, progress=)."""
    if name == "mediapipe":
        return CharacterSegmenter(**options)
    if name == "sam2":
        return Sam2Segmenter(options.pop("path", None), **options)
    raise ValueError(f"segmenter={name!r}: choose one of {SEGMENTERS}")


def background(frames: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """frame x (1 - mask): the environment with the character blacked out. uint8 [T, H, W, 3]."""
    return (frames * (~masks[..., None])).astype(np.uint8)
