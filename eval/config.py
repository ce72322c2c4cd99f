"""Typed configuration of ``python eval/main.py`` (registered in Hydra's ConfigStore).

Sweepable values sit at the top level so a sweep reads naturally::

    python eval/main.py -m model_dir=M eval_set=S guide_scale=1,2 seed=0,1 steps=20 \
        checkpoint=runs/a/checkpoints/step-1000,runs/a/checkpoints/step-2000
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore

from wan_animate.options import canonical_dtype_name, check_frames_4n1, check_solver

METRICS = ("psnr", "ssim", "lpips", "fvd", "motion", "expression", "identity", "flicker", "heldout", "sensitivity")
# Metrics that compare against the ground-truth video (self-reconstruction sets only).
NEEDS_GROUND_TRUTH = ("psnr", "ssim", "lpips", "fvd", "heldout", "sensitivity")
# Metrics of the DiT's loss (no sampler): a cell that asks only for these generates no video.
LOSS_METRICS = ("heldout", "sensitivity")
EVAL_SET_KINDS = ("auto", "shards", "pairs")
OFFICIAL_CLIP_LEN = 77  # frames per generated segment in the official model


@dataclass
class MetricsConfig:
    # Which metrics to compute. lpips / fvd also need their weight files below.
    names: list[str] = field(default_factory=lambda: ["psnr", "ssim", "flicker", "identity", "motion", "expression"])
    # LPIPS: a torchvision vgg16/alexnet state dict + the lpips package's linear-head file.
    lpips_net: str = "vgg"
    lpips_backbone: Optional[str] = None
    lpips_linear: Optional[str] = None
    # FVD: the i3d_torchscript.pt detector (StyleGAN-V convention); clips of this many frames.
    fvd_detector: Optional[str] = None
    fvd_clip_frames: int = 16
    # Motion / expression: a data_tools pose backend run on generated and driving frames.
    pose_backend: str = "mediapipe"
    pose_backend_args: dict = field(default_factory=dict)
    # Driving keypoints: "extract" runs pose_backend on the driving video (same detector on both
    # sides); "stored" uses the keypoints stored with the sample (shard json / src_meta.json; e.g.
    # the retargeted pose of a cross-identity pair).
    driving_keypoints: str = "extract"
    keypoint_threshold: float = 0.5
    pck_thresholds: list[float] = field(default_factory=lambda: [0.05, 0.1])
    # Identity: frames sampled per video for the CLIP cosine.
    identity_max_frames: int = 16
    # Held-out flow-matching loss: one DiT forward per sample and timestep, noise seeded per sample.
    heldout_timesteps: list[float] = field(default_factory=lambda: [100.0, 300.0, 500.0, 700.0, 900.0])
    heldout_seed: int = 0
    # Condition sensitivity: held-out loss (same timesteps and seed) with each sample's conditions
    # (Wan-Animate-14B: pose, face, ref; Wan-Animate-2: driving, ref) swapped for the next sample's,
    # minus its own; these conditions, empty = every condition of the model's family.
    sensitivity_conditions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.names = list(self.names)
        unknown = [n for n in self.names if n not in METRICS]
        if unknown:
            raise ValueError(f"metrics.names has unknown metrics {unknown}; choose from {list(METRICS)}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"metrics.names lists a metric twice: {self.names}")
        if "lpips" in self.names and not (self.lpips_backbone and self.lpips_linear):
            raise ValueError(
                "metrics.names includes 'lpips' but no weights were given: set metrics.lpips_backbone "
                "(torchvision vgg16/alexnet state dict, e.g. vgg16-397923af.pth) and metrics.lpips_linear "
                "(the lpips package's weights/v0.1/vgg.pth), or drop 'lpips' from metrics.names"
            )
        if "fvd" in self.names and not self.fvd_detector:
            raise ValueError(
                "metrics.names includes 'fvd' but metrics.fvd_detector is not set: give the path of "
                "i3d_torchscript.pt, or drop 'fvd' from metrics.names"
            )
        if self.lpips_net not in ("vgg", "alex"):
            raise ValueError(f"metrics.lpips_net={self.lpips_net!r}; choose 'vgg' or 'alex'")
        if self.driving_keypoints not in ("extract", "stored"):
            raise ValueError(f"metrics.driving_keypoints={self.driving_keypoints!r}; choose 'extract' or 'stored'")
        if self.fvd_clip_frames < 0:
            raise ValueError("metrics.fvd_clip_frames must be >= 0 (0 = whole videos)")
        if not 0 <= self.keypoint_threshold <= 1:
            raise ValueError("metrics.keypoint_threshold must be in [0, 1]")
        self.heldout_timesteps = [float(t) for t in self.heldout_timesteps]
        if not self.heldout_timesteps or any(not 0 <= t <= 1000 for t in self.heldout_timesteps):
            raise ValueError(f"metrics.heldout_timesteps must be values in [0, 1000], got {self.heldout_timesteps}")
        from wan_animate.family import family_names, get_family

        known = list(dict.fromkeys(c for name in family_names() for c in get_family(name).conditions))
        self.sensitivity_conditions = list(self.sensitivity_conditions)
        bad = [c for c in self.sensitivity_conditions if c not in known]
        if bad or len(set(self.sensitivity_conditions)) != len(self.sensitivity_conditions):
            raise ValueError(f"metrics.sensitivity_conditions={self.sensitivity_conditions}; list each of {known} "
                             "at most once (empty: every condition of the model's family)")
        self.pck_thresholds = [float(a) for a in self.pck_thresholds]
        if not self.pck_thresholds or any(a <= 0 for a in self.pck_thresholds):
            raise ValueError(f"metrics.pck_thresholds must be positive fractions, got {self.pck_thresholds}")


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "wan-animate-eval"
    mode: str = "offline"  # "offline" | "online" | "disabled"

    def __post_init__(self) -> None:
        if self.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb.mode={self.mode!r}; choose offline, online or disabled")


@dataclass
class EvalConfig:
    # ------------------------------------------------------------------ model
    model_dir: str = "???"  # a Wan-Animate model folder (official or diffusers layout)
    checkpoint: Optional[str] = None  # trained DiT: checkpoints/step-N/, export/, or a .safetensors file
    # A LoRA file (community layout, e.g. output_dir/export/lora.safetensors). Not named `lora`:
    # that is a config group of the trainer in the shared conf/ folder.
    lora_path: Optional[str] = None
    lora_scale: float = 1.0
    # auto = bfloat16 on CUDA, float32 elsewhere (bfloat16 is ~5x slower than float32 on CPUs);
    # either spelling: bf16 / bfloat16, fp32 / float32, fp16 / float16.
    dtype: str = "auto"
    device: str = "auto"  # "auto" = cuda when available, else cpu
    # ------------------------------------------------------------------ eval set
    eval_set: str = "???"  # shard folder / .tar (self-reconstruction) or a folder of pairs (cross-identity)
    eval_set_kind: str = "auto"  # "auto" | "shards" | "pairs"
    max_samples: int = 8  # first N usable samples (sorted by key); 0 = all
    max_frames: int = 0  # cut every clip to its first N frames (4n+1); 0 = whole clips
    mode: str = "animate"  # "animate" | "replace" (replace needs bg/mask streams)
    # Raw (image, video) pairs: keyword arguments of data_tools.preprocess_driving.preprocess_driving
    # (retarget, replace, fps, target_area, pose_backend, pose_options, face_size, max_frames).
    preprocess: dict = field(default_factory=dict)
    # ------------------------------------------------------------------ sampling (the swept values)
    steps: int = 20
    shift: float = 5.0
    guide_scale: float = 1.0
    seed: int = 0
    solver: str = "unipc"
    # Frames per generated segment (4n+1). 0 = the eval set's own clip length: the samples' frame
    # count (shard json num_frames, after max_frames), floored to 4n+1, at most 77 (the official
    # segment length; longer samples are generated in segments).
    clip_len: int = 0
    refert_num: int = 1
    prompt: Optional[str] = None  # None = the sample's caption, else the model's default prompt
    negative_prompt: Optional[str] = None
    # ------------------------------------------------------------------ outputs
    # A label for this cell in the report's plots (e.g. name=styleA lora_path=.../lora.safetensors);
    # default: the shortest distinguishing form of its values. Not part of the cell's folder name.
    name: Optional[str] = None
    out_dir: str = "eval_runs/default"  # sweep root; each cell is a subfolder named by its overrides
    save_videos: bool = True
    fps: float = 30.0
    skip_finished: bool = True
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        if self.model_dir in ("", "???"):
            raise ValueError("model_dir is required: python eval/main.py model_dir=PATH eval_set=PATH")
        if self.eval_set in ("", "???"):
            raise ValueError("eval_set is required: a shard folder / .tar file or a folder of (image, video) pairs")
        canonical_dtype_name(self.dtype, "dtype")
        if self.eval_set_kind not in EVAL_SET_KINDS:
            raise ValueError(f"eval_set_kind={self.eval_set_kind!r}; choose one of {list(EVAL_SET_KINDS)}")
        if self.mode not in ("animate", "replace"):
            raise ValueError(f"mode={self.mode!r}; choose 'animate' or 'replace'")
        check_solver(self.solver)
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if self.shift <= 0:
            raise ValueError(f"shift={self.shift} must be > 0 (Wan uses 5.0)")
        if self.guide_scale < 1.0:
            raise ValueError(f"guide_scale={self.guide_scale} must be >= 1 (1 = no classifier-free guidance)")
        if self.max_samples < 0:
            raise ValueError("max_samples must be >= 0 (0 = all samples)")
        check_frames_4n1(self.max_frames, "max_frames", allow_zero=True)  # 0 = whole clips
        check_frames_4n1(self.clip_len, "clip_len", minimum=5, allow_zero=True)  # 0 = the eval set's own length
        if self.refert_num not in (1, 5):
            raise ValueError(f"refert_num={self.refert_num} must be 1 or 5")
        if self.fps <= 0:
            raise ValueError("fps must be > 0")


# Config fields that do not change a cell's numbers (a rerun with other values still skips it); they
# stay out of its folder name, with the model and the eval set (wandb.* / metrics.*: eval.main.cell_name).
NON_RESULT_FIELDS = ("out_dir", "skip_finished", "wandb", "save_videos", "device", "name")
UNNAMED_KEYS = ["model_dir", "eval_set", *NON_RESULT_FIELDS]
CONF_ROOT = Path(__file__).resolve().parent.parent / "conf" / "eval"  # eval's own config root: presets only


def register_configs() -> None:
    """``eval_schema``: the typed defaults; ``eval``: the primary config (schema, an optional
    ``preset=NAME`` from ``conf/eval/preset/NAME.yaml``, and the Hydra settings: one folder per
    cell named by its overrides, the report callback)."""
    from omegaconf import OmegaConf

    node = OmegaConf.structured(EvalConfig)
    # Free-form option dicts: `preprocess={target_area:409600}` on the command line must replace
    # them without Hydra's `+` (struct mode would reject the new keys).
    node.preprocess._set_flag("struct", False)
    node.metrics.pose_backend_args._set_flag("struct", False)
    cs = ConfigStore.instance()
    cs.store(name="eval_schema", node=node)
    cell_dir = "${eval_cell_name:${hydra.overrides.task}}"
    cs.store(name="eval", node={
        "defaults": ["eval_schema", "_self_", {"preset": None}],
        "hydra": {
            "run": {"dir": "${out_dir}/" + cell_dir},
            "sweep": {"dir": "${out_dir}", "subdir": cell_dir},
            "job": {"chdir": False},
            "callbacks": {"eval_report": {"_target_": "eval.report.ReportCallback"}},
        },
    })
