"""End-of-run exports under ``<output_dir>/export/`` (and ``export/ema/`` from the EMA weights).

``full``: the DiT in ``train.export_layouts``. ``lora`` / ``adapters_only`` / ``self_attn``: the small
files (``lora.safetensors`` in the community layout plus the family's other layouts,
``adapters.safetensors``, ``self_attn.safetensors``); ``train.export_merged`` adds the DiT with the
LoRA merged. A whole DiT is written in the released dtype (bf16, fp32-by-design tensors fp32),
gathered module by module and cast on rank 0's host as it arrives: no fp32 copy of the model exists.
Rank 0 writes; the others wait on the process group's key-value store with a timeout sized to the bytes (an
NCCL barrier's timeout is shorter than writing a 14B model to a slow disk).
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from train.checkpoint.trainable import is_trainable_only
from train.config import Config
from train.modes import is_adapter
from train.parallel import zero_stage
from wan_animate.family import get_family
from wan_animate.lora import ADAPTER_NAME, is_lora_key, save_lora
from wan_animate.model import is_fp32_by_design
from wan_animate.weights.files import save_safetensors

_DESCRIBE = {  # name under export/ (or export/ema/) -> what it is
    "official": "DiT in the Wan-AI/Wan2.2-Animate-14B layout (wan_animate.load_dit)",
    "diffusers": "WanAnimateTransformer3DModel.from_pretrained folder",
    "lora.safetensors": "community LoRA layout (diffusers load_lora_weights, ComfyUI, eval.generate --lora)",
    "adapters.safetensors": "trained pose/face adapter weights, official names",
    "lora_diffusers.safetensors": "the LoRA in diffusers' names (WanAnimate2Transformer3DModel.load_lora_adapter)",
    "self_attn.safetensors": "trained self-attention weights (train.mode=self_attn), official names",
}
WRITE_BYTES_PER_S = 20e6  # a slow shared disk: the other ranks' wait is sized with it
_calls = itertools.count()  # the store key of each export (every rank exports the same times)


def readme_text(out: Path, written: dict[str, str]) -> str:
    """``export/README.txt``: one line per file or folder this export wrote, nothing else."""
    lines = []
    for path in sorted(set(written.values())):
        rel = Path(path).relative_to(out)
        ema = rel.parts[0] == "ema" and len(rel.parts) > 1
        desc = _DESCRIBE.get(Path(*rel.parts[1:]).as_posix() if ema else rel.as_posix(), "")
        if ema:
            desc = f"EMA of the trained weights (optim.ema_decay): {desc}"
        lines.append(f"{rel.as_posix()}{'/' if Path(path).is_dir() else ''} : {desc}")
    return "".join(line + "\n" for line in lines)


def released_dtype(name: str, t: torch.Tensor) -> torch.dtype:
    """The dtype a tensor of the released DiT has (``name``: official or peft-wrapped)."""
    if not t.is_floating_point():
        return t.dtype
    return torch.float32 if is_fp32_by_design(name.replace(".base_layer.", ".")) else torch.bfloat16


def export(cfg: Config, acc, model, raw_dit, ema: dict[str, torch.Tensor] | None) -> dict[str, str]:
    """Collective. ``ema``: name -> fp32 tensor of the trainable parameters
    (``train.state.EMA.state_dict()``). Returns what was written (on rank 0; {} on the others)."""
    small = is_trainable_only(cfg.train.mode)
    whole = not small or cfg.train.export_merged
    trained = {n for n, p in raw_dit.named_parameters() if p.requires_grad}
    # the whole DiT only when it is written; else the trained tensors (small files)
    state = gather_state(acc, model, keep=trained if small else set()) if whole else gather_trained(acc, model)
    dit_bytes = 2 * sum(getattr(p, "ds_numel", p.numel()) for p in raw_dit.parameters())
    copies = (len(cfg.train.export_layouts) if whole else 0) + (1 if whole and ema is not None else 0)

    def write() -> dict[str, str]:
        out = Path(cfg.train.output_dir) / "export"
        written = _write(cfg, raw_dit, out, state, ema, small, whole)
        (out / "README.txt").write_text(readme_text(out, written))
        return written

    return on_rank0(acc, write, timeout_s=600 + copies * dit_bytes / WRITE_BYTES_PER_S)


def _write(cfg: Config, raw_dit, out: Path, state: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None,
           small: bool, whole: bool) -> dict[str, str]:
    save_dit = get_family(cfg.model.family).save  # the family's layouts (Animate-2: save_animate2)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"train_mode": cfg.train.mode, "experiment": str(cfg.experiment_name)}
    if whole and small:
        meta["merged"] = "true"
    written: dict[str, str] = {}
    scalings = _lora_scalings(raw_dit) if whole and small else {}
    if small:
        trained = {n for n, p in raw_dit.named_parameters() if p.requires_grad}
        written.update(_write_small(cfg, out, {k: v for k, v in state.items() if k in trained}, meta))
    if whole:
        for layout in cfg.train.export_layouts:
            save_dit(released_state(state, scalings), out / layout, layout=layout, metadata=meta, config=raw_dit.config)
            written[layout] = str(out / layout)
    if ema is not None:
        if small:
            written.update({f"ema/{k}": v for k, v in _write_small(cfg, out / "ema", ema, meta).items()})
        if whole:  # the averages on top of the final frozen tensors
            save_dit(released_state({**state, **ema}, scalings), out / "ema" / "official", layout="official",
                     metadata={**meta, "ema_decay": str(cfg.optim.ema_decay)}, config=raw_dit.config)
            written["ema"] = str(out / "ema" / "official")
    return written


def _write_small(cfg: Config, out: Path, state: Mapping[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, str]:
    """``lora.safetensors`` (+ the family's other LoRA layouts), ``adapters.safetensors`` and
    ``self_attn.safetensors`` from the trained tensors (peft names)."""
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    if cfg.train.mode == "lora" and any(is_lora_key(k) for k in state):
        alpha = float(cfg.lora.alpha if cfg.lora.alpha is not None else cfg.lora.rank)
        save_lora(state, out / "lora.safetensors", alpha=alpha,
                  metadata={"rank": cfg.lora.rank, "alpha": alpha, "train_mode": "lora"})
        written["lora"] = str(out / "lora.safetensors")
        written.update(get_family(cfg.model.family).export_lora(out / "lora.safetensors"))
    if cfg.train.mode == "self_attn":
        save_safetensors(dict(state), out / "self_attn.safetensors", metadata={**meta, "names": "official"})
        written["self_attn"] = str(out / "self_attn.safetensors")
    # a LoRA-wrapped adapter linear stores its weight under ``.base_layer.``
    adapters = {k.replace(".base_layer.", "."): v for k, v in state.items() if is_adapter(k) and not is_lora_key(k)}
    if adapters:
        save_safetensors(adapters, out / "adapters.safetensors", metadata={**meta, "names": "official"})
        written["adapters"] = str(out / "adapters.safetensors")
    return written


# ---------------------------------------------------------------------------- gathering


def _units(module: torch.nn.Module, prefix: str = ""):
    """(prefix, module, recurse) covering the state dict: a module is gathered whole unless it holds
    a ``ModuleList`` (the DiT blocks, the face adapter's blocks), which is taken one item at a time."""
    if not any(isinstance(m, torch.nn.ModuleList) for m in module.modules()):
        yield prefix, module, True
        return
    yield prefix, module, False  # its own tensors
    for name, child in module.named_children():
        yield from _units(child, f"{prefix}{name}.")


def gather_state(acc, model, keep: set[str]) -> dict[str, torch.Tensor]:
    """Collective: the prepared ``model``'s state dict on rank 0's host ({} on the others), gathered
    module by module; each tensor is cast to ``released_dtype`` as it arrives, except the LoRA
    factors and the names in ``keep`` (kept in the dtype they train in)."""
    raw = acc.unwrap_model(model)
    zero3 = zero_stage(acc) == 3
    out: dict[str, torch.Tensor] = {}
    for prefix, module, recurse in _units(raw):
        params = list(module.parameters(recurse=recurse))
        with _gathered(params, zero3):
            if not acc.is_main_process:
                continue
            local = module.state_dict(prefix=prefix) if recurse else {  # the root's own tensors only
                k: v for k, v in itertools.chain(module._parameters.items(), module._buffers.items())
                if v is not None and k not in module._non_persistent_buffers_set}
            for k, v in local.items():
                dtype = v.dtype if (k in keep or is_lora_key(k)) else released_dtype(k, v)
                t = v.detach().to("cpu", dtype)
                if zero3 and t.untyped_storage().data_ptr() == v.untyped_storage().data_ptr():
                    t = t.clone()  # the gathered storage is released when the module is left
                out[k] = t
    return out


def gather_trained(acc, model) -> dict[str, torch.Tensor]:
    """Collective: name -> host copy of every trainable parameter (small; on every rank)."""
    named = [(n, p) for n, p in acc.unwrap_model(model).named_parameters() if p.requires_grad]
    with _gathered([p for _, p in named], zero_stage(acc) == 3):
        return {n: p.detach().cpu().clone() for n, p in named}


def _gathered(params: list[torch.nn.Parameter], zero3: bool):
    if not zero3 or not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


# ---------------------------------------------------------------------------- the released DiT


def _lora_scalings(raw_dit: torch.nn.Module) -> dict[str, float]:
    """Module name -> alpha / rank of every peft LoRA layer (what a merge multiplies B @ A by)."""
    from peft.tuners.lora import LoraLayer

    return {name: float(m.scaling[ADAPTER_NAME]) for name, m in raw_dit.named_modules()
            if isinstance(m, LoraLayer) and ADAPTER_NAME in m.scaling}


@torch.no_grad()
def released_state(state: Mapping[str, torch.Tensor], scalings: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Plain official-named DiT state in the released dtype from a (peft-wrapped) one: ``W + scaling
    * B @ A`` for every LoRA layer in ``scalings``; a tensor already in its dtype is not copied."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if is_lora_key(key):
            continue
        name = key.replace(".base_layer.", ".")
        module = key[: -len(".base_layer.weight")] if key.endswith(".base_layer.weight") else None
        if module is not None and module in scalings:
            a = state[f"{module}.lora_A.{ADAPTER_NAME}.weight"].float()
            b = state[f"{module}.lora_B.{ADAPTER_NAME}.weight"].float()
            value = value.float().addmm_(b, a, alpha=scalings[module])
        out[name] = value.detach().to("cpu", released_dtype(name, value))
    return out


# ---------------------------------------------------------------------------- rank 0 writes


def on_rank0(acc, write: Callable[[], dict[str, str]], timeout_s: float) -> dict[str, str]:
    """Rank 0 runs ``write``; the others wait until it is done (up to ``timeout_s``) on the process
    group's store, not in a collective, and raise if it failed. Returns ``write``'s result ({} off rank 0)."""
    if acc.num_processes == 1 or not dist.is_initialized():
        return write()
    store = dist.distributed_c10d._get_default_store()
    key = f"wan_animate_export/{next(_calls)}"
    if acc.is_main_process:
        try:
            written = write()
        except BaseException as e:
            store.set(key, f"failed on rank 0: {type(e).__name__}: {e}")
            raise
        store.set(key, "ok")
        return written
    store.wait([key], datetime.timedelta(seconds=timeout_s))
    status = store.get(key).decode()
    if status != "ok":
        raise RuntimeError(f"export {status}")
    return {}
