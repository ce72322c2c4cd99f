"""Trainable-only training state for ``train.mode=lora|adapters_only|self_attn``.

Their checkpoints hold what trains (parameters, optimizer states, RNG, scheduler, data position);
the frozen base is referenced in ``base_model.json`` by path and a content fingerprint, checked
before a resume loads anything. The fingerprint: SHA-256 over the DiT ``config.json`` and, per
weight file, its name, size, safetensors header and the first ``SAMPLE_BYTES`` of every tensor
(~6 MB read for the 14B DiT instead of 34 GB; it misses only a change past the first 4 KiB of
every tensor touched).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from train.checkpoint.verify import file_digest
from wan_animate.files import atomic_write_json
from wan_animate.weights.source import open_source

TRAINABLE_ONLY_MODES = ("lora", "adapters_only", "self_attn")
BASE_FILE = "base_model.json"
SAMPLE_BYTES = 4096
METHOD = f"sha256(config.json, per weight file: name, size, safetensors header, first {SAMPLE_BYTES} B of each tensor)"
# accelerate's file name for the first prepared model's weights (accelerate.utils.SAFE_MODEL_NAME)
MODEL_FILE = "model.safetensors"


class BaseModelChangedError(RuntimeError):
    """The frozen base under ``model.path`` is not the one a trainable-only checkpoint was trained on."""


def is_trainable_only(mode: str) -> bool:
    return mode in TRAINABLE_ONLY_MODES


# ---------------------------------------------------------------------------------------------- fingerprint


def _hash_safetensors(h, path: Path) -> None:
    """Header + the first SAMPLE_BYTES of every tensor's data, in header order."""
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise BaseModelChangedError(f"{path}: too short to be a safetensors file; download it again.")
        (header_len,) = struct.unpack("<Q", raw_len)
        header_bytes = f.read(header_len)
        h.update(raw_len + header_bytes)
        header = json.loads(header_bytes)
        data_start = 8 + header_len
        for name in sorted(k for k in header if k != "__metadata__"):
            begin, end = header[name]["data_offsets"]
            f.seek(data_start + begin)
            h.update(f.read(min(SAMPLE_BYTES, end - begin)))


def fingerprint_base(model_path: str | Path) -> dict[str, Any]:
    """``{"path", "sha256", "files", "method"}`` of the DiT weights under ``model_path`` (a model
    folder of either layout, a DiT folder or one weight file)."""
    src = open_source(model_path)
    h = hashlib.sha256()
    if src.folder_config is not None:
        h.update(src.folder_config.encode())
    files = [s.path for s in src.shards]
    for path in files:
        h.update(path.name.encode())
        h.update(str(path.stat().st_size).encode())
        if path.suffix == ".safetensors":
            _hash_safetensors(h, path)
        else:  # a pickle weight file: the checkpoint manifest's sampled digest
            h.update(file_digest(path).encode())
    return {"path": str(Path(model_path).resolve()), "sha256": h.hexdigest(), "files": len(files), "method": METHOD}


def check_base(checkpoint: Path, current: dict[str, Any]) -> None:
    """Refuse to resume ``checkpoint`` when its recorded base differs from ``current``. Checkpoints
    that record no base (full mode, or written before trainable-only checkpoints) hold the whole
    model and need no check."""
    path = Path(checkpoint) / BASE_FILE
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    if saved.get("sha256") == current["sha256"]:
        return
    moved = "" if saved.get("path") == current["path"] else f" (the checkpoint's base was {saved.get('path')})"
    raise BaseModelChangedError(
        f"{checkpoint} holds only the trained weights of a run on a base model with fingerprint "
        f"{str(saved.get('sha256'))[:12]}; model.path={current['path']} has fingerprint {current['sha256'][:12]}"
        f"{moved}: the frozen weights differ, so resuming would put these LoRA/adapter weights on another model. "
        "Set model.path to the original base, or start a new train.output_dir.")


# ---------------------------------------------------------------------------------------------- accelerate hooks


def _trainable_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


class TrainableOnlyCheckpoints:
    """Installs the accelerate save/load hooks that keep frozen weights out of checkpoints.

    Plain / DDP path: the save hook keeps only the trainable tensors of ``model.safetensors``; the
    load hook loads that file itself (every trainable must be there) and takes the model off
    accelerate's list, so the frozen weights stay those of the base. DeepSpeed engines save and
    load their modules themselves: ``save_kwargs`` / ``load_kwargs`` ask them for the same
    (``exclude_frozen_parameters`` / non-strict module load); the optimizer partitions then hold
    the trainables' fp32 master weights, which the engine copies back on load.
    """

    def __init__(self, acc, base: dict[str, Any], mode: str):
        self.acc, self.base, self.mode = acc, base, mode
        deepspeed = acc.state.deepspeed_plugin is not None
        self.save_kwargs = {"exclude_frozen_parameters": True} if deepspeed else {}
        self.load_kwargs = {"load_module_strict": False} if deepspeed else {}
        acc.register_save_state_pre_hook(self._on_save)
        acc.register_load_state_pre_hook(self._on_load)

    def _on_save(self, models: list, weights: list, output_dir: str) -> None:
        for i, model in enumerate(models[: len(weights)]):
            keep = _trainable_names(model)
            weights[i] = {k: v for k, v in weights[i].items() if k in keep}
        if self.acc.is_main_process:
            atomic_write_json(Path(output_dir) / BASE_FILE, {**self.base, "train_mode": self.mode})

    def _on_load(self, models: list, input_dir: str) -> None:
        """``models`` is accelerate's list of models it would load (empty under DeepSpeed, whose
        engines loaded themselves just before; the run stops here all the same)."""
        check_base(Path(input_dir), self.base)
        if not models:
            return
        model = models.pop(0)
        path = Path(input_dir) / MODEL_FILE
        state = load_file(str(path))
        lacking = sorted(_trainable_names(model) - set(state))
        if lacking:
            raise RuntimeError(
                f"{path} lacks {len(lacking)} trainable tensor(s) ({lacking[:3]}, ...): it was written with another "
                "train.mode / lora settings. Resume with the checkpoint's settings, or start a new train.output_dir.")
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"{path} has tensors this model lacks ({result.unexpected_keys[:3]}, ...); resume with "
                               "the checkpoint's train.mode / lora settings, or start a new train.output_dir.")
