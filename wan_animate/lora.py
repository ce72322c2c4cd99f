"""LoRA on the Wan-Animate DiT: training-side injection (peft) and the community file layout.

File layout (safetensors), the one diffusers' ``WanLoraLoaderMixin`` and ComfyUI read::

    diffusion_model.<official module name>.lora_A.weight   [rank, in_features]
    diffusion_model.<official module name>.lora_B.weight   [out_features, rank]
    diffusion_model.<official module name>.alpha           scalar

The update of a targeted linear is ``W + scale * (alpha / rank) * B @ A``. Files that name the
factors ``lora_down`` / ``lora_up``, or that omit the ``diffusion_model.`` prefix, or that carry no
alpha (then alpha = rank) are read too.

Training: ``add_lora(dit, rank, alpha)`` wraps the default targets (every linear inside
``blocks.N`` except face and modulation layers, as the official relighting LoRA) with peft;
``lora_state_dict(dit)`` exports; ``apply_lora(dit, path, scale)`` merges a file into a plain DiT
for inference (what ``AnimatePipeline.load_lora`` calls).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

PREFIX = "diffusion_model."
ADAPTER_NAME = "default"
# Module-name fragments never targeted by default (face adapter/encoder, modulation tables).
DEFAULT_EXCLUDE: tuple[str, ...] = ("face", "modulation", "motion")
_BLOCK_RE = re.compile(r"^blocks\.\d+\.")


class LoraError(ValueError):
    """A LoRA file or target list that does not fit the model."""


# ---------------------------------------------------------------------------- targets


def default_lora_targets(model: nn.Module, exclude: Iterable[str] = DEFAULT_EXCLUDE) -> list[str]:
    """Full names of every ``nn.Linear`` inside ``blocks.N`` minus the excluded fragments."""
    exclude = tuple(exclude)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not _BLOCK_RE.match(name):
            continue
        if ".base_layer" in name or ".lora_" in name:
            continue  # already wrapped by peft
        if any(fragment in name for fragment in exclude):
            continue
        names.append(name)
    if not names:
        raise LoraError("The model has no linear layer under blocks.N to put LoRA on.")
    return names


def resolve_lora_targets(model: nn.Module, targets: Iterable[str] | None) -> list[str]:
    """Expand user targets: ``None`` -> defaults; otherwise each entry is a full module name or a
    regular expression matched against full names of linears (e.g. ``blocks\\.\\d+\\.ffn\\.0``)."""
    if targets is None:
        return default_lora_targets(model)
    targets = list(targets)
    if not targets:
        return default_lora_targets(model)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen: list[str] = []
    for pattern in targets:
        if pattern in linears:
            hits = [pattern]
        else:
            rx = re.compile(pattern)
            hits = sorted(n for n in linears if rx.fullmatch(n))
        if not hits:
            raise LoraError(
                f"LoRA target {pattern!r} matches no linear layer of the DiT; use an official module "
                "name (e.g. 'blocks.0.self_attn.q') or a regex over such names, or leave targets empty "
                "for the default (all block linears except face/modulation)."
            )
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


# ---------------------------------------------------------------------------- training (peft)


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    targets: Iterable[str] | None = None,
    dropout: float = 0.0,
) -> list[str]:
    """Wrap the target linears of ``model`` in place with peft LoRA layers (B initialised to zero,
    so the model output is unchanged). Returns the wrapped module names. Only LoRA factors stay
    trainable afterwards; callers re-enable whatever else they train (e.g. the adapters)."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise LoraError(f"LoRA rank must be >= 1, got {rank}.")
    names = resolve_lora_targets(model, targets)
    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha if alpha is not None else rank),
        lora_dropout=float(dropout),
        target_modules=names,
        bias="none",
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    return names


def is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key or ".lora_dropout." in key or ".lora_embedding" in key


