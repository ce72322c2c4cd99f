"""Model families: what the trainer, the memory planner, validation and eval need to know about one
kind of model, behind one small interface (docs/ARCHITECTURE.md, "Model families").

A family says what its model is (config, presets, building it on any device, loading its
checkpoint layouts), how training examples become its inputs (the driving streams it reads from a
shard, batch building, one forward for the loss), what trains (adapter groups, default LoRA
targets) and how it generates (its pipeline class). The trainer core only talks to a family; the
family's code lives in its own package.

    family = get_family(cfg.model.family)        # by name: "animate" (the default), ...
    family = family_of(path_or_model)            # from the tensor names of a checkpoint / model

``animate`` (Wan-Animate-14B) is the first family. A new family implements
``ModelFamily`` in its own package and adds one line to ``_KNOWN``; a config may also name any
``package.module:ATTRIBUTE`` holding a family object (tests use that for a fake family).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Iterable, Protocol, runtime_checkable

import torch
from torch import nn

DEFAULT_FAMILY = "animate"


@runtime_checkable
class ModelFamily(Protocol):
    """The contract. Attributes:

    * ``name``: the ``model.family`` value;
    * ``presets``: preset names ``config(preset=...)`` accepts;
    * ``streams``: the driving streams a decoded sample must carry for this family (shard member
      ``<stream>.mp4``), stream -> fixed square side in pixels or ``None`` (cropped like the target
      clip); a side of 0 means "from the model config" (``stream_sizes``). The pipeline's
      ``generate`` takes each as ``<stream>_video`` after the reference image;
    * ``adapter_prefixes``: top-level modules trained as "adapters" (``optim.adapter_lr``, the
      ``adapters_only`` mode);
    * ``lora_targets``: default LoRA targets (names or regexes), ``None`` = ``wan_animate.lora``'s
      default (every block linear except face and modulation layers);
    * ``self_attention``: a regex matching the names of the blocks' self-attention parameters (what
      ``train.mode=self_attn`` trains);
    * ``pipeline_class``: ``from_pretrained(folder, dit=..., ...)``, ``detect_layout(folder)``,
      ``generate(ref_image, **{f"{s}_video": ...})`` and the ``vae`` / ``text_encoder`` /
      ``image_encoder`` the batch builder uses.
    """

    name: str
    presets: tuple[str, ...]
    streams: dict[str, int | None]
    adapter_prefixes: tuple[str, ...]
    lora_targets: tuple[str, ...] | None
    self_attention: str
    pipeline_class: type

    def config(self, preset: str | None = None, folder: str | Path | None = None) -> tuple[Any, str]:
        """(model config, where it came from): the folder's ``config.json`` when it has one, else the preset."""

    def build(self, config: Any) -> nn.Module:
        """The model for ``config`` on the current default device (``with torch.device("meta")``: no memory)."""

    def owns(self, names: Iterable[str]) -> bool:
        """Whether checkpoint tensor names (any of the family's layouts) are this family's."""

    def dit_path(self, model_folder: str | Path) -> Path:
        """Where the denoiser's weights of a full model folder are (checks the folder's layout)."""

    def load(self, path: str | Path, *, dtype: torch.dtype | None, device: torch.device | str,
             config: Any = None) -> nn.Module:
        """The model from a weights file or a denoiser folder, in any of the family's layouts, cast
        as ``set_precision`` casts."""

    def save(self, model: nn.Module | dict, path: str | Path, *, layout: str, metadata: dict | None = None,
             config: Any = None) -> list[Path]:
        """Write a model or state dict (official names) in ``layout`` ("official" | "diffusers")."""

    def export_lora(self, lora_file: Path) -> dict[str, str]:
        """Extra files written beside an exported community-layout LoRA (name -> path; may be none)."""

    def apply_sequence_parallel(self, model: nn.Module, group) -> Any:
        """Install DeepSpeed-Ulysses sequence parallelism over ``group`` on the raw model; returns the plan."""

    def set_precision(self, model: nn.Module, dtype: torch.dtype) -> nn.Module:
        """Cast to ``dtype`` keeping the family's fp32-by-design tensors (norms, modulation) in fp32."""

    def stream_sizes(self, config: Any) -> dict[str, int | None]:
        """``streams`` with the sides that come from the model config filled in."""

    def build_inputs(self, examples: list[dict], encoders: Any, device: torch.device, dtype: torch.dtype,
                     clip_len: int) -> dict[str, Any]:
        """One micro-batch of training examples -> the model inputs; must hold ``latents``
        [B, C, T+1, h, w] (slot 0: the reference), ``noise_seeds`` and ``keys``."""

    def predict(self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                batch: dict[str, Any]) -> torch.Tensor:
        """The model's velocity prediction for ``noisy`` latents (shape of ``batch["latents"]``)."""


# ---------------------------------------------------------------------------- Wan-Animate-14B


