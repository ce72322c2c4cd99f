"""LoRA on the Wan-Animate DiT: training-side injection (peft) and the community file layout.

File layout (safetensors), the one diffusers' ``WanLoraLoaderMixin`` and ComfyUI read::

    diffusion_model.<official module name>.lora_A.weight   [rank, in_features]
    diffusion_model.<official module name>.lora_B.weight   [out_features, rank]
    diffusion_model.<official module name>.alpha           scalar

The update of a targeted linear is ``W + scale * (alpha / rank) * B @ A``. Also read: factors named
``lora_down`` / ``lora_up``, no ``diffusion_model.`` prefix (or peft's ``base_model.model.``), no
alpha (then alpha = rank), and torch files holding ``{"state_dict": <peft state dict>}`` such as the
official ``relighting_lora.ckpt`` (``weights_only=True`` only).

Loading is atomic: every name, shape and value is checked before the first weight changes, so a
bad file raises (``LoraError``, or ``WeightsFileError`` for an unreadable file) and leaves the
model untouched.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from wan_animate.weights.files import iter_tensors, load_torch_file, read_header, save_safetensors

PREFIX = "diffusion_model."
# Name prefixes a LoRA file may carry: community files, and peft's PeftModel wrapper.
FILE_PREFIXES = (PREFIX, "base_model.model.")
RELIGHT_FILE = "relighting_lora.ckpt"  # in the official model folder
ADAPTER_NAME = "default"
# Module-name fragments never targeted by default (face adapter/encoder, modulation tables).
DEFAULT_EXCLUDE: tuple[str, ...] = ("face", "modulation", "motion")
_BLOCK_RE = re.compile(r"^blocks\.\d+\.")
_PEFT_FACTOR_RE = re.compile(rf"(.+)\.(lora_[AB])\.{ADAPTER_NAME}\.weight")  # peft's parameter names
_FILE_FACTOR_RE = re.compile(r"(.+)\.lora_(A|down|B|up)\.weight")  # A = down, B = up


class LoraError(ValueError):
    """A LoRA file or target list that does not fit the model (one line: what, where, the fix)."""


# ---- targets


def default_lora_targets(model: nn.Module, exclude: Iterable[str] = DEFAULT_EXCLUDE) -> list[str]:
    """Full names of every ``nn.Linear`` inside ``blocks.N`` minus the excluded fragments."""
    exclude = tuple(exclude)
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and _BLOCK_RE.match(name)
             and ".base_layer" not in name and ".lora_" not in name  # not already wrapped by peft
             and not any(fragment in name for fragment in exclude)]
    if not names:
        raise LoraError("The model has no linear layer under blocks.N to put LoRA on.")
    return names


def resolve_lora_targets(model: nn.Module, targets: Iterable[str] | None) -> list[str]:
    """Expand user targets: ``None`` -> defaults; otherwise each entry is a full module name or a
    regular expression matched against full names of linears (e.g. ``blocks\\.\\d+\\.ffn\\.0``)."""
    targets = list(targets or ())
    if not targets:
        return default_lora_targets(model)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen: list[str] = []
    for pattern in targets:
        hits = [pattern] if pattern in linears else sorted(n for n in linears if re.fullmatch(pattern, n))
        if not hits:
            raise LoraError(
                f"LoRA target {pattern!r} matches no linear layer of the DiT; use an official module "
                "name (e.g. 'blocks.0.self_attn.q') or a regex over such names, or leave targets empty "
                "for the default (all block linears except face/modulation)."
            )
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


# ---- training (peft)


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    targets: Iterable[str] | None = None,
    dropout: float = 0.0,
) -> list[str]:
    """Wrap the target linears of ``model`` in place with peft LoRA layers (B = 0: output unchanged);
    returns their names. Only the factors stay trainable; callers re-enable what else they train."""
    from peft import LoraConfig, inject_adapter_in_model

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
    """Community-layout LoRA tensors of a peft-wrapped DiT (alpha read from its layers) or of its
    state dict (pass ``alpha``: one number, or module name -> alpha)."""
    if isinstance(model_or_state, nn.Module):
        from peft.tuners.lora import LoraLayer

        alphas = {name: float(module.lora_alpha[ADAPTER_NAME]) for name, module in model_or_state.named_modules()
                  if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A}
        # the parameters themselves: a state dict would also build every frozen weight (fp8 layers
        # dequantize theirs)
        state = {n: p for n, p in model_or_state.named_parameters() if ".lora_" in n}
    else:
        alphas = dict(alpha) if isinstance(alpha, Mapping) else {}
        state = dict(model_or_state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _PEFT_FACTOR_RE.fullmatch(key)
        if m is None:
            continue
        module, factor = m.groups()
        t = value.detach()
        out[f"{PREFIX}{module}.{factor}.weight"] = t.to(dtype) if dtype is not None else t.clone()
        if factor == "lora_A":
            a = alphas.get(module, None if isinstance(alpha, Mapping) else alpha)
            if a is None:
                raise LoraError(f"alpha of {module} unknown; pass alpha= when exporting a state dict.")
            out[f"{PREFIX}{module}.alpha"] = torch.tensor(float(a), dtype=torch.float32)
    if not out:
        raise LoraError("No LoRA factors found (was add_lora applied?).")
    return out


def save_lora(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    path: str | Path,
    alpha: float | Mapping[str, float] | None = None,
    metadata: Mapping[str, object] | None = None,
) -> Path:
    """Write the community-layout safetensors file (non-string ``metadata`` values JSON-encoded)."""
    meta = {"format": "pt", "lora_layout": "diffusion_model", **(metadata or {})}
    return save_safetensors(lora_state_dict(model_or_state, alpha=alpha), path, metadata=meta)


Factors = dict[str, tuple[torch.Tensor, torch.Tensor, "float | None"]]


def load_lora_into_peft(model: nn.Module, path_or_state: str | Path | Mapping[str, torch.Tensor]) -> list[str]:
    """Copy a community-layout file into an ``add_lora``-wrapped model (to continue training); its
    alpha must equal the wrapped layers'. Everything is checked before any copy."""
    return _copy_into_peft(model, read_lora(path_or_state), _where(path_or_state))


