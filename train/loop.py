"""``run(cfg)``: the training run around ``train.trainer.Trainer``.

accelerator -> startup checks -> quick-start assets -> Trainer (models, trainable set, optimizer,
``accelerate.prepare``) -> resume from the newest complete checkpoint -> steps (metrics, periodic
checkpoints and validation, preemption) -> final validation video and exports. Returns a small
summary dict (also written to ``<output_dir>/summary.json``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from train import preflight
from train.checkpoint import run_dir
from train.checkpoint import store as checkpointing
from train.checkpoint.resume_settings import check_resume_settings
from train.assets import prepare_assets
from train.config import Config, config_to_dict
from train.checkpoint.export import export
from train.metrics import StepReporter, plot_loss_curve
from train.signals import Preemption
from train.parallel import all_ranks_true, check_world, make_accelerator, write_rank_report, zero_stage
from train.trainer import Trainer, startup_checks
from train.validation import condition_gaps, validate


def _start(cfg: Config):
    """Accelerator, checks and assets: everything before a model loads."""
    acc = make_accelerator(cfg)
    check_world(acc)
    startup_checks(cfg, acc)
    out_dir = Path(cfg.train.output_dir)
    launch = run_dir.launch_identity(cfg, acc.num_processes, acc.state.deepspeed_plugin is not None, zero_stage(acc))
    run_dir.check_fresh_start(cfg, acc.is_main_process)  # resume=false on a used folder: refused (or moved aside)
    run_dir.check_output_dir(cfg, launch)  # another launch on this run's folder: refused, nothing written
    if cfg.train.resume and checkpointing.latest_complete(out_dir) is not None:
        check_resume_settings(cfg, run_dir.previous_identity(out_dir)[1])  # keys a resume cannot apply: refused
        checkpointing.resume_point(acc, out_dir)  # damaged checkpoints moved aside; none usable: refused
    finished = run_dir.finished_run(cfg)
    model_path, urls = prepare_assets(cfg, acc)
    if finished is None:
        dit_config, layout = preflight.announce(cfg, acc, model_path, urls, zero_stage(acc))
        if acc.is_main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
            run_dir.write_config(cfg, launch, run_dir.loaded_model_record(cfg, model_path, dit_config, layout))
    return acc, out_dir, model_path, urls, finished


def _after_step(trainer: Trainer, out_dir: Path, stop: bool) -> None:
    """Checkpoint (periodic, on preemption, at the end), periodic validation, debug delay."""
    t = trainer.cfg.train
    step = trainer.state.step
    if (t.checkpoint_every and step % t.checkpoint_every == 0) or stop or step == t.max_steps:
        trainer.save_checkpoint(out_dir)
    if t.validation and t.validate_every and step % t.validate_every == 0 and step != t.max_steps:
        validate(trainer.cfg, trainer.acc, trainer.pipe, trainer.raw_dit, trainer.urls, step, trainer.stage)
    if t.debug_step_delay_s > 0:
        time.sleep(t.debug_step_delay_s)


def _preempted(preempt: Preemption) -> str:
    return f"preempted ({preempt.signal or 'signal on another rank'})"


def _train(trainer: Trainer, reporter: StepReporter, out_dir: Path, preempt: Preemption) -> tuple[str, list[str]]:
    """Steps until ``train.max_steps`` or a preemption; returns (status, this rank's trained keys)."""
    cfg, acc = trainer.cfg, trainer.acc
    trained_keys: list[str] = []
    if trainer.state.step < cfg.train.max_steps and all_ranks_true(acc, preempt.requested):
        return _preempted(preempt), trained_keys  # signalled while loading: nothing new to save
    while trainer.state.step < cfg.train.max_steps:
        t0 = time.perf_counter()  # the step time includes loading and encoding its batches
        result = trainer.train_step(trainer.next_micro_batches())
        result = dataclasses.replace(result, seconds=time.perf_counter() - t0)
        reporter.report(result, trainer.data.skipped, trainer.state.total_nonfinite)
        if cfg.train.rank_report:
            trained_keys.extend(result.keys)
        stop = all_ranks_true(acc, preempt.requested)
        _after_step(trainer, out_dir, stop)
        if stop:
            return _preempted(preempt), trained_keys
    return "finished", trained_keys


def _finish(trainer: Trainer, status: str, result: dict[str, Any], preempt: Preemption) -> str:
    """Final validation, then exports; returns the run's status. A stop signal lets the phase in
    progress complete and leaves the next one to the rerun (the checkpoint at ``max_steps`` is
    complete, so the rerun resumes there and only validates / exports)."""
    cfg, main = trainer.cfg, trainer.acc.is_main_process
    if status != "finished":
        if main:
            print(f"[train] final validation and exports skipped: the run stopped early ({status}); rerun the "
                  "same command to finish it", flush=True)
        return status
    for phase in ("validation", "export"):
        if not getattr(cfg.train, phase):
            continue
        if all_ranks_true(trainer.acc, preempt.requested):
            if main:
                print(f"[train] {preempt.signal or 'stop signal'} before the final {phase}: skipped; rerun the same "
                      "command to finish (it resumes at the last step and only validates / exports)", flush=True)
            return _preempted(preempt)
        if phase == "validation":
            video = validate(cfg, trainer.acc, trainer.pipe, trainer.raw_dit, trainer.urls, trainer.state.step,
                             trainer.stage)
            result["validation_video"] = str(video) if video else None
            result["condition_gaps"] = condition_gaps(cfg, trainer.acc, trainer.pipe, trainer.raw_dit, trainer.urls,
                                                      trainer.batch_dtype, trainer.stage)
        else:
            result["exports"] = _export(trainer)
    if preempt.requested and main:
        print(f"[train] {preempt.signal} during the final phase: it completed; stopping", flush=True)
    return status


def _export(trainer: Trainer) -> dict[str, str]:
    ema = trainer.ema.state_dict() if trainer.ema is not None else None
    return export(trainer.cfg, trainer.acc, trainer.model, trainer.raw_dit, ema)


def _reexport(cfg: Config, acc, model_path: Path, urls: list[str], finished: run_dir.Finished) -> dict[str, Any]:
    """A finished run whose exports are missing: load its last checkpoint and export, nothing else."""
    trainer = Trainer(cfg, acc, model_path, urls)
    trainer.resume(cfg.train.output_dir)
    result = {**finished.summary, "exports": _export(trainer)}
    if acc.is_main_process:
        run_dir.write_summary(Path(cfg.train.output_dir), result)
        print(f"[train] re-exported to {Path(cfg.train.output_dir) / 'export'}", flush=True)
    acc.wait_for_everyone()
    acc.end_training()
    return result


def run(cfg: Config) -> dict[str, Any]:
    """The whole run, with stop signals caught from the first line to the summary (``Preemption``)."""
    with Preemption() as preempt:
        return _run(cfg, preempt)


def _run(cfg: Config, preempt: Preemption) -> dict[str, Any]:
    t_start = time.time()
    acc, out_dir, model_path, urls, finished = _start(cfg)
    main = acc.is_main_process
    if finished is not None:  # rerun of a finished run: no training, validation, wandb run or summary rewrite
        if main:
            print(f"[train] {run_dir.finished_message(cfg, finished)}", flush=True)
        if finished.exports_missing:
            return _reexport(cfg, acc, model_path, urls, finished)
        acc.end_training()
        return finished.summary
    trainer = Trainer(cfg, acc, model_path, urls)
    resumed = trainer.resume(out_dir) if cfg.train.resume else None
    if resumed is not None and main:
        print(f"[train] resumed from {resumed} (step {trainer.state.step})", flush=True)
    if main:
        s = trainer.summary
        print(f"[train] mode={cfg.train.mode} world={acc.num_processes} zero={trainer.stage} trainable="
              f"{s['trainable_params']:,}/{s['total_params']:,} groups={s['groups']} "
              f"device={acc.device} start_step={trainer.state.step}", flush=True)
        if trainer.sp.enabled:  # effective batch = micro x accum x P / N: a group trains one sample
            t = cfg.train
            print(f"[train] sequence_parallel={trainer.sp.size}: {trainer.sp.data_world} group(s) of "
                  f"{trainer.sp.size} ranks; effective batch {t.micro_batch_size * t.grad_accum * trainer.sp.data_world} "
                  "samples per step", flush=True)
    # after the header lines: the progress bar starts here
    reporter = StepReporter(cfg, acc, trainer.raw_dit.config, out_dir, trainer.state.step, config_to_dict(cfg))
    status, trained_keys = _train(trainer, reporter, out_dir, preempt)
    reporter.bar.close()
    if cfg.train.rank_report:
        write_rank_report(out_dir, acc, trainer.raw_dit, trained_keys, trainer.state.step)
    result: dict[str, Any] = {"status": status, "step": trainer.state.step, "final_loss": reporter.last_loss,
                              "world_size": acc.num_processes, "zero_stage": trainer.stage,
                              "sequence_parallel": trainer.sp.size, **trainer.summary}
    result.update(trainer.data_report())  # data/skipped over all ranks + the first reasons
    result["status"] = status = _finish(trainer, status, result, preempt)
    if main:
        curve = plot_loss_curve(out_dir)
        result.update(loss_curve=str(curve) if curve else None, metrics=str(out_dir / "metrics.jsonl"),
                      seconds=round(time.time() - t_start, 1), mfu_basis=reporter.peak_source)
        run_dir.write_summary(out_dir, result)  # strict JSON: a NaN loss is null
        print(f"[train] {status} at step {trainer.state.step}; loss {reporter.last_loss:.4f}; outputs in {out_dir}",
              flush=True)
    reporter.close()
    acc.wait_for_everyone()
    acc.end_training()
    return result
