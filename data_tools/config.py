"""Typed configs of the data_tools commands: registered in Hydra's ConfigStore as ``<app>_schema``,
validated in ``__post_init__`` with messages saying what to change."""

from __future__ import annotations

import sys
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Optional

import hydra
from hydra.core.config_store import ConfigStore

from data_tools.pose.backends import BACKENDS
from data_tools.segment import SEGMENTERS
from wan_animate.cli import check_overrides, expected_errors, skip_collection_at_exit, take_debug_flag
from wan_animate.config import DEFAULT_PROMPT
from wan_animate.geometry import RESIZE_MODES
from wan_animate.options import HYDRA_QUIET, HYDRA_VERSION_BASE, canonical_dtype_name, check_frames_4n1, to_dataclass
from wan_animate.quiet import quiet_third_party

REFERENCE_POLICIES = ("outside", "first", "image")
DRIVING_METHODS = ("none", "appearance")  # data_tools.animate2.appearance


@dataclass
class PrepareConfig:
    """``python -m data_tools.prepare input=PATH output=DIR [options]``."""

    input: Optional[str] = None  # a video, a folder of videos (recursive), or a .txt list of paths
    output: Optional[str] = None
    fps: float = 30.0  # -1 keeps the source frame rate
    clip_len: int = 77  # 4n+1
    clip_stride: Optional[int] = None  # frames between clip starts; default clip_len (no overlap)
    max_clips_per_video: int = 0  # 0 = all
    target_area: int = 1280 * 720  # pixels of a clip; h = sqrt(area/aspect), w = area/h, floored to 16
    buckets: list[Any] = field(default_factory=list)  # optional [[h, w], ...]: nearest-aspect bucket wins
    resize_mode: str = "crop"  # crop (fill the bucket) or letterbox (fit, black bars)
    pose_backend: str = "mediapipe"
    pose_options: dict[str, Any] = field(default_factory=dict)  # e.g. {max_side: 640} or vitpose paths
    face_size: int = 512
    face_smooth_window: int = 5
    reference_policy: str = "outside"  # outside | first | image
    reference_image: Optional[str] = None  # for policy "image": one image for all, else <video stem>.{png,jpg}
    replace: bool = False  # also write bg.mp4 + mask.mp4 (replace mode)
    # driving.mp4 (schema v2, the Animate-2 family): none | appearance (the clip recoloured, textured and on a
    # new background through the character mask; data_tools.animate2.appearance, docs/data.md)
    driving: str = "none"
    mask_threshold: float = 0.5
    segmenter: str = "mediapipe"  # replace-mode masks: mediapipe | sam2
    sam2_path: Optional[str] = None  # segmenter=sam2: SAM2 folder in the transformers format
    segmenter_options: dict[str, Any] = field(default_factory=dict)  # e.g. {device: cuda, prompt: both}
    caption: str = DEFAULT_PROMPT  # default prompt; a <video>.txt next to a video overrides it
    min_person_fraction: float = 0.9  # a clip needs a person on at least this share of frames
    min_pose_quality: float = 0.0  # drop clips whose pose-quality score (data_tools.pose.quality) is lower
    shard_size: int = 32
    workers: int = 1  # 0 = in the main process
    crf: int = 18
    seed: int = 0

    def __post_init__(self) -> None:
        if self.input is None or self.output is None:
            raise ValueError("prepare needs input=PATH (video, folder or list file) and output=DIR")
        check_frames_4n1(self.clip_len, "clip_len")
        if self.fps != -1 and self.fps <= 0:
            raise ValueError(f"fps={self.fps}: use a positive frame rate or -1 to keep the source rate")
        if self.clip_stride is not None and self.clip_stride < 1:
            raise ValueError(f"clip_stride={self.clip_stride} must be >= 1 (or null for clip_len)")
        if self.target_area < 256:
            raise ValueError(f"target_area={self.target_area} is too small; e.g. 1280*720=921600 or 832*480")
        for b in self.buckets:
            if len(b) != 2 or b[0] % 16 or b[1] % 16 or b[0] <= 0 or b[1] <= 0:
                raise ValueError(f"bucket {list(b)} must be [height, width], both positive multiples of 16")
        for name, choices in (("resize_mode", RESIZE_MODES), ("pose_backend", BACKENDS), ("segmenter", SEGMENTERS),
                              ("reference_policy", REFERENCE_POLICIES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {tuple(choices)}")
        if self.segmenter == "sam2" and not self.sam2_path:
            raise ValueError("segmenter=sam2 needs the SAM2 weights: set sam2_path=DIR (a transformers-format "
                             "SAM2 folder, e.g. facebook/sam2.1-hiera-large)")
        if self.driving not in DRIVING_METHODS:
            raise ValueError(f"driving={self.driving!r}: choose one of {DRIVING_METHODS} (appearance writes "
                             f"driving.mp4 for the Animate-2 family)")
        if self.segmenter != "mediapipe" and not (self.replace or self.driving == "appearance"):
            raise ValueError(f"segmenter={self.segmenter} only makes character masks, which replace=true and "
                             f"driving=appearance use: add one of them")
        if self.segmenter == "sam2" and self.pose_backend == "precomputed" and "path" not in self.pose_options:
            raise ValueError("segmenter=sam2 is prompted from keypoints, which ready pose videos lack: give "
                             "pose_options.path= (keypoint files) too, or use segmenter=mediapipe")
        if self.face_size < 16 or self.face_size % 2:
            raise ValueError(f"face_size={self.face_size} must be an even number >= 16 (512 for Wan-Animate)")
        if not 0.0 <= self.min_person_fraction <= 1.0:
            raise ValueError(f"min_person_fraction={self.min_person_fraction} must be in [0, 1]")
        if not 0.0 <= self.min_pose_quality <= 1.0:
            raise ValueError(f"min_pose_quality={self.min_pose_quality} must be in [0, 1] (0 keeps every clip; "
                             f"0.8 drops clips with more than 20% bad-pose frames)")
        if self.shard_size < 1 or self.workers < 0:
            raise ValueError(f"shard_size ({self.shard_size}) must be >= 1 and workers ({self.workers}) >= 0")

    @property
    def stride(self) -> int:
        return self.clip_stride or self.clip_len


@dataclass
class SyntheticConfig:
    """``python -m data_tools.synthetic output=DIR [num_clips=8 ...]``."""

    output: Optional[str] = None
    num_clips: int = 8
    clip_len: int = 17
    height: int = 64
    width: int = 64
    seed: int = 0
    shard_size: int = 4
    face_size: int = 64
    fps: float = 30.0
    replace: bool = False
    driving: bool = False  # also write driving.mp4 (schema v2): the same animation by a second character

    def __post_init__(self) -> None:
        if self.output is None:
            raise ValueError("synthetic needs output=DIR")
        check_frames_4n1(self.clip_len, "clip_len")
        if self.height % 16 or self.width % 16 or self.height < 32 or self.width < 32:
            raise ValueError(f"height x width = {self.height}x{self.width} must be multiples of 16, at least 32")
        if self.num_clips < 1 or self.shard_size < 1:
            raise ValueError(f"num_clips ({self.num_clips}) and shard_size ({self.shard_size}) must be >= 1")
        if self.face_size < 16 or self.face_size % 2:
            raise ValueError(f"face_size={self.face_size} must be an even number >= 16")


@dataclass
class CacheLatentsConfig:
    """``python -m data_tools.cache_latents input=DIR output=DIR model=MODEL_DIR``."""

    input: Optional[str] = None
    output: Optional[str] = None
    model: Optional[str] = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "bf16"  # storage dtype of the latents: bf16 | fp16 | fp32
    compute_dtype: str = "auto"  # encoder dtype: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    refert_nums: list[int] = field(default_factory=lambda: [0, 1, 5])
    shard_size: int = 32
    threads: int = 0  # CPU intra-op threads for the encoders: 0 = auto (see data_tools.cache_latents)

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} must be >= 0 (0 = auto)")
        if not (self.input and self.output and self.model):
            raise ValueError("cache_latents needs input=DIR (raw shards) output=DIR model=MODEL_DIR")
        if not Path(self.model).is_dir():
            raise ValueError(f"model={self.model} is not a folder: give a Wan-Animate model folder (diffusers or "
                             f"official layout; python -m wan_animate.checkpoint make-tiny DIR makes a tiny one)")
        # either spelling (bf16 / bfloat16, ...); stored as the short name the latents' json records
        self.dtype = canonical_dtype_name(self.dtype, "dtype", allow_auto=False)
        self.compute_dtype = canonical_dtype_name(self.compute_dtype, "compute_dtype")
        if self.compute_dtype == "fp16":
            raise ValueError("compute_dtype=fp16: choose auto, bf16 or fp32 (the VAE overflows in fp16)")
        if any(r < 0 for r in self.refert_nums):
            raise ValueError(f"refert_nums={list(self.refert_nums)} must be >= 0")
        if self.shard_size < 1:
            raise ValueError(f"shard_size={self.shard_size} must be >= 1")


APPS = {"prepare": PrepareConfig, "synthetic": SyntheticConfig, "cache_latents": CacheLatentsConfig}
CONF_ROOT = Path(__file__).resolve().parent.parent / "conf"


def register_configs() -> None:
    """``<app>_schema``: the typed defaults of each app; ``<app>``: its primary config (the schema,
    then an optional ``preset=NAME`` from ``conf/<app>/preset/NAME.yaml``; no run folder or log file:
    these commands write only where ``output=`` says)."""
    cs = ConfigStore.instance()
    for app, cls in APPS.items():
        cs.store(name=f"{app}_schema", node=cls)
        cs.store(name=app, node={
            "defaults": [f"{app}_schema", "_self_", {"preset": None},
                         {"override hydra/job_logging": "disabled"}, {"override hydra/hydra_logging": "disabled"}],
            "hydra": HYDRA_QUIET})


def run_hydra(app: str, cls, fn) -> None:
    """Run ``fn(config)`` as a Hydra app: the dataclass defaults, an optional ``preset=NAME``, then
    ``key=value`` overrides; validation errors print one line and exit 2. Each app has its own config
    root ``conf/<app>/`` (its presets only), so ``model=MODEL_DIR`` is never taken for a config group."""
    register_configs()
    skip_collection_at_exit()
    debug = take_debug_flag(sys.argv)
    check_overrides("error: ", sys.argv[1:], cls, ["preset"])
    quiet_third_party()

    @hydra.main(version_base=HYDRA_VERSION_BASE, config_path=str(CONF_ROOT / app), config_name=app)
    def _main(cfg) -> None:
        with expected_errors("error: ", (ValueError, TypeError), debug=debug):  # the config's validation
            config = to_dataclass(cfg, cls)
        with expected_errors("error: ", debug=debug):
            fn(config)

    _main()