def _copy_into_peft(model: nn.Module, factors: Factors, where: str) -> list[str]:
    from peft.tuners.lora import LoraLayer

    modules = dict(model.named_modules())
    for name, (a, b, alpha) in factors.items():
        layer = modules.get(name)
        if not isinstance(layer, LoraLayer) or ADAPTER_NAME not in layer.lora_A:
            raise LoraError(f"{where} targets {name!r}, which add_lora did not wrap in this model.")
        own_alpha = float(layer.lora_alpha[ADAPTER_NAME])
        if alpha is not None and abs(alpha - own_alpha) > 1e-6:
            raise LoraError(f"{where}: {name}: file alpha {alpha} != configured lora.alpha {own_alpha}; "
                            f"set lora.alpha={alpha}.")
        own = (layer.lora_A[ADAPTER_NAME].weight.shape, layer.lora_B[ADAPTER_NAME].weight.shape)
        if (a.shape, b.shape) != own:
            raise LoraError(f"{where}: {name}: factor shapes A {tuple(a.shape)} / B {tuple(b.shape)} != the "
                            f"wrapped layer's {tuple(own[0])} / {tuple(own[1])}; set lora.rank={a.shape[0]}.")
    with torch.no_grad():
        for name, (a, b, _) in factors.items():
            modules[name].lora_A[ADAPTER_NAME].weight.copy_(a)
            modules[name].lora_B[ADAPTER_NAME].weight.copy_(b)
    return list(factors)


# ---- reading / inference


def _where(path_or_state) -> str:
    return f"LoRA file {path_or_state}" if isinstance(path_or_state, (str, Path)) else "LoRA state dict"


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist; check the path.")
    if path.suffix == ".safetensors":  # the header is validated first: a truncated file is refused
        return dict(iter_tensors(read_header(path), torch.device("cpu")))
    return load_torch_file(path, what="LoRA file")


