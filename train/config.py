"""Typed training configuration (Hydra ConfigStore): one dataclass per group of ``conf/train/``.
Each option is validated once, in ``__post_init__``, before any model loads; launch-time
combinations in ``check_launch``."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra import compose as hydra_compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from wan_animate.config import DEFAULT_PROMPT
from wan_animate.family import get_family
from wan_animate.memory import MemoryOptions
from wan_animate.objective import LossConfig
from wan_animate.options import HYDRA_VERSION_BASE, to_dataclass
from wan_animate.parallel import check_sequence_parallel_size

MODES = ("full", "adapters_only", "lora", "self_attn")
PRECISIONS = ("fp32", "bf16")
DATA_SOURCES = ("synthetic", "shards", "cached")
SCHEDULERS = ("constant", "cosine", "linear")
DISTRIBUTED = ("auto", "ddp", "deepspeed", "none")
OPTIMIZERS = ("adamw", "adamw8bit")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf" / "train")


class ConfigError(ValueError):
    """A value or combination that cannot work; the message says what to change."""


def _fail(msg: str) -> None:
    raise ConfigError(msg)


def _choice(section: str, obj: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        _fail(f"{section}.{name}={value!r}; choose one of {choices}.")


def _at_least(section: str, obj: Any, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < minimum:
            _fail(f"{section}.{name}={value} must be >= {minimum}.")


# ---------------------------------------------------------------------------- groups


@dataclass
class ModelConfig(MemoryOptions):
    """The model and its memory options (``wan_animate.memory.MemoryOptions``, docs/memory.md)."""

    # Model family (wan_animate/family.py): animate = Wan-Animate-14B, animate2 = Wan-Animate-2;
    # or package.module:ATTRIBUTE of a ModelFamily.
    family: str = "animate"
    # Model folder (official or diffusers layout, with VAE/text/image encoders). Empty -> the
    # quick-start tiny random model folder, written on first use.
    path: Optional[str] = None
    # Size of the model when ``path`` is empty (a preset of the family): the quick-start random model,
    # or what the memory planner plans.
    preset: str = "tiny"
    init_seed: int = 0  # seed of the quick-start random model
    # Where the frozen VAE / text / image encoders of raw-shard training live (cached shards never
    # load them for training): "device" moves them to the device only to encode a batch and parks
    # them in host memory during the DiT step; "cpu" runs them on the host.
    encoders_device: str = "device"

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
            presets = get_family(self.family).presets
        except (ValueError, TypeError) as e:
            _fail(str(e))
        if self.path is None and self.preset not in presets:
            _fail(f"model.preset={self.preset!r} is unknown; choose one of {sorted(presets)} or set model.path.")
        if self.encoders_device not in ("device", "cpu"):
            _fail(f"model.encoders_device={self.encoders_device!r}; choose device (on the device only while "
                  "encoding a batch) or cpu (encode on the host).")
        if self.block_swap and not self.activation_checkpointing:  # inference may swap without it; training not
            _fail(f"model.block_swap={self.block_swap} needs model.activation_checkpointing=true: without it "
                  "backward keeps every swapped block's weights on the device and block swap saves nothing.")


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | shards (raw, encoded on the fly) | cached (latents)
    # Shard locations: directories, globs, brace patterns, files, or ``pipe:`` commands.
    urls: list[str] = field(default_factory=list)
    # Synthetic quick-start dataset (written under train.cache_dir on first use).
    synthetic_clips: int = 4
    synthetic_frames: int = 13
    synthetic_height: int = 32
    synthetic_width: int = 32
    clip_len: int = 9  # pixel frames per training clip, 4n+1 (77 for the real model)
    # Resolution buckets [[H, W], ...]; each sample goes to the bucket nearest its aspect ratio
    # and is resized/centre-cropped to it. Empty -> one bucket at synthetic size / sample size.
    buckets: list[list[int]] = field(default_factory=list)
    face_size: int = 0  # face crop side fed to the DiT; 0 -> the model's motion_encoder_size
    shuffle_buffer: int = 16
    num_workers: int = 0
    # Conditioning recipe
    temporal_ref_prob: float = 0.5  # probability of giving ground-truth first frames
    refert_nums: list[int] = field(default_factory=lambda: [1, 5])
    text_dropout: float = 0.1  # -> empty prompt
    face_dropout: float = 0.1  # -> face pixels all -1
    # Face-crop augmentation (paper stage 2), one draw per clip with probability face_aug_prob:
    # zoom 1 +- face_aug_scale, brightness/contrast/saturation +- face_aug_color, noise std <= face_aug_noise.
    face_aug_prob: float = 0.0
    face_aug_scale: float = 0.15
    face_aug_color: float = 0.2
    face_aug_noise: float = 0.03
    replace_prob: float = 0.5  # replace-mode probability for samples that carry bg+mask
    default_caption: str = DEFAULT_PROMPT
    max_skipped_fraction: float = 0.5  # stop when more than this share of samples fails to decode

    def __post_init__(self) -> None:
        _choice("data", self, "source", DATA_SOURCES)
        if self.clip_len < 5 or (self.clip_len - 1) % 4:
            _fail(f"data.clip_len={self.clip_len} must be 4n+1 and >= 5 (e.g. 5, 9, ..., 77).")
        if self.source == "synthetic":
            _at_least("data", self, 1, "synthetic_clips")
            if self.synthetic_frames < self.clip_len:
                _fail(f"data.synthetic_frames={self.synthetic_frames} < data.clip_len={self.clip_len}; raise it.")
            if self.synthetic_height % 16 or self.synthetic_width % 16:
                _fail("data.synthetic_height/width must be multiples of 16.")
        for b in self.buckets:
            if len(b) != 2 or b[0] % 16 or b[1] % 16 or min(b) < 16:
                _fail(f"data.buckets entry {b} must be [H, W] with multiples of 16.")
        for name in ("temporal_ref_prob", "text_dropout", "face_dropout", "replace_prob", "max_skipped_fraction",
                     "face_aug_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                _fail(f"data.{name}={v} must be in [0, 1].")
        if not self.refert_nums or any(n < 1 or n >= self.clip_len for n in self.refert_nums):
            _fail(f"data.refert_nums={self.refert_nums} must be non-empty with 1 <= n < clip_len={self.clip_len}.")
        if not (0.0 <= self.face_aug_scale < 1.0 and 0.0 <= self.face_aug_color < 1.0 and self.face_aug_noise >= 0.0):
            _fail(f"data.face_aug_scale={self.face_aug_scale} and data.face_aug_color={self.face_aug_color} must be "
                  f"in [0, 1), data.face_aug_noise={self.face_aug_noise} >= 0.")
        _at_least("data", self, 0, "num_workers", "shuffle_buffer")
        if self.face_size != 0 and not 16 <= self.face_size <= 2048:
            _fail(f"data.face_size={self.face_size} must be 0 (the model's motion_encoder_size, 512 for Wan-Animate) "
                  "or a side in [16, 2048] pixels.")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adamw8bit (torchao AdamW8bit: 8-bit moments; train.modes.make_optimizer)
    lr: float = 1e-4  # DiT trunk (full mode) / LoRA factors (lora mode)
    adapter_lr: Optional[float] = None  # pose/face adapters; null -> lr
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    scheduler: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine/linear floor as a fraction of lr
    ema_decay: float = 0.0  # 0 disables the EMA of trained weights

    def __post_init__(self) -> None:
        _choice("optim", self, "name", OPTIMIZERS)
        _choice("optim", self, "scheduler", SCHEDULERS)
        _at_least("optim", self, 0, "lr")
        if self.adapter_lr is not None and self.adapter_lr < 0:
            _fail(f"optim.adapter_lr={self.adapter_lr} must be >= 0.")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            _fail(f"optim.betas={self.betas} must be two values in [0, 1).")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            _fail(f"optim.warmup_steps={self.warmup_steps}, optim.grad_clip={self.grad_clip} and optim.weight_decay="
                  f"{self.weight_decay} must be >= 0 (grad_clip 0 disables clipping).")
        if not self.eps > 0:
            _fail(f"optim.eps={self.eps} must be > 0 (AdamW divides by sqrt(v) + eps; 1e-8 is usual).")
        if not 0 <= self.ema_decay < 1:
            _fail(f"optim.ema_decay={self.ema_decay} must be in [0, 1) (0 disables EMA).")
        if not 0 <= self.min_lr_ratio <= 1:
            _fail(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1].")


@dataclass
class LoraSettings:
    rank: int = 16
    alpha: Optional[float] = None  # null -> rank (scale 1)
    dropout: float = 0.0
    # Official module names or regexes over them; empty -> every block linear except face and
    # modulation layers (the official relighting LoRA's targets).
    targets: list[str] = field(default_factory=list)
    train_adapters: bool = True  # also train pose/face adapters fully (at optim.adapter_lr)
    init_from: Optional[str] = None  # community-layout file to continue from

    def __post_init__(self) -> None:
        _at_least("lora", self, 1, "rank")
        if self.alpha is not None and self.alpha <= 0:
            _fail(f"lora.alpha={self.alpha} must be > 0 (or null for alpha = rank).")
        if not 0 <= self.dropout < 1:
            _fail(f"lora.dropout={self.dropout} must be in [0, 1).")


@dataclass
class TrainSettings:
    mode: str = "full"  # full | adapters_only | lora | self_attn (the blocks' self-attention only)
    max_steps: int = 60
    output_dir: str = "outputs/quickstart"
    cache_dir: Optional[str] = None  # quick-start model + synthetic data; null -> <output_dir>/cache
    checkpoint_every: int = 30
    keep_last: int = 2
    seed: int = 0
    micro_batch_size: int = 1
    grad_accum: int = 1
    # between micro-batches the gradients' running sum lives in pinned host memory (fp32, exact), not
    # on the device: grad_accum > 1 at the device memory of grad_accum=1 (train/grad_host.py)
    grad_accum_on_host: bool = False
    precision: str = "fp32"  # fp32 | bf16 (mixed precision through accelerate / DeepSpeed)
    distributed: str = "auto"  # auto (from `accelerate launch`) | ddp | deepspeed | none
    log_every: int = 1
    validate_every: int = 0  # 0 -> only at the end
    validation: bool = True
    validation_steps: int = 4  # sampler steps of the validation video
    # Raw (schema v1) shards whose first sample is rendered for validation; empty -> the first
    # training sample (cached training: decoded from its cached latents with the frozen VAE).
    validation_urls: list[str] = field(default_factory=list)
    max_consecutive_nonfinite: int = 5
    resume: bool = True  # rerunning the same command continues from the newest complete checkpoint
    # start over in an output_dir that holds a run: its files are moved to <output_dir>.replaced-<time>/
    # first (train.resume=false alone refuses there: two runs must never mix in one folder)
    overwrite: bool = False
    wandb: bool = False  # on -> online; off -> offline run files under output_dir/wandb
    wandb_project: str = "wan-animate"
    export: bool = True  # write output_dir/export/ at the end
    export_layouts: list[str] = field(default_factory=lambda: ["official", "diffusers"])
    # lora / adapters_only export the small files (lora.safetensors, adapters.safetensors); true adds the
    # merged full model (LoRA merged, trained adapters) in export_layouts, in the released dtype (bf16).
    export_merged: bool = False
    progress: bool = True
    # Debug / overfit checks: one fixed noise + timestep draw per sample (keyed by its index), so
    # the loss of a memorised set can go to ~0 instead of plateauing at the flow-matching noise floor.
    fixed_noise_per_sample: bool = False
    # Write <output_dir>/ranks/rank-<R>.json (world size, parameter digest, trained sample keys):
    # proves all ranks formed one group and ended with identical weights (CI, debugging).
    rank_report: bool = False
    # Sleep this long after every step (tests of kill / preemption need a window between steps).
    debug_step_delay_s: float = 0.0
    # Flop-count basis of the MFU figure (peak TFLOP/s per device); 0 -> guess from the device.
    peak_tflops: float = 0.0
    # Memory planner (train/plan/planner.py): "memory" runs one step on fake tensors and writes
    # <output_dir>/memory_plan.json instead of training; plan_world_size plans one rank of N
    # (0 -> the launched world size); the verdict judges the preset's target machine: plan_budget_gib
    # of device memory per rank and plan_host_gib of host RAM per rank (null: host RAM not judged).
    dry_run: Optional[str] = None
    plan_world_size: int = 0
    plan_budget_gib: float = 80.0
    plan_host_gib: Optional[float] = None
    # Sequence parallelism (train/sequence.py, docs/training.md): groups of N consecutive ranks share
    # one sample, each rank holding 1/N of its video tokens; N divides the process count and the heads.
    sequence_parallel: int = 1

    def __post_init__(self) -> None:
        if self.sequence_parallel < 1:
            _fail(f"train.sequence_parallel={self.sequence_parallel} must be >= 1 (1: off; N: groups of N ranks "
                  "share one sample; N divides the number of processes and the model's attention heads).")
        if self.dry_run not in (None, "memory"):
            _fail(f"train.dry_run={self.dry_run!r}; use train.dry_run=memory (or leave it unset to train).")
        if self.plan_world_size < 0:
            _fail(f"train.plan_world_size={self.plan_world_size} must be >= 0 (0 -> the launched world size).")
        if not self.plan_budget_gib > 0:
            _fail(f"train.plan_budget_gib={self.plan_budget_gib} must be > 0 (GiB of device memory per rank).")
        if self.plan_host_gib is not None and not self.plan_host_gib > 0:
            _fail(f"train.plan_host_gib={self.plan_host_gib} must be > 0 (GiB of host RAM per rank) or null.")
        _choice("train", self, "mode", MODES)
        _choice("train", self, "precision", PRECISIONS)
        _choice("train", self, "distributed", DISTRIBUTED)
        _at_least("train", self, 1, "max_steps", "keep_last", "micro_batch_size", "grad_accum", "log_every",
                  "validation_steps", "max_consecutive_nonfinite")
        _at_least("train", self, 0, "validate_every")
        if not self.output_dir:
            _fail("train.output_dir must be a folder path.")
        if self.checkpoint_every < 0:
            _fail(f"train.checkpoint_every={self.checkpoint_every} must be >= 0 (0 -> only at the end).")
        bad = [x for x in self.export_layouts if x not in ("official", "diffusers")]
        if bad:
            _fail(f"train.export_layouts has {bad}; allowed: official, diffusers.")


# ---------------------------------------------------------------------------- root


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    loss: LossConfig = field(default_factory=LossConfig)
    experiment_name: Optional[str] = None  # the preset that composed this config (informational)

    def __post_init__(self) -> None:
        t, d = self.train, self.data
        # the memory planner reads no weights and no data: it plans from the preset (or a folder's config.json)
        planning = t.dry_run == "memory"
        if d.source in ("shards", "cached") and not d.urls and not planning:
            _fail(f"data.source={d.source} needs data.urls=[...] (shard directories, globs or pipe: URLs).")
        # checkpoint_every / validate_every beyond max_steps are not refused: a preset's cadence meets a
        # user's short run (train.max_steps=2); the run header says what happens (preflight.schedule_notes).
        if t.mode == "lora" and self.lora.init_from is not None and not self.lora.init_from.endswith(".safetensors"):
            _fail(f"lora.init_from={self.lora.init_from} must be a .safetensors LoRA file.")
        if t.mode != "lora" and self.lora.init_from:
            _fail(f"lora.init_from is set but train.mode={t.mode}; set train.mode=lora or drop lora.init_from.")
        if t.mode == "adapters_only" and self.optim.adapter_lr == 0:
            _fail("train.mode=adapters_only with optim.adapter_lr=0 trains nothing; raise optim.adapter_lr.")
        for b in d.buckets if d.source == "synthetic" else []:
            if b[0] > d.synthetic_height * 4 or b[1] > d.synthetic_width * 4:
                _fail(f"data.buckets {b} is far larger than the synthetic clips; drop data.buckets.")
        m = self.model
        frozen_base = t.mode in ("lora", "adapters_only")
        if (m.base_dtype == "fp8" or m.block_swap) and not frozen_base:
            _fail(f"model.base_dtype={m.base_dtype} / model.block_swap={m.block_swap} act on frozen base weights; "
                  f"train.mode={t.mode} trains them all. Use train.mode=lora or adapters_only, or drop them.")
        check_launch(self, t.distributed)
        if t.sequence_parallel > 1 and self.model.path is None:  # a model folder's heads are checked on load
            heads = get_family(self.model.family).config(preset=self.model.preset)[0].num_heads
            check_sequence_parallel(t.sequence_parallel, heads)
        if self.model.path is None and self.model.preset == "14b" and not planning:
            # A 14B random model is never what a quick start wants; guard against half-edited presets.
            _fail("model.preset=14b without model.path would build a random 14B model; set model.path to the "
                  "Wan2.2-Animate-14B folder (or model=tiny for the quick start; train.dry_run=memory plans the "
                  "14B run from the preset alone).")

    @property
    def cache_dir(self) -> str:
        return self.train.cache_dir or os.path.join(self.train.output_dir, "cache")


def check_launch(cfg: Config, distributed: str, processes: int = 1) -> None:
    """Options that need one plain process: checked on the config (``train.distributed`` as given)
    and again at launch (the engine and process count accelerate resolved)."""
    m, t = cfg.model, cfg.train
    several = distributed in ("ddp", "deepspeed") or processes > 1
    if m.block_swap and several:
        _fail(f"model.block_swap={m.block_swap} keeps weights on the host of one process; it does not combine "
              f"with train.distributed={distributed} ({processes} process(es)). Set model.block_swap=0 or train "
              "one process (launch/accelerate/1gpu.yaml).")
    if m.base_dtype == "fp8" and distributed == "deepspeed":
        _fail("model.base_dtype=fp8 does not combine with DeepSpeed (its engine holds one dtype); drop it or train "
              "without DeepSpeed (launch/accelerate/1gpu.yaml).")
    if t.grad_accum_on_host and several:
        _fail(f"train.grad_accum_on_host=true keeps one process's gradients on its host; it does not combine "
              f"with train.distributed={distributed} ({processes} process(es); DDP / DeepSpeed own the gradients). "
              "Set it false or train one process.")


def check_sequence_parallel(n: int, num_heads: int | None = None, world: int | None = None,
                            world_name: str = "the number of processes") -> None:
    """``train.sequence_parallel=N``: N divides the world (ranks form groups of N sharing one sample)
    and the model's attention heads (Ulysses gives each rank whole heads). The one home of the rule
    (config, launch, planner)."""
    if world is not None and world % n:
        _fail(f"train.sequence_parallel={n} must divide {world_name} ({world}): ranks form groups of N that share "
              f"one sample. Valid values here: {[d for d in range(1, world + 1) if world % d == 0]}, or launch a "
              f"multiple of {n} processes.")
    try:
        if num_heads is not None:
            check_sequence_parallel_size(num_heads, n)
    except ValueError as e:
        _fail(str(e))


# ---------------------------------------------------------------------------- Hydra glue


def register_configs() -> None:
    """Register the schema so ``conf/train/config.yaml`` composes against it (``- base_config`` default)."""
    ConfigStore.instance().store(name="base_config", node=Config)


def to_config(cfg: DictConfig | dict[str, Any] | Config) -> Config:
    """Composed Hydra config -> validated dataclasses; raises ``ConfigError`` with the fix."""
    if not isinstance(cfg, Config):
        _check_finite(OmegaConf.to_container(OmegaConf.create(cfg), resolve=True))
    try:
        return to_dataclass(cfg, Config)
    except ConfigError:
        raise
    except (ValueError, TypeError, OmegaConfBaseException) as e:  # LossConfig (wan_animate) raises ValueError
        _fail(str(e).splitlines()[0] if isinstance(e, OmegaConfBaseException) else str(e))


def _all_finite(v: Any) -> bool:
    return all(map(_all_finite, v)) if isinstance(v, list) else not isinstance(v, float) or math.isfinite(v)


def _check_finite(values: Any, key: str = "") -> None:
    """No NaN / Inf anywhere (``x < 0`` checks let NaN through; Inf overflows later); a list is named whole."""
    if isinstance(values, dict):
        for k, v in values.items():
            _check_finite(v, f"{key}.{k}" if key else str(k))
    elif not _all_finite(values):
        _fail(f"{key}={values} must be finite (no NaN or Inf).")


def check_paths(cfg: Config) -> None:
    """File-system checks of the launch machine, before any model loads (kept out of the
    dataclasses so a config for another machine still composes)."""
    path = cfg.model.path
    if path is not None and not Path(path).is_dir():
        what = "is a file, not a folder" if Path(path).exists() else "does not exist"
        _fail(f"model.path={path} {what}; give the Wan2.2-Animate-14B model folder (official or diffusers layout), "
              "or drop model.path for the quick-start tiny model.")
    if cfg.lora.init_from is not None and not Path(cfg.lora.init_from).is_file():
        _fail(f"lora.init_from={cfg.lora.init_from} does not exist; give a community-layout LoRA .safetensors file.")
    from train.data import resolve_urls

    if cfg.train.dry_run == "memory":  # the planner reads no data
        return
    data_urls = cfg.data.urls if cfg.data.source != "synthetic" else []  # synthetic: written on first use
    for key, urls in (("data.urls", data_urls), ("train.validation_urls", cfg.train.validation_urls)):
        if urls:
            try:
                resolve_urls(list(urls))
            except FileNotFoundError as e:
                _fail(str(e).replace("data.urls", key, 1))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def compose(overrides: list[str] | None = None, config_dir: str | None = None) -> Config:
    """Compose ``conf/train/config.yaml`` with overrides outside of ``@hydra.main`` (tests, notebooks)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir or CONF_DIR, version_base=HYDRA_VERSION_BASE):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    return to_config(cfg)