def lora_state_dict(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    alpha: float | Mapping[str, float] | None = None,
    dtype: torch.dtype | None = torch.float32,
) -> dict[str, torch.Tensor]:
    """Community-layout LoRA tensors of a peft-wrapped DiT (or of its full state dict).

    ``alpha`` is read from the peft layers when a module is given; with a state dict pass it
    (one number, or a mapping module name -> alpha)."""
    alphas: dict[str, float] = {}
    if isinstance(model_or_state, nn.Module):
        from peft.tuners.lora import LoraLayer

        for name, module in model_or_state.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
                alphas[name] = float(module.lora_alpha[ADAPTER_NAME])
        state = model_or_state.state_dict()
    else:
        state = dict(model_or_state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for factor in ("lora_A", "lora_B"):
            tag = f".{factor}.{ADAPTER_NAME}.weight"
            if key.endswith(tag):
                module = key[: -len(tag)]
                t = value.detach()
                out[f"{PREFIX}{module}.{factor}.weight"] = t.to(dtype) if dtype is not None else t.clone()
                if factor == "lora_A":
                    if module in alphas:
                        a = alphas[module]
                    elif isinstance(alpha, Mapping):
                        a = float(alpha[module])
                    elif alpha is not None:
                        a = float(alpha)
                    else:
                        raise LoraError(f"alpha of {module} unknown; pass alpha= when exporting a state dict.")
                    out[f"{PREFIX}{module}.alpha"] = torch.tensor(a, dtype=torch.float32)
    if not out:
        raise LoraError("No LoRA factors found (was add_lora applied?).")
    return out


def strip_lora_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain DiT state dict (official names) from a peft-wrapped one: LoRA factors dropped and
    ``.base_layer.`` removed (the base weights, not merged)."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if not is_lora_key(k)}


def save_lora(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    path: str | Path,
    alpha: float | Mapping[str, float] | None = None,
    metadata: Mapping[str, object] | None = None,
) -> Path:
    """Write the community-layout safetensors file; ``metadata`` values are JSON-encoded."""
    from safetensors.torch import save_file

    tensors = lora_state_dict(model_or_state, alpha=alpha)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {"format": "pt", "lora_layout": "diffusion_model"}
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_lora_into_peft(model: nn.Module, path_or_state: str | Path | Mapping[str, torch.Tensor]) -> list[str]:
    """Copy a community-layout file into an ``add_lora``-wrapped model (to continue training).
    The file's alpha must equal the wrapped layers' alpha."""
    from peft.tuners.lora import LoraLayer

    factors = read_lora(path_or_state)
    modules = dict(model.named_modules())
    done = []
    for name, (a, b, alpha) in factors.items():
        layer = modules.get(name)
        if not isinstance(layer, LoraLayer) or ADAPTER_NAME not in layer.lora_A:
            raise LoraError(f"LoRA file targets {name!r}, which add_lora did not wrap in this model.")
        own_alpha = float(layer.lora_alpha[ADAPTER_NAME])
        if alpha is not None and abs(alpha - own_alpha) > 1e-6:
            raise LoraError(f"{name}: file alpha {alpha} != configured lora.alpha {own_alpha}; set lora.alpha={alpha}.")
        with torch.no_grad():
            layer.lora_A[ADAPTER_NAME].weight.copy_(a)
            layer.lora_B[ADAPTER_NAME].weight.copy_(b)
        done.append(name)
    return done


# ---------------------------------------------------------------------------- reading / inference


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise LoraError(f"{path} does not hold a tensor dictionary.")
    return obj


def read_lora(
    path_or_state: str | Path | Mapping[str, torch.Tensor],
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """Parse a LoRA file/state dict into ``{official module name: (A [r,in], B [out,r], alpha|None)}``."""
    if isinstance(path_or_state, (str, Path)):
        path = Path(path_or_state)
        if not path.is_file():
            raise LoraError(f"LoRA file {path} does not exist.")
        state = _load_tensors(path)
    else:
        state = dict(path_or_state)
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    unknown = []
    for key, value in state.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for tag, bucket in ((".lora_A.weight", downs), (".lora_down.weight", downs),
                            (".lora_B.weight", ups), (".lora_up.weight", ups)):
            if name.endswith(tag):
                bucket[name[: -len(tag)]] = value
                break
        else:
            if name.endswith(".alpha"):
                alphas[name[: -len(".alpha")]] = float(value.item())
            else:
                unknown.append(key)
    if unknown:
        raise LoraError(
            f"LoRA file has {len(unknown)} tensors that are not LoRA factors or alphas "
            f"(e.g. {unknown[:3]}); expected 'diffusion_model.<name>.lora_A/lora_B.weight' and '.alpha'."
        )
    if set(downs) != set(ups):
        missing = sorted(set(downs) ^ set(ups))
        raise LoraError(f"LoRA factors without their partner (A without B or B without A): {missing[:5]}.")
    if not downs:
        raise LoraError("LoRA file holds no factors.")
    out = {}
    for name in sorted(downs):
        a, b = downs[name], ups[name]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoraError(f"{name}: factor shapes A {tuple(a.shape)} / B {tuple(b.shape)} are not a rank-r pair.")
        out[name] = (a, b, alphas.get(name))
    return out


@torch.no_grad()
def apply_lora(dit: nn.Module, path_or_state: str | Path | Mapping[str, torch.Tensor], scale: float = 1.0) -> list[str]:
    """Merge a LoRA into a plain DiT in place: ``W += scale * alpha / rank * B @ A`` (fp32 math,
    cast back to the weight's dtype). Returns the merged module names. Unknown module names or
    shape mismatches raise ``LoraError`` naming the module."""
    factors = read_lora(path_or_state)
    modules = dict(dit.named_modules())
    for name, (a, b, alpha) in factors.items():
        layer = modules.get(name)
        if layer is None or not isinstance(getattr(layer, "weight", None), torch.Tensor):
            raise LoraError(f"LoRA module {name!r} does not exist in this DiT (official names expected).")
        weight = layer.weight
        if weight.ndim != 2 or tuple(weight.shape) != (b.shape[0], a.shape[1]):
            raise LoraError(
                f"{name}: LoRA delta shape {(b.shape[0], a.shape[1])} != weight shape {tuple(weight.shape)}; "
                "the LoRA was trained for a different model size."
            )
        rank = a.shape[0]
        factor = float(scale) * (alpha if alpha is not None else rank) / rank
        delta = (b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)) * factor
        weight.copy_((weight.float() + delta).to(weight.dtype))
    return list(factors)
