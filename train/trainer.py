"""The trainer: one code path for CPU, one GPU, DDP and DeepSpeed ZeRO-2/3.

``Trainer`` holds the model of ``model.family`` with its trainable set (``train.modes``), the
optimizer and LR schedule, ``TrainState`` / ``EMA`` / noise generator (``train.state``) and the data
position (``BatchIterator``); ``train_step`` runs one optimizer step through ONE update function for
both paths; ``state_dict`` is what a checkpoint adds to accelerate's own state. ``train.loop.run``
drives it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from train import sequence
from train.checkpoint import resume_settings
from train.checkpoint import store as checkpointing
from train.checkpoint.trainable import TrainableOnlyCheckpoints, fingerprint_base, is_trainable_only
from train.config import Config, ConfigError, check_launch
from train.data import BatchIterator, StreamSpec
from train.frozen_encoders import load_frozen_encoders
from train.grad_host import HostGradAccumulation
from train.modes import make_optimizer, make_scheduler, prepare_model
from train.parallel import all_ranks_true, zero_stage
from train.state import EMA, NonFiniteLossError, TrainState, rank_generator
from wan_animate.batch import fixed_draw
from wan_animate.family import get_family
from wan_animate.objective import flow_matching_loss


@dataclass
class StepResult:
    """One optimizer step as every rank agrees on it."""

    step: int  # optimizer steps taken after this one
    loss: float  # mean over ranks and micro-batches; NaN when any rank's loss was not finite
    grad_norm: float  # before clipping; NaN when unknown (DeepSpeed without a norm)
    skipped: bool  # no update applied (non-finite loss or gradient)
    lr: float  # first param group's LR after the step
    samples: int  # examples in this step over all ranks
    seconds: float
    keys: list[str] = field(default_factory=list)  # this rank's sample keys
    latent_shape: tuple[int, ...] = ()  # (T+1, h, w) of the first micro-batch (FLOP count)


def startup_checks(cfg: Config, acc) -> None:
    """Combinations only known once the launch is (DeepSpeed stage, world); before any model loads."""
    engine = "deepspeed" if acc.state.deepspeed_plugin is not None else ("ddp" if acc.num_processes > 1 else "none")
    check_launch(cfg, engine, acc.num_processes)
    if zero_stage(acc) == 3 and cfg.optim.ema_decay > 0:
        raise ConfigError("optim.ema_decay > 0 is not supported with ZeRO-3 (parameters are partitioned); "
                          "set optim.ema_decay=0 or use ZeRO-2.")


class Trainer:
    def __init__(self, cfg: Config, acc, model_path: Path, urls: list[str]):
        self.cfg, self.acc, self.urls = cfg, acc, list(urls)
        self.device = acc.device
        self.use_deepspeed = acc.state.deepspeed_plugin is not None
        self.stage = zero_stage(acc)
        # the batch dtype: DeepSpeed engines hold bf16 weights; the plain path autocasts fp32 inputs
        bf16 = cfg.train.precision == "bf16"
        self.batch_dtype = torch.bfloat16 if (bf16 and self.use_deepspeed) else torch.float32
        self.sp = sequence.sequence_layout(cfg, acc)  # groups of ranks sharing one sample (N = 1: off)
        torch.manual_seed(cfg.train.seed)  # identical initialisation of LoRA factors on every rank
        self.model_path = Path(model_path)
        self.family = get_family(cfg.model.family)
        # the DiT on the CPU in the released dtype, moved by accelerate/DeepSpeed once the trainable set is
        # fixed (no rank holds a full-precision copy on its GPU); the frozen encoders load after the memory
        # options placed it (docs/memory.md, host RAM)
        dit = self.family.load(self.family.dit_path(model_path), dtype=torch.bfloat16 if bf16 else torch.float32,
                               device="cpu")
        # trainable set, fp32 masters, memory options: the order the memory planner builds too
        self.groups, self.summary, self.memory = prepare_model(dit, cfg, self.family, deepspeed=self.use_deepspeed,
                                                               device=self.device)
        # cached shards: no encoder is loaded for training (``Trainer.pipe`` loads them on demand)
        self._pipe = load_frozen_encoders(cfg, acc, model_path, dit) if cfg.data.source != "cached" else None
        sequence.apply_to_dit(self.sp, dit, self.family)
        optimizer = make_optimizer(self.groups, cfg.optim)
        self.scheduler = make_scheduler(optimizer, cfg)
        self.model, self.optimizer = self._prepare(dit, optimizer)
        self.raw_dit = acc.unwrap_model(self.model)
        # lora / adapters_only: checkpoints hold the trainables only and reference the frozen base
        self.trainable_ckpt = (TrainableOnlyCheckpoints(acc, fingerprint_base(model_path), cfg.train.mode)
                               if is_trainable_only(cfg.train.mode) else None)
        self.trainable = [(n, p) for n, p in self.raw_dit.named_parameters() if p.requires_grad]
        on_host = cfg.train.grad_accum_on_host and cfg.train.grad_accum > 1  # one process (check_launch)
        self.host_grads = HostGradAccumulation([p for _, p in self.trainable], self.device) if on_host else None
        self.state = TrainState()
        self.ema = EMA(self.trainable, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        self.generator = rank_generator(cfg.train.seed, self.sp.data_rank)  # a group draws the same noise
        self._data_state = {"position": 0, "skipped": 0, "seen": 0}
        self._data: BatchIterator | None = None

    def _prepare(self, dit: torch.nn.Module, optimizer):
        """``accelerate.prepare``; a DeepSpeed bf16 engine casts every parameter to bf16, so the
        fp32-by-design tensors are put back afterwards (``train.deepspeed_precision``)."""
        keep = None
        if self.use_deepspeed and self.cfg.train.precision == "bf16":
            from train.deepspeed_precision import Fp32ByDesign

            keep = Fp32ByDesign(dit)
        model, optimizer = self.acc.prepare(dit, optimizer)
        if keep is not None:
            counts = keep.restore(self.acc.unwrap_model(model), self.stage)
            if counts["frozen_bf16"] and self.acc.is_main_process:
                print(f"[train] ZeRO-3 keeps {counts['frozen_bf16']} frozen fp32-by-design tensors (norms, modulation) "
                      "in bf16: DeepSpeed gathers parameters in one dtype; ZeRO-2 keeps them fp32.", flush=True)
        return model, optimizer

    @property
    def pipe(self):
        """``AnimatePipeline`` of the live DiT and the frozen encoders; with cached shards loaded on
        first use (validation), never for the training steps."""
        if self._pipe is None:
            self._pipe = load_frozen_encoders(self.cfg, self.acc, self.model_path, self.raw_dit)
        return self._pipe

    # ------------------------------------------------------------------ data position

    @property
    def data(self) -> BatchIterator:
        """The rank's batch stream, opened at the restored position on first use."""
        if self._data is None:
            cfg = self.cfg
            sizes = self.family.stream_sizes(self.raw_dit.config)
            spec = StreamSpec(
                urls=self.urls, cfg=cfg.data, micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed,
                rank=self.sp.data_rank, world_size=self.sp.data_world,  # a group reads the same samples
                streams=tuple(sizes), face_size=cfg.data.face_size or sizes.get("face") or 0,
                default_size=(cfg.data.synthetic_height, cfg.data.synthetic_width)
                if cfg.data.source == "synthetic" else None)
            saved = self._data_state
            self._data = BatchIterator(spec, start_batch=saved["position"], skipped=saved["skipped"], seen=saved["seen"])
        return self._data

    def data_report(self) -> dict[str, Any]:
        """Collective: samples skipped as unreadable over all ranks (a sequence-parallel group reads
        the same ones: counted once) and this rank's first reasons, for ``summary.json``."""
        mine = self._data.skipped if self._data is not None else self._data_state["skipped"]
        total = float(mine)
        if self.acc.num_processes > 1:
            total = self.acc.reduce(torch.tensor([total], device=self.device), "sum").item() / self.sp.size
        return {"data_skipped": int(round(total)), "data_skip_reasons": self._data.reasons if self._data else []}

    def next_micro_batches(self) -> list[dict[str, Any]]:
        """``train.grad_accum`` model input batches for the next optimizer step (frozen encoders run here)."""
        build = self.family.build_inputs
        batches = [build(next(self.data), self._pipe, self.device, self.batch_dtype, self.cfg.data.clip_len)
                   for _ in range(self.cfg.train.grad_accum)]
        sequence.check_first_batch(self.sp, batches[0], self.generator)
        return batches

    # ------------------------------------------------------------------ one optimizer step

    def train_step(self, micro_batches: Sequence[dict[str, Any]]) -> StepResult:
        """Forward + backward over ``grad_accum`` micro-batches, then one update (or a skip)."""
        cfg, acc = self.cfg, self.acc
        if len(micro_batches) != cfg.train.grad_accum:
            raise ValueError(f"train_step got {len(micro_batches)} micro-batches; train.grad_accum="
                             f"{cfg.train.grad_accum} needs exactly that many per optimizer step.")
        t0 = time.perf_counter()
        loss_local = self._accumulate(micro_batches)
        grad_norm, update_skipped = self._apply_update()
        nonfinite_loss = all_ranks_true(acc, not bool(torch.isfinite(loss_local)))
        skipped = update_skipped or nonfinite_loss
        try:
            self.state.record_update(skipped, cfg.train.max_consecutive_nonfinite)
        except NonFiniteLossError as e:  # name the checkpoint a rerun resumes from
            good = checkpointing.last_good(cfg.train.output_dir)
            where = (f"Last good checkpoint: {good[1]} (step {good[0]}); a rerun resumes from it." if good
                     else "No checkpoint was written before the streak.")
            raise NonFiniteLossError(f"{e} {where}") from None
        if not skipped:
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update()
        loss = acc.reduce(torch.nan_to_num(loss_local, nan=0.0, posinf=0.0).to(self.device), "mean").item()
        return StepResult(
            step=self.state.step, loss=float("nan") if nonfinite_loss else loss, grad_norm=grad_norm,
            skipped=skipped, lr=self.optimizer.param_groups[0]["lr"],
            samples=sum(len(b["keys"]) for b in micro_batches) * self.sp.data_world,  # once per group
            seconds=time.perf_counter() - t0, keys=[k for b in micro_batches for k in b["keys"]],
            latent_shape=tuple(micro_batches[0]["latents"].shape[2:]))

    def _accumulate(self, micro_batches: Sequence[dict[str, Any]]) -> torch.Tensor:
        """Backward of every micro-batch; returns this rank's mean loss. DDP syncs on the last
        micro-batch only; DeepSpeed engines count micro-batches themselves (ZeRO-2/3 forbid
        ``no_sync``) and step inside the last ``backward``."""
        cfg, acc = self.cfg, self.acc
        sync_models = () if self.use_deepspeed else (self.model,)
        losses = []
        for index, batch in enumerate(micro_batches):
            if self.host_grads is not None:
                self.host_grads.micro_batch(index, len(micro_batches))
            ts = noise = None
            if cfg.train.fixed_noise_per_sample:
                ts, noise = fixed_draw(batch, cfg.loss, self.device)
            with acc.accumulate(*sync_models):
                with acc.autocast():
                    out = flow_matching_loss(self.model, batch, cfg.loss, timesteps=ts, noise=noise,
                                             generator=self.generator, predict=self.family.predict)
                acc.backward(out.loss)
            losses.append(out.loss.detach().float())
        if not acc.sync_gradients:
            raise RuntimeError("gradient accumulation is out of phase with train.grad_accum: the last "
                               "micro-batch of a step did not sync gradients.")
        return torch.stack(losses).mean()

    def _apply_update(self) -> tuple[float, bool]:
        """The update after the last backward; returns (gradient norm, skipped). DeepSpeed already
        clipped, stepped and zeroed inside ``acc.backward``: read its skip flag and norm. Plain path:
        clip, agree on all ranks whether the norm is finite, step or skip, zero the gradients."""
        if self.use_deepspeed:
            skipped = bool(self.acc.optimizer_step_was_skipped)
            gn = self.model.get_global_grad_norm() if hasattr(self.model, "get_global_grad_norm") else None
            grad_norm = float(gn) if gn is not None else float("nan")
            return grad_norm, skipped or (gn is not None and not math.isfinite(grad_norm))
        # optim.grad_clip=0 disables clipping: an infinite bound only measures the norm
        grad_norm = float(self.acc.clip_grad_norm_([p for _, p in self.trainable], self.cfg.optim.grad_clip or math.inf))
        skipped = all_ranks_true(self.acc, not math.isfinite(grad_norm))
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, skipped

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """This rank's state besides accelerate's (model, optimizer, RNG): what checkpoints add."""
        return {
            "train": {**self.state.state_dict(), **sequence.record(self.sp)},
            "scheduler": self.scheduler.state_dict(),
            "data": self._data.state_dict() if self._data is not None else dict(self._data_state),
            "rng": self.generator.get_state(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sequence.check_resume(self.sp, state["train"])
        self.state.load_state_dict(state["train"])
        if state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        else:  # checkpoints written before the scheduler state was saved: rebuild it from the step
            print("[train] checkpoint has no LR scheduler state; stepping it to the checkpoint's step", flush=True)
            for _ in range(self.state.step):
                self.scheduler.step()
        # the optimizer's LRs follow the scheduler (they are also in the optimizer state, except
        # where an engine rebuilt its param groups)
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self._data_state = dict(state["data"])
        self._data = None  # reopened at the restored position
        self.generator.set_state(state["rng"])
        if self.ema is not None:
            if state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            else:  # EMA switched on for a run that had none: start averaging from the loaded weights
                self.ema.reset()

    def save_checkpoint(self, output_dir: str | Path) -> Path | None:
        """Collective. None while the current streak of non-finite steps lasts: those weights are
        suspect, and saving them would push the last good checkpoint out of ``keep_last``."""
        if self.state.consecutive_nonfinite:
            if self.acc.is_main_process:
                print(f"[train] step {self.state.step}: no checkpoint during a streak of "
                      f"{self.state.consecutive_nonfinite} non-finite step(s)", flush=True)
            return None
        kw = self.trainable_ckpt.save_kwargs if self.trainable_ckpt else None
        return checkpointing.save_checkpoint(self.acc, output_dir, self.state.step, self.state_dict(),
                                             self.cfg.train.keep_last, save_kwargs=kw)

    def resume(self, output_dir: str | Path) -> Path | None:
        """Collective: load the newest complete checkpoint under ``output_dir``, if any."""
        path = checkpointing.resume_point(self.acc, output_dir)  # manifest + pickle checks, fallback
        if path is None:
            return None
        kw = self.trainable_ckpt.load_kwargs if self.trainable_ckpt else None
        configured = resume_settings.snapshot(self.optimizer, self.scheduler)
        self.load_state_dict(checkpointing.load_checkpoint(self.acc, path, load_kwargs=kw))
        resume_settings.reapply(configured, self.optimizer, self.scheduler, self.acc.is_main_process)  # config wins
        return path
