"""One output folder, one run: what launched it, what it loaded, whether it already finished.

``config.json`` is written once per run: the resolved config, ``launch`` (world size, DeepSpeed /
ZeRO stage, mode, model) and ``model.loaded`` (folder, layout, its DiT config). A later launch with
another world size, DeepSpeed setting, mode or model is refused before any model loads (a resume
under another launch ends deep inside DeepSpeed or at a wrong data position). A finished run is a
no-op, or only re-exports when its exports are missing. ``train.resume=false`` on a folder holding
a run is refused (two runs would mix); ``train.overwrite=true`` moves the old run aside first.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.checkpoint import store as checkpointing
from train.checkpoint.run_lock import LOCK_NAME
from train.config import Config, ConfigError, config_to_dict
from train.preflight import model_facts
from wan_animate.files import atomic_write_json

IDENTITY_KEYS = ("world_size", "deepspeed", "zero_stage", "sequence_parallel", "mode", "model")


def _model_config_digest(path: Path) -> str | None:
    """SHA-1 of the folder's DiT config (headers / config.json only): the same model at another path
    (a moved copy) matches; None when it cannot be read here."""
    config, _ = model_facts(path)
    if config is None:
        return None
    return hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def launch_identity(cfg: Config, world_size: int, deepspeed: bool, zero_stage: int) -> dict[str, Any]:
    """What a resume must share with the run that wrote the checkpoints."""
    m = cfg.model
    model = str(Path(m.path).resolve()) if m.path else f"quick-start preset {m.preset} (seed {m.init_seed})"
    return {"world_size": world_size, "deepspeed": deepspeed, "zero_stage": zero_stage, "mode": cfg.train.mode,
            "model": model, "model_config": _model_config_digest(Path(m.path)) if m.path else None,
            "sequence_parallel": cfg.train.sequence_parallel}


def _same_model(before: dict[str, Any], current: dict[str, Any]) -> bool:
    """Same path, or two folders with the same DiT config (a moved copy: the trainable-only state's
    base fingerprint, ``train.checkpoint.trainable``, checks the weights themselves on resume)."""
    config = before.get("model_config")
    return before.get("model") == current["model"] or (config is not None and config == current.get("model_config"))


def _from_checkpoint(path: Path) -> dict[str, Any]:
    """World size and DeepSpeed-or-not from a checkpoint's files (runs older than ``launch``)."""
    ranks = list(path.glob("rank*.json"))
    out: dict[str, Any] = {"world_size": len(ranks)} if ranks else {}
    if (path / "pytorch_model").is_dir() or any(path.glob("*/mp_rank_*_model_states.pt")):
        out["deepspeed"] = True
    elif any(path.glob("model*.safetensors")) or any(path.glob("pytorch_model*.bin")):
        out["deepspeed"] = False
    return out


def _describe(ident: dict[str, Any]) -> str:
    ds = (f"DeepSpeed ZeRO-{ident['zero_stage']}" if ident.get("zero_stage") else "DeepSpeed") \
        if ident.get("deepspeed") else "no DeepSpeed"
    parts = [f"world size {ident['world_size']}" if "world_size" in ident else None,
             ds if "deepspeed" in ident else None,
             f"sequence_parallel={ident['sequence_parallel']}" if ident.get("sequence_parallel", 1) != 1 else None,
             f"mode={ident['mode']}" if "mode" in ident else None,
             f"model {ident['model']}" if "model" in ident else None]
    return ", ".join(p for p in parts if p)


def _read_json(path: Path) -> Any:
    """The parsed file, or None when it is missing or not JSON (a run killed while writing it)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def previous_identity(out_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(identity of the run in ``out_dir`` as far as known, its config.json or None)."""
    saved = _read_json(out_dir / "config.json")
    ident: dict[str, Any] = {}
    if isinstance(saved, dict):
        if isinstance(saved.get("launch"), dict):
            ident.update(saved["launch"])
        else:  # written before ``launch`` existed: mode and model from the config itself
            t, m = saved.get("train", {}), saved.get("model", {})
            if "mode" in t:
                ident["mode"] = t["mode"]
            if m.get("path"):
                ident["model"] = str(Path(m["path"]).resolve())
    latest = checkpointing.latest_complete(out_dir)
    if latest is not None:  # what the checkpoint's files say fills in what config.json does not
        ident = {**_from_checkpoint(latest[1]), **ident}
    return ident, saved


def check_output_dir(cfg: Config, current: dict[str, Any]) -> None:
    """Refuse (``ConfigError``) a launch that differs from the run already in ``train.output_dir``."""
    out_dir = Path(cfg.train.output_dir)
    if checkpointing.latest_complete(out_dir) is None and not (out_dir / "summary.json").is_file():
        return  # no run here yet
    before, _ = previous_identity(out_dir)
    differ = [k for k in IDENTITY_KEYS if k in before and before[k] != current[k]
              and not (k == "zero_stage" and not before.get("deepspeed") and not current["deepspeed"])
              and not (k == "model" and _same_model(before, current))]
    if not differ:
        return
    changes = "; ".join(f"{k}: {before[k]} -> {current[k]}" for k in differ)
    raise ConfigError(
        f"train.output_dir={out_dir} holds a run launched with {_describe(before)}; this launch differs "
        f"({changes}). Continue it with the original launch, or start a new run with a new train.output_dir "
        "(its checkpoints cannot be resumed under another world size, DeepSpeed setting, mode or model).")