def read_lora(path_or_state: str | Path | Mapping[str, torch.Tensor]) -> Factors:
    """Parse a LoRA file/state dict into ``{official module name: (A [r,in], B [out,r], alpha|None)}``;
    ``WeightsFileError`` when the file cannot be read, ``LoraError`` when it is not a LoRA."""
    where = _where(path_or_state)
    state = _load_tensors(Path(path_or_state)) if isinstance(path_or_state, (str, Path)) else dict(path_or_state)
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    unknown = []
    for key, value in state.items():
        name = next((key[len(p):] for p in FILE_PREFIXES if key.startswith(p)), key)
        m = _FILE_FACTOR_RE.fullmatch(name)
        if m:
            (downs if m.group(2) in ("A", "down") else ups)[m.group(1)] = value
        elif name.endswith(".alpha") and value.numel() == 1:
            alphas[name.removesuffix(".alpha")] = float(value.item())
        else:
            unknown.append(key)
    fix = "expected '<official module name>.lora_A.weight' / '.lora_B.weight' (+ '.alpha'), optionally under 'diffusion_model.'"
    if unknown:
        raise LoraError(f"{where} has {len(unknown)} tensors that are not LoRA factors or alphas "
                        f"(e.g. {unknown[:3]}); {fix}.")
    if set(downs) != set(ups):
        missing = sorted(set(downs) ^ set(ups))
        raise LoraError(f"{where}: LoRA factors without their partner (A without B or B without A): {missing[:5]}; "
                        "the file is incomplete, export it again.")
    if not downs:
        raise LoraError(f"{where} holds no LoRA factors; {fix}.")
    out = {}
    for name in sorted(downs):
        a, b = downs[name], ups[name]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoraError(f"{where}: {name}: factor shapes A {tuple(a.shape)} / B {tuple(b.shape)} are not a "
                            "rank-r pair; the file is corrupt, export it again.")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise LoraError(f"{where}: {name}: factors of dtype {a.dtype}/{b.dtype}; LoRA factors are float tensors.")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise LoraError(f"{where}: {name}: the factors hold NaN/Inf values; the LoRA is broken (e.g. a "
                            "diverged training run), export a good checkpoint.")
        alpha = alphas.get(name)
        if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
            raise LoraError(f"{where}: {name}: alpha {alpha} must be a finite number > 0; the file is corrupt, "
                            "export it again.")
        out[name] = (a, b, alpha)
    return out


def _check_fits(dit: nn.Module, factors: Factors, where: str) -> None:
    """Every targeted module exists and has the delta's shape, or one error listing the problems."""
    modules = dict(dit.named_modules())
    problems = []
    for name, (a, b, _) in factors.items():
        layer = modules.get(name)
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor):
            problems.append(f"module {name!r} does not exist in this DiT")
        elif weight.ndim != 2 or tuple(weight.shape) != (b.shape[0], a.shape[1]):
            problems.append(f"{name}: LoRA delta shape {(b.shape[0], a.shape[1])} != weight shape {tuple(weight.shape)}")
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise LoraError(f"{where} does not fit this DiT: {'; '.join(problems[:3])}{more}. The LoRA was made for "
                        "another model or size (official module names expected); nothing was changed.")


@torch.no_grad()
def apply_lora(dit: nn.Module, path_or_state: str | Path | Mapping[str, torch.Tensor], scale: float = 1.0) -> list[str]:
    """Merge a LoRA into a plain DiT in place: ``W += scale * alpha / rank * B @ A`` (fp32 math, cast
    back to the weight's dtype), after every module is checked. Returns the merged module names."""
    where = _where(path_or_state)
    if not math.isfinite(scale):
        raise LoraError(f"{where}: scale {scale} must be a finite number; nothing was changed.")
    factors = read_lora(path_or_state)
    _check_fits(dit, factors, where)
    modules = dict(dit.named_modules())
    for name, (a, b, alpha) in factors.items():
        weight = modules[name].weight
        rank = a.shape[0]
        factor = float(scale) * (alpha if alpha is not None else rank) / rank
        delta = (b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)) * factor
        weight.copy_((weight.float() + delta).to(weight.dtype))
    return list(factors)


def apply_relighting_lora(dit: nn.Module, path: str | Path) -> list[str]:
    """Apply the official relighting LoRA (``relighting_lora.ckpt``) as the official replace-mode
    pipeline does: a peft adapter, not merged, on the file's target linears, scale ``alpha / rank =
    1`` (rank 128; the file stores no alpha). Checked against the model first; returns the names."""
    from peft.tuners.lora import LoraLayer

    where = _where(path)
    factors = read_lora(path)
    _check_fits(dit, factors, where)
    ranks = sorted({a.shape[0] for a, _, _ in factors.values()})
    if len(ranks) != 1:
        raise LoraError(f"{where}: factors of several ranks {ranks}; the relighting LoRA has one rank (128).")
    if any(isinstance(m, LoraLayer) for m in dit.modules()):
        raise LoraError("the DiT already carries a LoRA adapter; apply the relighting LoRA to a plain DiT, once.")
    alphas = sorted({alpha for _, _, alpha in factors.values() if alpha is not None})
    if len(alphas) > 1:
        raise LoraError(f"{where}: several alphas {alphas[:5]}; the relighting LoRA has one scale.")
    alpha = alphas[0] if alphas else float(ranks[0])
    add_lora(dit, rank=ranks[0], alpha=alpha, targets=list(factors))
    _copy_into_peft(dit, factors, where)
    dit.requires_grad_(False)
    return list(factors)
