"""The training loop: one code path for CPU, one GPU, DDP and DeepSpeed ZeRO-2/3.

``run(cfg)`` goes: accelerator -> quick-start assets (tiny model folder + synthetic shards, written
once) -> pipeline components (DiT + frozen encoders) -> trainable set (full / adapters_only /
LoRA) -> ``accelerate.prepare`` -> resume from the newest complete checkpoint -> steps (loss,
backward, clipped update, NaN guard, EMA, metrics, checkpoints, validation videos, preemption) ->
exports. Returns a small summary dict (also written to ``<output_dir>/summary.json``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch

from train import checkpointing
from wan_animate.batch import build_dit_inputs, fixed_draw
from train.config import Config, ConfigError, config_to_dict
from train.data import BatchIterator, StreamSpec, resolve_urls
from wan_animate.objective import flow_matching_loss
from train.lora import make_optimizer, make_scheduler, setup_trainable
from train.metrics import MetricsLogger, dit_forward_flops, peak_flops, peak_memory_gib, plot_loss_curve
from train.parallel import all_ranks_true, check_world, frozen_loading, make_accelerator, zero_stage
from wan_animate.video_io import tensor_to_frames


class NonFiniteLossError(RuntimeError):
    pass


# ---------------------------------------------------------------------------- assets


def _atomic_build(dst: Path, build) -> Path:
    if (dst / ".complete").is_file():
        return dst
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    (tmp / ".complete").write_text("ok")
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


def prepare_assets(cfg: Config, acc) -> tuple[Path, list[str]]:
    """Model folder and shard URLs; the quick-start ones are written once by the main process."""
    cache = Path(cfg.cache_dir)
    m, d = cfg.model, cfg.data
    if m.path:
        model_path = Path(m.path)
    else:
        model_path = cache / f"model-{m.preset}-seed{m.init_seed}"
    data_dir = None
    if d.source == "synthetic":
        from wan_animate.config import WanAnimateConfig

        face = d.face_size or (WanAnimateConfig.preset(m.preset).motion_encoder_size if not m.path else 64)
        tag = hashlib.sha1(json.dumps([d.synthetic_clips, d.synthetic_frames, d.synthetic_height, d.synthetic_width,
                                       face, cfg.train.seed]).encode()).hexdigest()[:8]
        data_dir = cache / f"synthetic-{tag}"
    if acc.is_local_main_process:
        if not m.path:
            from wan_animate.tiny import make_tiny_model_folder

            _atomic_build(model_path, lambda p: make_tiny_model_folder(p, layout="diffusers", seed=m.init_seed,
                                                                      config_preset=m.preset))
        if data_dir is not None:
            from data_tools.synthetic import make_synthetic_dataset

            _atomic_build(data_dir, lambda p: make_synthetic_dataset(
                p, num_clips=d.synthetic_clips, clip_len=d.synthetic_frames, height=d.synthetic_height,
                width=d.synthetic_width, seed=cfg.train.seed, shard_size=max(1, d.synthetic_clips // 2),
                face_size=face))
    acc.wait_for_everyone()
    urls = resolve_urls([str(data_dir)] if data_dir is not None else list(d.urls))
    return model_path, urls


# ---------------------------------------------------------------------------- helpers


class _StateHolder:
    """Minimal object ``save_dit`` accepts: a state dict and the config."""

    def __init__(self, state: dict[str, torch.Tensor], config):
        self._state, self.config = state, config

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


class _Preemption:
    def __init__(self):
        self.requested = False
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if sig is None:
                continue
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------- run


def run(cfg: Config) -> dict[str, Any]:
    t_start = time.time()
    import logging

    for name in ("accelerate", "deepspeed", "DeepSpeed", "compilers"):  # keep the progress bar readable
        logging.getLogger(name).setLevel(logging.WARNING)
    acc = make_accelerator(cfg)
    check_world(acc)
    stage = zero_stage(acc)
    use_ds = acc.state.deepspeed_plugin is not None
    if stage == 3 and cfg.optim.ema_decay > 0:
        raise ConfigError("optim.ema_decay > 0 is not supported with ZeRO-3 (parameters are partitioned); "
                          "set optim.ema_decay=0 or use ZeRO-2.")
    device = acc.device
    out_dir = Path(cfg.train.output_dir)
    main = acc.is_main_process
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1, ensure_ascii=False))
    torch.manual_seed(cfg.train.seed)  # identical initialisation of LoRA factors on every rank

    # ---- model + frozen encoders
    model_path, urls = prepare_assets(cfg, acc)
    from wan_animate.pipeline import AnimatePipeline

    from wan_animate.checkpoint import load_dit

    bf16 = cfg.train.precision == "bf16"
    # The DiT is read on the CPU (bf16 when training in bf16: the released weights are bf16) and
    # moved by accelerate/DeepSpeed after the trainable set is fixed, so no rank ever holds a
    # full-precision copy of the whole model on its GPU.
    layout = AnimatePipeline.detect_layout(model_path)
    dit = load_dit(model_path / "transformer" if layout == "diffusers" else model_path,
                   dtype=torch.bfloat16 if bf16 else torch.float32, device="cpu")
    with frozen_loading():
        pipe = AnimatePipeline.from_pretrained(
            model_path, dit=dit, dtype=torch.float32, device=device,
            encoder_dtype=torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32,
            offload=cfg.data.source == "cached",  # encoders only serve validation then
        )
    dit.train()
    groups, summary = setup_trainable(dit, cfg)
    if not use_ds:
        # fp32 master weights for whatever trains; autocast runs the matmuls in bf16
        for g in groups:
            for p in g["params"]:
                p.data = p.data.float()
    for enc in (pipe.vae, pipe.text_encoder, pipe.image_encoder):
        inner = getattr(enc, "module", None) or getattr(enc, "model", None) or getattr(enc, "vae", None)
        if isinstance(inner, torch.nn.Module):
            inner.requires_grad_(False)
    if cfg.model.activation_checkpointing:
        from wan_animate.model import apply_activation_checkpointing

        apply_activation_checkpointing(dit)
    optimizer = make_optimizer(groups, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    model, optimizer = acc.prepare(dit, optimizer)
    raw_dit = acc.unwrap_model(model)
    trainable = [(n, p) for n, p in raw_dit.named_parameters() if p.requires_grad]

    # ---- resume
    generator = torch.Generator().manual_seed(cfg.train.seed * 100003 + acc.process_index)
    start_step, data_state, ema = 0, {"position": 0, "skipped": 0, "seen": 0}, None
    trainer_state: dict[str, Any] = {"total_nonfinite": 0, "consecutive_nonfinite": 0}
    latest = checkpointing.latest_complete(out_dir) if cfg.train.resume else None
    if latest is not None:
        _, path = latest
        trainer_state, data_state, ema = checkpointing.load_checkpoint(acc, path, generator)
        start_step = int(trainer_state["step"])
        for _ in range(start_step):
            scheduler.step()
        if main:
            print(f"[train] resumed from {path} (step {start_step})", flush=True)
    if cfg.optim.ema_decay > 0 and ema is None:
        ema = {n: p.detach().float().clone().cpu() for n, p in trainable}

    # ---- data
    face_size = cfg.data.face_size or raw_dit.config.motion_encoder_size
    spec = StreamSpec(urls=urls, cfg=cfg.data, micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed,
                      rank=acc.process_index, world_size=acc.num_processes, face_size=face_size,
                      default_size=(cfg.data.synthetic_height, cfg.data.synthetic_width)
                      if cfg.data.source == "synthetic" else None)
    data = BatchIterator(spec, start_batch=int(data_state["position"]), skipped=int(data_state.get("skipped", 0)),
                         seen=int(data_state.get("seen", 0)))

    metrics = MetricsLogger(out_dir, enabled=main, wandb_on=cfg.train.wandb, project=cfg.train.wandb_project,
                            config=config_to_dict(cfg), resume_step=start_step)
    peak, peak_src = peak_flops(device, cfg.train.precision, cfg.train.peak_tflops)
    model_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    if main:
        print(f"[train] mode={cfg.train.mode} world={acc.num_processes} zero={stage} trainable="
              f"{summary['trainable_params']:,}/{summary['total_params']:,} groups={summary['groups']} "
              f"device={device} start_step={start_step}", flush=True)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc="train", unit="step",
               disable=not (main and cfg.train.progress), dynamic_ncols=True)
    step = start_step
    status = "finished"
    last_loss = float("nan")
    flops_per_sample = None
    trained_keys: list[str] = []
    with _Preemption() as preempt:
        while step < cfg.train.max_steps:
            t0 = time.perf_counter()
            micro_losses, samples = [], 0
            for micro in range(cfg.train.grad_accum):
                examples = data.next()
                batch = build_dit_inputs(examples, pipe, device, model_dtype if use_ds else torch.float32,
                                         cfg.data.clip_len)
                samples += len(examples)
                if flops_per_sample is None:
                    flops_per_sample = dit_forward_flops(raw_dit.config, tuple(batch["latents"].shape[2:]))
                ts = noise = None
                if cfg.train.fixed_noise_per_sample:
                    ts, noise = fixed_draw(batch, cfg.loss, device)
                last = micro == cfg.train.grad_accum - 1
                acc.gradient_state._set_sync_gradients(last)
                sync_ctx = contextlib.nullcontext() if (last or use_ds or acc.num_processes == 1) \
                    else acc.no_sync(model)
                with sync_ctx:
                    with acc.autocast():
                        out = flow_matching_loss(model, batch, cfg.loss, timesteps=ts, noise=noise,
                                                 generator=generator)
                    acc.backward(out.loss)
                micro_losses.append(out.loss.detach().float())
                if cfg.train.rank_report:
                    trained_keys.extend(batch["keys"])
            # ---- update (skipped when any gradient is not finite)
            grad_norm = float("nan")
            if use_ds:
                skipped = bool(acc.optimizer_step_was_skipped)
                gn = model.get_global_grad_norm() if hasattr(model, "get_global_grad_norm") else None
                grad_norm = float(gn) if gn is not None else float("nan")
                if not skipped and gn is not None and not math.isfinite(float(gn)):
                    skipped = True
            else:
                params = [p for _, p in trainable]
                if cfg.optim.grad_clip > 0:
                    gn = acc.clip_grad_norm_(params, cfg.optim.grad_clip)
                else:
                    gn = torch.norm(torch.stack([p.grad.detach().float().norm() for p in params if p.grad is not None]))
                grad_norm = float(gn)
                skipped = all_ranks_true(acc, not math.isfinite(grad_norm))
                if not skipped:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_local = torch.stack(micro_losses).mean()
            finite_local = bool(torch.isfinite(loss_local))
            nonfinite_loss = all_ranks_true(acc, not finite_local)
            skipped = skipped or nonfinite_loss
            if skipped:
                trainer_state["total_nonfinite"] += 1
                trainer_state["consecutive_nonfinite"] += 1
                if trainer_state["consecutive_nonfinite"] >= cfg.train.max_consecutive_nonfinite:
                    raise NonFiniteLossError(
                        f"{trainer_state['consecutive_nonfinite']} optimizer steps in a row had a NaN/Inf loss or "
                        f"gradient (step {step + 1}); stopping. Lower optim.lr, keep optim.grad_clip > 0, check the "
                        "data, or raise train.max_consecutive_nonfinite. The last complete checkpoint is untouched."
                    )
            else:
                trainer_state["consecutive_nonfinite"] = 0
                scheduler.step()
                if ema is not None:
                    d = cfg.optim.ema_decay
                    with torch.no_grad():
                        for n, p in trainable:
                            ema[n].mul_(d).add_(p.detach().float().cpu(), alpha=1 - d)
            step += 1
            # ---- metrics
            loss_mean = acc.reduce(torch.nan_to_num(loss_local, nan=0.0, posinf=0.0).to(device), "mean").item()
            if nonfinite_loss:
                loss_mean = float("nan")
            last_loss = loss_mean
            dt = time.perf_counter() - t0
            total_samples = samples * acc.num_processes
            flops = 3.0 * flops_per_sample * total_samples
            mfu = flops / (dt * peak * acc.num_processes)
            mem = peak_memory_gib(device)
            record = {
                "loss/train": loss_mean,
                "perf/step_time_s": dt,
                "perf/samples_per_s": total_samples / dt,
                "perf/mfu": mfu,
                "memory/peak_gib": mem,
                "data/skipped": data.skipped,
                "optim/lr": optimizer.param_groups[0]["lr"],
                "optim/grad_norm": grad_norm,
                "train/nonfinite_skips": trainer_state["total_nonfinite"],
            }
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                metrics.log(step, record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_mean:.4f}", step_s=f"{dt:.2f}", sps=f"{total_samples / dt:.2f}",
                            mfu=f"{mfu:.1%}", mem=f"{mem:.1f}G")
            # ---- checkpoint / validation / preemption
            stop = all_ranks_true(acc, preempt.requested)
            due = cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0
            if due or stop or step == cfg.train.max_steps:
                trainer_state["step"] = step
                checkpointing.save_checkpoint(acc, out_dir, step, dict(trainer_state), generator, ema,
                                              cfg.train.keep_last, rank_state=data.state())
            if cfg.train.validation and cfg.train.validate_every and step % cfg.train.validate_every == 0 \
                    and step != cfg.train.max_steps:
                validate(cfg, acc, pipe, raw_dit, urls, step, stage)
            if cfg.train.debug_step_delay_s > 0:
                time.sleep(cfg.train.debug_step_delay_s)
            if stop:
                status = f"preempted ({preempt.signal or 'signal on another rank'})"
                break
    bar.close()
    if cfg.train.rank_report:
        write_rank_report(out_dir, acc, raw_dit, trained_keys, step)

    result: dict[str, Any] = {"status": status, "step": step, "final_loss": last_loss,
                              "world_size": acc.num_processes, "zero_stage": stage, **summary}
    if status == "finished":
        if cfg.train.validation:
            video = validate(cfg, acc, pipe, raw_dit, urls, step, stage)
            result["validation_video"] = str(video) if video else None
        if cfg.train.export:
            result["exports"] = export(cfg, acc, model, raw_dit, ema)
    if main:
        curve = plot_loss_curve(out_dir)
        result["loss_curve"] = str(curve) if curve else None
        result["metrics"] = str(out_dir / "metrics.jsonl")
        result["seconds"] = round(time.time() - t_start, 1)
        result["mfu_basis"] = peak_src
        (out_dir / "summary.json").write_text(json.dumps(result, indent=1, default=str))
        print(f"[train] {status} at step {step}; loss {last_loss:.4f}; outputs in {out_dir}", flush=True)
    metrics.close()
    acc.wait_for_everyone()
    acc.end_training()
    return result


def write_rank_report(out_dir: Path, acc, raw_dit, keys: list[str], step: int) -> None:
    """Per-rank evidence for distributed tests: group size, weight digest, sample keys trained on."""
    import torch.distributed as dist

    h = hashlib.sha256()
    for name, p in sorted(raw_dit.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    report = {
        "rank": acc.process_index, "world_size": acc.num_processes, "step": step,
        "dist_world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "param_sha256": h.hexdigest(), "keys": keys,
    }
    path = out_dir / "ranks" / f"rank-{acc.process_index}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report))


# ---------------------------------------------------------------------------- validation


def validate(cfg: Config, acc, pipe, raw_dit, urls: list[str], step: int, stage: int) -> Path | None:
    """Rank 0 renders a validation video of the first data sample through the shared pipeline."""
    out = None
    if stage == 3:
        if acc.is_main_process:
            print("[train] validation skipped under ZeRO-3 (parameters are partitioned); run eval.generate "
                  "on the export instead.", flush=True)
        return None
    if acc.is_main_process and cfg.data.source != "cached":
        from webdataset.tariterators import tarfile_samples

        from data_tools.dataset import decode_sample
        from wan_animate.pipeline import AnimatePipeline
        from wan_animate.video_io import write_video

        raw = next(iter(tarfile_samples([{"url": urls[0]}])))
        sample = decode_sample(raw)
        n = cfg.data.clip_len
        ref = tensor_to_frames(sample["ref"])
        pose, face = tensor_to_frames(sample["pose"][:, :n]), tensor_to_frames(sample["face"][:, :n])
        was_training = raw_dit.training
        val_pipe = AnimatePipeline(raw_dit, pipe.vae, pipe.text_encoder, pipe.image_encoder, device=acc.device)
        video = val_pipe.generate(ref, pose, face, steps=cfg.train.validation_steps, seed=cfg.train.seed,
                                  clip_len=n, refert_num=min(cfg.data.refert_nums), progress=False,
                                  prompt=sample.get("caption") or cfg.data.default_caption)
        raw_dit.train(was_training)
        import numpy as np

        truth = tensor_to_frames(sample["video"][:, :n])
        panel = np.concatenate([truth, pose, video], axis=2)  # ground truth | pose | generated
        out = Path(cfg.train.output_dir) / "validation" / f"step-{step:06d}.mp4"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_video(out, panel, fps=float(sample["meta"].get("fps", 30.0)))
    acc.wait_for_everyone()
    return out


# ---------------------------------------------------------------------------- exports


def export(cfg: Config, acc, model, raw_dit, ema: dict[str, torch.Tensor] | None) -> dict[str, str]:
    """``output_dir/export/``: DiT in the requested layouts, EMA variant, LoRA community file."""
    from wan_animate.checkpoint import save_dit
    from wan_animate.lora import save_lora, strip_lora_state_dict

    out = Path(cfg.train.output_dir) / "export"
    state = acc.get_state_dict(model)  # collective under ZeRO-3
    written: dict[str, str] = {}
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        meta = {"train_mode": cfg.train.mode, "experiment": str(cfg.experiment_name)}
        base = {k: v.detach().float().cpu() for k, v in strip_lora_state_dict(state).items()}
        write_full = cfg.train.mode != "lora" or cfg.lora.train_adapters
        if write_full:
            for layout in cfg.train.export_layouts:
                save_dit(_StateHolder(base, raw_dit.config), out / layout, layout=layout, metadata=meta)
                written[layout] = str(out / layout)
        if cfg.train.mode == "lora":
            lora_state = {k: v for k, v in state.items() if ".lora_" in k}
            alpha = float(cfg.lora.alpha if cfg.lora.alpha is not None else cfg.lora.rank)
            save_lora(lora_state, out / "lora.safetensors", alpha=alpha,
                      metadata={"rank": cfg.lora.rank, "alpha": alpha, "train_mode": "lora"})
            written["lora"] = str(out / "lora.safetensors")
        if ema is not None:
            ema_state = dict(base)
            for name, value in ema.items():
                if ".lora_" in name:
                    continue
                ema_state[name.replace(".base_layer.", ".")] = value
            save_dit(_StateHolder(ema_state, raw_dit.config), out / "ema" / "official", layout="official",
                     metadata={**meta, "ema_decay": str(cfg.optim.ema_decay)})
            written["ema"] = str(out / "ema" / "official")
            if cfg.train.mode == "lora":
                ema_lora = {k: v for k, v in ema.items() if ".lora_" in k}
                if ema_lora:
                    alpha = float(cfg.lora.alpha if cfg.lora.alpha is not None else cfg.lora.rank)
                    save_lora(ema_lora, out / "ema" / "lora.safetensors", alpha=alpha)
        (out / "README.txt").write_text(
            "official/  : DiT in the Wan-AI/Wan2.2-Animate-14B layout (wan_animate.checkpoint.load_dit)\n"
            "diffusers/ : WanAnimateTransformer3DModel.from_pretrained folder\n"
            "lora.safetensors : community LoRA layout (diffusers load_lora_weights, ComfyUI, eval.generate --lora)\n"
            "ema/       : EMA weights (when optim.ema_decay > 0)\n"
        )
    acc.wait_for_everyone()
    return written
