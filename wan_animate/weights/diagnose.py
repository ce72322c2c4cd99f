"""Why a checkpoint does not fit the model: ``CheckpointError`` with the missing, unexpected and
mismatched tensors and the likely cause. File-level causes (truncated, missing shard, unsafe
pickle) are raised where the files are read.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch

from wan_animate.config import PRESETS, WanAnimateConfig
from wan_animate.weights.keymap import diffusers_to_official

SHOW = 5  # how many names of each problem an error message lists
_QUANT_SUFFIXES = ("scale_weight", "weight_scale", "scale_input", "input_scale", ".comfy_quant")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as the requested Wan-Animate DiT.

    ``missing``, ``unexpected`` and ``mismatched`` hold the full lists (official names);
    ``cause`` is the one-line diagnosis also printed in the message.
    """

    def __init__(
        self,
        message: str,
        *,
        cause: str = "",
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[tuple[str, tuple, tuple]] | None = None,
    ):
        super().__init__(message)
        self.cause = cause
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])
        self.mismatched = list(mismatched or [])


def _infer_sizes(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """A few config sizes read off the checkpoint's shapes (official names), for diagnosis."""
    sizes: dict[str, int] = {}
    if "patch_embedding.weight" in sd:
        sizes["dim"] = sd["patch_embedding.weight"].shape[0]
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks:
        sizes["num_layers"] = max(blocks) + 1
    for ffn in ("blocks.0.ffn.0.weight", "blocks.0.block.ffn.0.weight"):  # Animate v1 / Animate-2 names
        if ffn in sd:
            sizes["ffn_dim"] = sd[ffn].shape[0]
    if "face_adapter.fuser_blocks.0.q_norm.weight" in sd and "dim" in sizes:
        sizes["num_heads"] = sizes["dim"] // sd["face_adapter.fuser_blocks.0.q_norm.weight"].shape[0]
    res = {int(m.group(1)) for k in sd if (m := re.match(r"motion_encoder\.enc\.net_app\.convs\.(\d+)\.conv1", k))}
    # residual blocks beyond the config's count keep their diffusers names (0-based)
    res |= {int(m.group(1)) + 1 for k in sd if (m := re.match(r"motion_encoder\.res_blocks\.(\d+)\.conv1", k))}
    if res:
        sizes["motion_encoder_size"] = 2 ** (max(res) + 2)
    return sizes


def _suggest(sizes: Mapping[str, int], config: WanAnimateConfig, presets: Mapping[str, Any] = PRESETS) -> str:
    sizes = {k: v for k, v in sizes.items() if hasattr(config, k)}
    diffs = [f"{k}={v} (config: {getattr(config, k)})" for k, v in sizes.items() if getattr(config, k) != v]
    matching = [name for name, p in presets.items() if all(getattr(p, k) == v for k, v in sizes.items())]
    hint = f"checkpoint has {', '.join(diffs)}" if diffs else "sub-module sizes differ from the config"
    if matching:
        hint += (f"; it looks like preset {matching[0]!r}: pass config={type(config).__name__}.preset("
                 f"{matching[0]!r})")
    else:
        hint += "; pass the config the checkpoint was saved with (or load its folder with config.json)"
    return hint


def _index_pattern(name: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.)", "N", name)


def _extra_prefix(unexpected: list[str], missing: set[str]) -> str:
    """A leading name component that, removed, turns most unexpected keys into missing ones."""
    counts = Counter(key.partition(".")[0] + "." for key in unexpected if key.partition(".")[2] in missing)
    best, count = max(counts.items(), key=lambda item: item[1], default=("", 0))
    return best if count * 2 > len(missing) else ""


def check_against_model(
    ckpt: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    config: WanAnimateConfig,
    *,
    where: str,
    layout: str,
    config_source: str,
    optional: set[str],
    src: Any = None,
    model_name: str = "Wan-Animate DiT",
    presets: Mapping[str, Any] = PRESETS,
    rename: Callable[[dict], dict] | None = None,
) -> None:
    """Raise ``CheckpointError`` unless ``ckpt`` (official names, meta tensors are enough) has exactly
    the tensors of ``expected`` (``optional`` ones may be absent). ``src``: the ``weights.source.Source``
    read, whose stored dtypes reveal quantised files. Another model family passes its ``model_name``,
    ``presets`` and ``rename`` (its diffusers -> official names, non-strict; default: Animate v1's)."""
    missing = sorted(k for k in expected if k not in ckpt and k not in optional)
    unexpected = sorted(k for k in ckpt if k not in expected)
    mismatched = [(k, tuple(ckpt[k].shape), tuple(expected[k].shape))
                  for k in expected if k in ckpt and ckpt[k].shape != expected[k].shape]
    if not (missing or unexpected or mismatched):
        return
    # Wan-Animate names with other block/layer numbers still count as ours (a wrong preset, not a
    # foreign model): compare names with every index replaced by N.
    patterns = {_index_pattern(k) for k in expected}
    known = sum(_index_pattern(k) in patterns for k in ckpt)
    lora = any(".lora_A" in k or ".lora_down" in k for k in ckpt)
    quantised = src is not None and any(
        info.dtype.itemsize == 1 and info.dtype.is_floating_point or name.endswith(_QUANT_SUFFIXES)
        for shard in src.shards for name, info in shard.tensors.items())
    # unexpected names that are diffusers spellings of expected ones: a mixed file (in a diffusers
    # layout file official names are already accepted as they are)
    renamed = 0
    if layout == "official" and unexpected:
        part = {k: ckpt[k] for k in unexpected}
        as_official = (rename(part) if rename is not None else
                       diffusers_to_official(part, config, strict=False, add_blur_kernels=False))
        renamed = len(set(as_official) & set(missing))
    prefixed = _extra_prefix(unexpected, set(missing))
    if lora:
        cause = ("this is a LoRA file, not a full DiT: load the base model with load_dit and apply the LoRA "
                 "with wan_animate.lora")
    elif quantised:
        cause = ("a quantised (fp8/scaled) checkpoint: its scale tensors and fp8 weights are not the model's; "
                 "use a bf16/fp16/fp32 export of the DiT")
    elif prefixed:
        cause = (f"the names carry an extra prefix {prefixed!r} (e.g. from a training wrapper); strip it from "
                 "every key")
    elif renamed:
        cause = (f"mixed layouts: {renamed} missing tensors are present under their diffusers names in a "
                 "checkpoint that is otherwise official; the files come from two different exports, keep one "
                 "(or convert it)")
    elif known * 2 < len(ckpt) or not layout:
        cause = (f"foreign keys: these tensors do not belong to a {model_name} (another model, e.g. a VAE or "
                 "text encoder, or a different architecture)")
    elif mismatched or (unexpected and missing):
        cause = f"wrong preset/config (config from {config_source}): " + _suggest(_infer_sizes(ckpt), config, presets)
    elif missing:
        cause = (f"incomplete checkpoint: {len(missing)} of {len(expected)} tensors are absent (a partial "
                 "download, a file saved from part of the model, or the wrong layout)")
    else:
        cause = (f"the checkpoint has {len(unexpected)} tensors the model lacks: wrong preset/config (config from "
                 f"{config_source}), e.g. fewer layers than the file: " + _suggest(_infer_sizes(ckpt), config, presets))

    def listing(items: list[str]) -> str:
        return ", ".join(items[:SHOW]) + (f", ... (+{len(items) - SHOW} more)" if len(items) > SHOW else "")

    lines = [f"Cannot load {where} as a {model_name} ({layout or 'unrecognised'} layout, "
             f"config from {config_source}):"]
    if missing:
        lines.append(f"  missing keys ({len(missing)} of {len(expected)}): {listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)} of {len(ckpt)}): {listing(unexpected)}")
    if mismatched:
        shown = [f"{k}: checkpoint {a} vs model {b}" for k, a, b in mismatched]
        lines.append(f"  shape mismatches ({len(mismatched)}): {listing(shown)}")
    lines.append(f"Likely cause: {cause}.")
    raise CheckpointError("\n".join(lines), cause=cause, missing=missing, unexpected=unexpected,
                          mismatched=mismatched)
