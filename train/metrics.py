"""Throughput / MFU / memory figures and the namespaced metrics sink (metrics.jsonl + wandb).

Namespaces: ``loss/*``, ``perf/*``, ``memory/*``, ``data/*``, ``optim/*``, ``train/*``.
Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from wan_animate.config import WanAnimateConfig, dit_forward_flops
from wan_animate.files import atomic_write_bytes, dumps_strict

# ---------------------------------------------------------------------------- FLOPs


_PEAK_TFLOPS = {  # dense bf16 tensor-core peaks
    "H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "RTX 4090": 165.0,
    "A6000": 155.0, "V100": 125.0,
}


def peak_flops(device: torch.device, precision: str, override_tflops: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained). On CPU the peak is measured with a dense fp32 matmul."""
    if override_tflops > 0:
        return override_tflops * 1e12, "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in _PEAK_TFLOPS.items():
            if key in name:
                scale = 1.0 if precision == "bf16" else 0.5  # tf32
                return tf * 1e12 * scale, f"{name} datasheet"
        return 100e12, f"{name} (unknown, assumed 100 TFLOP/s)"
    # timed by hand: importing torch.utils.benchmark costs every training process ~0.35 s (measured)
    n, repeats = 512, 10
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - start), "measured fp32 matmul"


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is KiB on Linux: the process's peak resident set
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ---------------------------------------------------------------------------- sink


class MetricsLogger:
    def __init__(self, output_dir: str | Path, enabled: bool, wandb_on: bool, project: str,
                 config: dict[str, Any], resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.path, resume_step)
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(project=project, dir=str(Path(output_dir)), config=config, resume="allow",
                                     mode="online" if wandb_on else "offline", id=_run_id(output_dir),
                                     reinit="finish_previous")
        except Exception as e:  # wandb must never stop training; say so once
            print(f"[train] wandb disabled: {e}")

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as f:
            f.write(dumps_strict(rec) + "\n")  # strict JSON: a NaN/Inf value is written as null
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            with contextlib.suppress(Exception):  # wandb must never fail the run
                self._wandb.finish()


def truncate_metrics(path: Path, resume_step: int) -> int:
    """Drop the records logged after ``resume_step`` (a killed run's tail) and a torn last line
    (killed mid-append); returns how many lines were dropped. Rewritten atomically: a kill or a full
    disk at any point leaves the old file or the new one, never a prefix."""
    if not path.exists():
        return 0
    keep, dropped = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line) if line.endswith(b"\n") else None
            except ValueError:
                rec = None
            if isinstance(rec, dict) and rec.get("step", 0) <= resume_step:
                keep.append(line)
            elif line.strip():
                dropped += 1
    if dropped:
        atomic_write_bytes(path, b"".join(keep))
    return dropped


def _run_id(output_dir: str | Path) -> str:
    return hashlib.sha1(str(Path(output_dir).resolve()).encode()).hexdigest()[:12]


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    recs = []
    for i, line in enumerate(lines):
        try:
            recs.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:  # only the last line may be torn (a kill mid-append)
                raise
    # metrics.jsonl is strict JSON, so a non-finite value was written as null: read it back as NaN
    return [{k: (float("nan") if v is None else v) for k, v in r.items()} for r in recs]


def plot_loss_curve(output_dir: str | Path) -> Path | None:
    recs = [r for r in read_metrics(output_dir) if "loss/train" in r]
    if not recs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in recs]
    losses = [r["loss/train"] for r in recs]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=1, alpha=0.5, label="loss/train")
    k = max(1, len(losses) // 10)
    if k > 1:
        smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, lw=2, label=f"mean of {k}")
    ax.set(xlabel="step", ylabel="flow-matching loss", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(output_dir) / "loss_curve.png"
    fig.savefig(out)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------- per-step report


class StepReporter:
    """Turns each ``train.trainer.StepResult`` into the metrics record (every ``log_every`` steps)
    and the progress bar; rank 0 writes, every rank computes (the figures are collective-free)."""

    def __init__(self, cfg, acc, dit_config: WanAnimateConfig, output_dir: Path, start_step: int,
                 config_dict: dict[str, Any]):
        self.cfg, self.acc, self.dit_config = cfg, acc, dit_config
        main = acc.is_main_process
        self.logger = MetricsLogger(output_dir, enabled=main, wandb_on=cfg.train.wandb,
                                    project=cfg.train.wandb_project, config=config_dict, resume_step=start_step)
        self.peak, self.peak_source = peak_flops(acc.device, cfg.train.precision, cfg.train.peak_tflops)
        self.bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc="train", unit="step",
                        disable=not (main and cfg.train.progress), dynamic_ncols=True)
        self._flops_per_sample: float | None = None
        # a rerun that only validates / exports (it resumes at the last step) reports the logged loss
        logged = [r["loss/train"] for r in (read_metrics(output_dir) if main else []) if "loss/train" in r]
        self.last_loss = float(logged[-1]) if logged else float("nan")

    def report(self, result, data_skipped: int, total_nonfinite: int) -> dict[str, float]:
        if self._flops_per_sample is None:  # from the first batch's latent size
            self._flops_per_sample = dit_forward_flops(self.dit_config, result.latent_shape)
        dt = result.seconds
        mfu = 3.0 * self._flops_per_sample * result.samples / (dt * self.peak * self.acc.num_processes)
        mem = peak_memory_gib(self.acc.device)
        self.last_loss = result.loss
        record = {"loss/train": result.loss, "perf/step_time_s": dt, "perf/samples_per_s": result.samples / dt,
                  "perf/mfu": mfu, "memory/peak_gib": mem, "data/skipped": data_skipped, "optim/lr": result.lr,
                  "optim/grad_norm": result.grad_norm, "train/nonfinite_skips": total_nonfinite}
        if result.step % self.cfg.train.log_every == 0 or result.step == self.cfg.train.max_steps:
            self.logger.log(result.step, record)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{result.loss:.4f}", step_s=f"{dt:.2f}", sps=f"{result.samples / dt:.2f}",
                             mfu=f"{mfu:.1%}", mem=f"{mem:.1f}G")
        return record

    def close(self) -> None:
        self.bar.close()
        self.logger.close()