_RUN_FILES = ("metrics.jsonl", "summary.json", "config.json", "export")


def run_files(out_dir: Path) -> list[str]:
    """What a run left in ``out_dir`` (the lock and Hydra records do not count)."""
    ckpts = checkpointing.checkpoints_dir(out_dir)
    found = ["checkpoints/"] if ckpts.is_dir() and any(ckpts.iterdir()) else []
    return found + [name for name in _RUN_FILES if (out_dir / name).exists()]


def check_fresh_start(cfg: Config, main: bool) -> Path | None:
    """``train.overwrite=true``: move a run in ``train.output_dir`` aside (rank 0) and return where;
    ``train.resume=false`` on a folder that holds a run: ``ConfigError`` naming both ways out."""
    out_dir = Path(cfg.train.output_dir)
    found = run_files(out_dir)
    if not found:
        return None
    if cfg.train.overwrite:
        if not main:
            return None
        aside = out_dir.with_name(f"{out_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        aside.mkdir()
        for entry in out_dir.iterdir():  # everything but the lock this run holds
            if entry.name != LOCK_NAME:
                os.replace(entry, aside / entry.name)
        print(f"[train] train.overwrite=true: the previous run in {out_dir} moved to {aside}", flush=True)
        return aside
    if not cfg.train.resume:
        raise ConfigError(
            f"train.resume=false but train.output_dir={out_dir} holds a run ({', '.join(found)}): starting over there "
            "would mix two runs. Use a new train.output_dir, or add train.overwrite=true to move the old run to "
            f"{out_dir.name}.replaced-<time>/ and start over.")
    return None


def loaded_model_record(cfg: Config, model_path: Path, dit_config, layout: str | None) -> dict[str, Any]:
    """``model`` section of config.json: the keys, with what was actually loaded."""
    rec = dict(config_to_dict(cfg)["model"])
    loaded: dict[str, Any] = {"path": str(Path(model_path).resolve()), "layout": layout}
    if dit_config is not None:
        loaded["dit_config"] = dit_config.to_dict()
    if cfg.model.path:
        rec["preset"] = None  # the folder's own config is what was loaded, not a preset
    else:
        loaded["built_from_preset"] = cfg.model.preset
    rec["loaded"] = loaded
    return rec


def write_config(cfg: Config, current: dict[str, Any], model_record: dict[str, Any]) -> Path:
    """``config.json`` of a new run; a resume keeps the original and records changed keys next to it."""
    out_dir = Path(cfg.train.output_dir)
    record = {**config_to_dict(cfg), "model": model_record, "launch": current}
    path, latest = out_dir / "config.json", checkpointing.latest_complete(out_dir)
    if path.is_file():
        old = _read_json(path)
        if isinstance(old, dict) and (latest is not None or (out_dir / "summary.json").is_file()):
            changed = _changed_keys(old, json.loads(json.dumps(record, default=str)))
            if changed:
                other = out_dir / f"config.resume-step-{latest[0] if latest else 0}.json"
                atomic_write_json(other, record, indent=1)
                print(f"[train] resuming with changed settings ({', '.join(changed[:8])}"
                      f"{', ...' if len(changed) > 8 else ''}); config.json keeps the original, this launch's "
                      f"is {other.name}", flush=True)
            return path
    return atomic_write_json(path, record, indent=1)


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


@dataclass
class Finished:
    """A run in ``output_dir`` that already reached ``train.max_steps``."""

    summary: dict[str, Any]
    exports_missing: list[str]


def finished_run(cfg: Config) -> Finished | None:
    """The finished run in ``train.output_dir`` (None: nothing finished, or more steps asked for)."""
    out_dir = Path(cfg.train.output_dir)
    path = out_dir / "summary.json"
    latest = checkpointing.latest_complete(out_dir)
    if not path.is_file() or latest is None or latest[0] < cfg.train.max_steps or not cfg.train.resume:
        return None
    summary = _read_json(path)
    if not isinstance(summary, dict) or summary.get("status") != "finished" or summary.get("step") != latest[0]:
        return None
    missing: list[str] = []
    if cfg.train.export:
        exports = summary.get("exports") or {}
        missing = [name for name, p in exports.items() if not Path(p).exists()]
        if not exports or not (out_dir / "export").is_dir():
            missing = missing or ["export/"]
    return Finished(summary, missing)


def finished_message(cfg: Config, fin: Finished) -> str:
    step = fin.summary.get("step")
    if fin.exports_missing:
        return (f"{cfg.train.output_dir} already finished at step {step}; its exports are missing "
                f"({', '.join(fin.exports_missing)}): re-exporting only (no training, validation or new wandb run).")
    return (f"{cfg.train.output_dir} already finished at step {step} (summary.json); nothing to do. Raise "
            "train.max_steps to train on, or set a new train.output_dir for a new run.")


def write_summary(out_dir: Path, result: dict[str, Any]) -> Path:
    """``summary.json`` as strict JSON (a NaN loss is written as null)."""
    return atomic_write_json(out_dir / "summary.json", result, indent=1, default=str)


