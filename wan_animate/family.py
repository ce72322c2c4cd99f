"""Model families: what the trainer, the memory planner, validation and eval need to know about one
kind of model, behind one small interface (docs/ARCHITECTURE.md, "Model families").

    family = get_family(cfg.model.family)        # by name: "animate" (the default), ...
    family = family_of(path_or_model)            # from the tensor names of a checkpoint / model

``animate`` (Wan-Animate-14B) is the first family. A new family implements ``ModelFamily`` in its
own package (``FamilyBase`` does the members that only name the family's objects) and adds one
line to ``_KNOWN``; a config may also name any ``package.module:ATTRIBUTE`` holding a family object
(tests use that for a fake family).
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
    """The contract (docs/ARCHITECTURE.md, "Model families", says who uses each member):

    * ``name``: the ``model.family`` value; ``presets``: preset names ``config(preset=...)`` accepts;
    * ``streams``: the driving streams a decoded sample must carry (shard member ``<stream>.mp4``),
      stream -> fixed square side in pixels, ``None`` (cropped like the target clip) or 0 (from the
      model config: ``stream_sizes``). The pipeline's ``generate`` takes each as ``<stream>_video``;
    * ``adapter_prefixes``: top-level modules trained as "adapters" (``optim.adapter_lr``,
      ``adapters_only``); ``lora_targets``: default LoRA targets (names or regexes; ``None``:
      ``wan_animate.lora``'s default); ``self_attention``: a regex of the self-attention parameter
      names (``train.mode=self_attn``); ``conditions``: what the model follows, condition -> the
      batch keys that carry it (swapped whole by ``wan_animate.heldout``'s condition sensitivity;
      ``ref`` also swaps slot 0 of ``y`` and ``latents``);
    * ``pipeline_class``: the generation loop (``wan_animate.pipeline.AnimatePipeline``'s interface:
      ``from_pretrained``, ``detect_layout``, ``sampling_defaults``, ``read_inputs``, ``generate``,
      the frozen ``vae`` / ``text_encoder`` / ``image_encoder`` the batch builder uses);
    * ``config(preset, folder)``: (model config, where it came from): the folder's ``config.json``,
      else the preset; ``build(config)``: the model on the current default device (meta: no memory);
    * ``owns(names)``: whether checkpoint tensor names (any of its layouts) are the family's;
      ``dit_path(model_folder)``: where a full model folder's denoiser is (checks the layout);
    * ``load(path, dtype=, device=, config=)``: the model from a file or denoiser folder in any of its
      layouts (``config`` None: the checkpoint's own), cast as ``set_precision`` casts (fp32-by-design
      norms and modulation kept fp32); ``save(model, path, layout=, metadata=, config=)``: official
      names in ``layout``; ``export_lora(file)``: extra files beside an exported LoRA (name -> path);
    * ``apply_sequence_parallel(model, group)``: Ulysses sequence parallelism on the raw model;
    * ``build_inputs(examples, encoders, device, dtype, clip_len)``: a micro-batch -> the model
      inputs, with ``latents`` [B, C, T+1, h, w] (slot 0: the reference), ``noise_seeds``, ``keys``;
      ``predict(model, noisy, timesteps, batch)``: the velocity for ``noisy`` (shape of ``latents``).
    """

    name: str
    presets: tuple[str, ...]
    streams: dict[str, int | None]
    adapter_prefixes: tuple[str, ...]
    lora_targets: tuple[str, ...] | None
    self_attention: str
    conditions: dict[str, tuple[str, ...]]
    pipeline_class: type

    def config(self, preset: str | None = None, folder: str | Path | None = None) -> tuple[Any, str]: ...
    def build(self, config: Any) -> nn.Module: ...
    def owns(self, names: Iterable[str]) -> bool: ...
    def dit_path(self, model_folder: str | Path) -> Path: ...
    def load(self, path: str | Path, *, dtype: torch.dtype | None, device: torch.device | str,
             config: Any = None) -> nn.Module: ...
    def save(self, model: nn.Module | dict, path: str | Path, *, layout: str, metadata: dict | None = None,
             config: Any = None) -> list[Path]: ...
    def convert(self, src: str | Path, dst: str | Path, to: str, *, dtype: torch.dtype | None = None,
                max_shard_size: int | str = "5GB", config: Any = None) -> list[Path]: ...
    def inspect(self, path: str | Path) -> dict[str, Any]: ...
    def export_lora(self, lora_file: Path) -> dict[str, str]: ...
    def apply_sequence_parallel(self, model: nn.Module, group) -> Any: ...
    def set_precision(self, model: nn.Module, dtype: torch.dtype) -> nn.Module: ...
    def stream_sizes(self, config: Any) -> dict[str, int | None]: ...
    def build_inputs(self, examples: list[dict], encoders: Any, device: torch.device, dtype: torch.dtype,
                     clip_len: int) -> dict[str, Any]: ...
    def predict(self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                batch: dict[str, Any]) -> torch.Tensor: ...


def _obj(spec: str) -> Any:
    """The object at ``package.module:ATTRIBUTE`` (imported on first use)."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def _call(attr: str):
    """A method that calls the object the family's ``attr`` names, with the method's arguments."""
    return lambda self, *args, **kwargs: _obj(getattr(self, attr))(*args, **kwargs)


class FamilyBase:
    """The members that only name the family's objects (``"module:attribute"``, imported on first
    use, so that ``wan_animate.family`` stays light): its config class (``preset(name)``) and
    ``config.json`` reader, model class, pipeline, weights load / save / convert / inspect, sequence
    parallelism, batch building and forward."""

    name: str
    streams: dict[str, int | None]
    lora_targets: tuple[str, ...] | None = None
    adapter_prefixes: tuple[str, ...] = ()
    _presets = _config_class = _read_config = _model = _pipeline = _load = _save = ""
    _convert = _inspect = _sequence_parallel = _build_inputs = _predict = ""
    _set_precision = "wan_animate.model:set_precision"

    # the members that only call the object they name (arguments and meaning: ``ModelFamily``)
    build, load, save, convert = _call("_model"), _call("_load"), _call("_save"), _call("_convert")
    apply_sequence_parallel, set_precision = _call("_sequence_parallel"), _call("_set_precision")
    build_inputs, predict = _call("_build_inputs"), _call("_predict")

    @property
    def presets(self) -> tuple[str, ...]:
        return tuple(_obj(self._presets))

    @property
    def pipeline_class(self) -> type:
        return _obj(self._pipeline)

    def config(self, preset: str | None = None, folder: str | Path | None = None):
        for sub in ("config.json", "transformer/config.json"):
            f = Path(folder) / sub if folder else None
            if f is not None and f.is_file():
                return _obj(self._read_config)(json.loads(f.read_text())), str(f)
        if preset is None:
            raise ValueError(f"{folder}: no config.json (or transformer/config.json) and no preset given.")
        return _obj(self._config_class).preset(preset), f"preset {preset!r}"

    def dit_path(self, model_folder: str | Path) -> Path:
        folder = Path(model_folder)
        return folder / "transformer" if self.pipeline_class.detect_layout(folder) == "diffusers" else folder

    def inspect(self, path) -> dict[str, Any]:
        """Family, layout, config and size of a checkpoint, from its headers only."""
        return {"family": self.name, **_obj(self._inspect)(path)}

    def export_lora(self, lora_file: Path) -> dict[str, str]:
        return {}

    def stream_sizes(self, config) -> dict[str, int | None]:
        return dict(self.streams)


class WanAnimateFamily(FamilyBase):
    """Wan-Animate-14B (v1): pose latents + face crops through the motion encoder and face adapter;
    its community-layout LoRA is what diffusers' ``WanLoraLoaderMixin`` reads (no extra export)."""

    name = "animate"
    streams = {"pose": None, "face": 0}  # face: the model's motion_encoder_size
    conditions = {"pose": ("pose_latents",), "face": ("face_pixel_values",), "ref": ("clip_fea",)}
    self_attention = r"blocks\.\d+\.self_attn\."
    _presets, _config_class = "wan_animate.config:PRESETS", "wan_animate.config:WanAnimateConfig"
    _read_config, _model = "wan_animate.weights.source:_config_from_dict", "wan_animate.model:WanAnimateDiT"
    _pipeline = "wan_animate.pipeline:AnimatePipeline"
    _load, _save = "wan_animate.weights.load:load_dit", "wan_animate.weights.save:save_dit"
    _convert, _inspect = "wan_animate.weights.save:convert_checkpoint", "wan_animate.weights.source:inspect_checkpoint"
    _sequence_parallel = "wan_animate.parallel:apply_sequence_parallel"
    _build_inputs, _predict = "wan_animate.batch:build_dit_inputs", "wan_animate.objective:predict_wan_animate"

    @property
    def adapter_prefixes(self) -> tuple[str, ...]:
        return _obj("wan_animate.model:ADAPTER_PREFIXES")

    def owns(self, names: Iterable[str]) -> bool:
        # the pose patch embedding and the motion encoder exist in both layouts (official / diffusers)
        return any("pose_patch_embedding" in n or "motion_encoder." in n or "motion_network." in n for n in names)

    def stream_sizes(self, config) -> dict[str, int | None]:
        return {"pose": None, "face": config.motion_encoder_size}


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
    family = _obj(spec)
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


def family_of(model_or_path: nn.Module | str | Path, default: ModelFamily | None = None) -> ModelFamily:
    """The family whose tensor names a model or a checkpoint path carries (headers only). A full
    model folder that no family's layout check accepts raises the default family's reason
    (``FileNotFoundError`` naming what the folder lacks); names that no family recognises go to
    ``default`` when one is given (whose loader then says what is wrong), else raise."""
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
        from wan_animate.weights.source import open_source

        names = [name for shard in open_source(path).shards for name in shard.tensors]  # headers only
    found = [f for f in families if f.owns(names)]
    if not found and default is not None:
        return default
    if len(found) != 1:
        raise ValueError(f"{what}: {'no' if not found else 'more than one'} model family recognises its tensor "
                         f"names (known: {list(_KNOWN)}); is it a Wan-Animate checkpoint?")
    return found[0]