class WanAnimateFamily:
    """Wan-Animate-14B (v1): pose latents + face crops through the motion encoder and face adapter."""

    name = "animate"
    streams = {"pose": None, "face": 0}  # face: the model's motion_encoder_size
    lora_targets = None
    self_attention = r"blocks\.\d+\.self_attn\."

    @property
    def presets(self) -> tuple[str, ...]:
        from wan_animate.config import PRESETS

        return tuple(PRESETS)

    @property
    def adapter_prefixes(self) -> tuple[str, ...]:
        from wan_animate.model import ADAPTER_PREFIXES

        return ADAPTER_PREFIXES

    @property
    def pipeline_class(self) -> type:
        from wan_animate.pipeline import AnimatePipeline

        return AnimatePipeline

    def config(self, preset: str | None = None, folder: str | Path | None = None):
        from wan_animate.config import WanAnimateConfig

        for sub in ("config.json", "transformer/config.json"):
            f = Path(folder) / sub if folder else None
            if f is not None and f.is_file():
                raw = json.loads(f.read_text())
                diffusers = raw.get("_class_name") == "WanAnimateTransformer3DModel" or "num_attention_heads" in raw
                conv = WanAnimateConfig.from_diffusers_config if diffusers else WanAnimateConfig.from_official_config
                return conv(raw), str(f)
        if preset is None:
            raise ValueError(f"{folder}: no config.json (or transformer/config.json) and no preset given.")
        return WanAnimateConfig.preset(preset), f"preset {preset!r}"

    def build(self, config) -> nn.Module:
        from wan_animate.model import WanAnimateDiT

        return WanAnimateDiT(config)

    def owns(self, names: Iterable[str]) -> bool:
        # the pose patch embedding and the motion encoder exist in both layouts (official / diffusers)
        return any("pose_patch_embedding" in n or "motion_encoder." in n or "motion_network." in n for n in names)

    def dit_path(self, model_folder: str | Path) -> Path:
        folder = Path(model_folder)
        return folder / "transformer" if self.pipeline_class.detect_layout(folder) == "diffusers" else folder

    def load(self, path, *, dtype, device, config=None) -> nn.Module:
        from wan_animate.weights.load import load_dit

        return load_dit(path, dtype=dtype, device=device, config=config)

    def set_precision(self, model, dtype):
        from wan_animate.model import set_precision

        return set_precision(model, dtype)

    def save(self, model, path, *, layout, metadata=None, config=None):
        from wan_animate.weights.save import save_dit

        return save_dit(model, path, layout=layout, metadata=metadata, config=config)

    def export_lora(self, lora_file: Path) -> dict[str, str]:
        return {}  # the community layout is what diffusers' WanLoraLoaderMixin reads

    def apply_sequence_parallel(self, model, group):
        from wan_animate.parallel import apply_sequence_parallel

        return apply_sequence_parallel(model, group)

    def stream_sizes(self, config) -> dict[str, int | None]:
        return {"pose": None, "face": config.motion_encoder_size}

    def build_inputs(self, examples, encoders, device, dtype, clip_len):
        from wan_animate.batch import build_dit_inputs

        return build_dit_inputs(examples, encoders, device, dtype, clip_len)

    def predict(self, model, noisy, timesteps, batch):
        from wan_animate.objective import predict_wan_animate

        return predict_wan_animate(model, noisy, timesteps, batch)


ANIMATE = WanAnimateFamily()

# ---------------------------------------------------------------------------- registry

# name -> "module:attribute" of the family object (imported on first use)
_KNOWN: dict[str, str] = {
    "animate": "wan_animate.family:ANIMATE",
    "animate2": "wan_animate.animate2.family:ANIMATE2",
}


def family_names() -> tuple[str, ...]:
    return tuple(_KNOWN)


def _import(spec: str) -> ModelFamily:
    module, _, attr = spec.partition(":")
    family = getattr(importlib.import_module(module), attr)
    if not isinstance(family, ModelFamily):
        raise TypeError(f"{spec} is not a ModelFamily (see wan_animate/family.py for the interface).")
    return family


def get_family(name: str) -> ModelFamily:
    """The family called ``name`` (``model.family``), or the object at ``package.module:ATTRIBUTE``."""
    if name in _KNOWN:
        return _import(_KNOWN[name])
    if ":" in name:
        try:
            return _import(name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"model.family={name!r} does not import ({e}); give a known family "
                             f"{list(_KNOWN)} or package.module:ATTRIBUTE.") from None
    raise ValueError(f"model.family={name!r} is unknown; choose one of {list(_KNOWN)} "
                     "(or package.module:ATTRIBUTE of your own ModelFamily).")


def tensor_names(path: str | Path) -> list[str]:
    """Tensor names of a checkpoint (file, denoiser folder or full model folder), headers only."""
    from wan_animate.weights.source import open_source

    return [name for shard in open_source(path).shards for name in shard.tensors]


def family_of(model_or_path: nn.Module | str | Path) -> ModelFamily:
    """The family whose tensor names a model or a checkpoint path carries (headers only). A full
    model folder that no family's layout check accepts raises the default family's reason
    (``FileNotFoundError`` naming what the folder lacks)."""
    families = [get_family(name) for name in _KNOWN]
    if isinstance(model_or_path, nn.Module):
        names, what = [n for n, _ in model_or_path.named_parameters()], type(model_or_path).__name__
    else:
        path, what = Path(model_or_path), str(model_or_path)
        if path.is_dir() and not (path / "config.json").is_file():  # a full model folder: find its denoiser
            reasons = []
            for f in families:
                try:
                    path = f.dit_path(model_or_path)
                    break
                except FileNotFoundError as e:
                    reasons.append(e)
            else:
                raise reasons[0]
        names = tensor_names(path)
    found = [f for f in families if f.owns(names)]
    if len(found) != 1:
        raise ValueError(f"{what}: {'no' if not found else 'more than one'} model family recognises its tensor "
                         f"names (known: {list(_KNOWN)}); is it a Wan-Animate checkpoint?")
    return found[0]
