"""Validation videos during and after training: rank 0 renders the first data sample through the
shared ``AnimatePipeline.generate`` with the live DiT (ground truth | pose | generated)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from train.config import Config
from wan_animate.video_io import tensor_to_frames


def validate(cfg: Config, acc, pipe, raw_dit, urls: list[str], step: int, stage: int) -> Path | None:
    """Collective (every rank calls it; rank 0 renders). Returns the video path on rank 0.

    Under ``train.sequence_parallel=N`` the DiT is collective: the N ranks of rank 0's group (ranks
    0..N-1) render together with the same inputs and seed, rank 0 writes; the others wait."""
    out = None
    if stage == 3:
        if acc.is_main_process:
            print("[train] validation skipped under ZeRO-3 (parameters are partitioned); run eval.generate "
                  "on the export instead.", flush=True)
        return None
    if acc.process_index < cfg.train.sequence_parallel and cfg.data.source != "cached":
        out = _render(cfg, acc, pipe, raw_dit, urls[0], step)
    acc.wait_for_everyone()
    return out


def _render(cfg: Config, acc, pipe, raw_dit, url: str, step: int) -> Path:
    from webdataset.tariterators import tarfile_samples

    from data_tools.dataset import decode_sample
    from wan_animate.pipeline import AnimatePipeline
    from wan_animate.video_io import write_video

    sample = decode_sample(next(iter(tarfile_samples([{"url": url}]))))
    n = cfg.data.clip_len
    ref = tensor_to_frames(sample["ref"])
    pose, face = tensor_to_frames(sample["pose"][:, :n]), tensor_to_frames(sample["face"][:, :n])
    was_training = raw_dit.training
    val_pipe = AnimatePipeline(raw_dit, pipe.vae, pipe.text_encoder, pipe.image_encoder, device=acc.device)
    video = val_pipe.generate(ref, pose, face, steps=cfg.train.validation_steps, seed=cfg.train.seed,
                              clip_len=n, refert_num=min(cfg.data.refert_nums), progress=False,
                              prompt=sample.get("caption") or cfg.data.default_caption)
    raw_dit.train(was_training)
    if not acc.is_main_process:  # another rank of rank 0's sequence-parallel group
        return None
    truth = tensor_to_frames(sample["video"][:, :n])
    panel = np.concatenate([truth, pose, video], axis=2)  # ground truth | pose | generated
    out = Path(cfg.train.output_dir) / "validation" / f"step-{step:06d}.mp4"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_video(out, panel, fps=float(sample["meta"].get("fps", 30.0)))
    return out
