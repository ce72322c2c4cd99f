"""Validation videos during and after training: rank 0 renders one sample through the model
family's pipeline (``generate``) with the live model (ground truth | first driving stream | generated).

The sample is the first of ``train.validation_urls`` (raw shards) when given, else the first
training sample. Cached training has no pixels: its sample's reference, pose and ground-truth
latents are decoded with the frozen VAE and go through the same ``generate`` as raw pixels (the
face crops are stored as pixels), so cached runs validate too.
"""

from __future__ import annotations

import dataclasses
import itertools
import tarfile
from pathlib import Path

import numpy as np
import torch
from webdataset.tariterators import tarfile_samples

from train.config import Config
from train.data import ShardStream, StreamSpec, cached_text_embeds, resolve_urls
from train.preflight import ZERO3_VALIDATION
from wan_animate.family import get_family
from wan_animate.heldout import condition_sensitivity
from wan_animate.samples import decode_cached_sample, decode_sample
from wan_animate.video_io import VideoDecodeError, tensor_to_frames, write_video


# what a sample that does not load raises: SampleDecodeError (a ValueError), VideoDecodeError, a bad
# or truncated tar (TarError, OSError), an empty shard (StopIteration), a missing field (KeyError)
_DATA_FAULTS = (ValueError, VideoDecodeError, KeyError, OSError, StopIteration, tarfile.TarError)


def validate(cfg: Config, acc, pipe, raw_dit, urls: list[str], step: int, stage: int) -> Path | None:
    """Collective (every rank calls it; rank 0 renders). Returns the video path on rank 0.

    Under ``train.sequence_parallel=N`` the DiT is collective: the N ranks of rank 0's group (ranks
    0..N-1) render together with the same inputs and seed, rank 0 writes; the others wait."""
    out = None
    if stage == 3:
        if acc.is_main_process:
            print(f"[train] {ZERO3_VALIDATION} instead.", flush=True)
        return None
    if acc.process_index < cfg.train.sequence_parallel:
        try:
            out = _render(cfg, acc, pipe, raw_dit, urls, step)
        except _DATA_FAULTS as e:  # a bad validation sample must not cost the run its exports
            if acc.is_main_process:
                print(f"[train] validation at step {step} skipped: its sample does not load ({type(e).__name__}: "
                      f"{str(e)[:300]}); fix or replace it (data_tools.inspect, train.validation_urls).", flush=True)
    acc.wait_for_everyone()
    return out


def _first_raw(url: str) -> dict:
    return next(iter(tarfile_samples([{"url": url}])))


def raw_inputs(url: str, clip_len: int, streams: tuple[str, ...]) -> dict:
    """First sample of raw shards -> uint8 frames ``ref``, ``truth``, one per driving stream
    (``pose``, ``face``, ...) + ``caption``, ``fps``."""
    s = decode_sample(_first_raw(url))
    return {"ref": tensor_to_frames(s["ref"]), "truth": tensor_to_frames(s["video"][:, :clip_len]),
            **{k: tensor_to_frames(s[k][:, :clip_len]) for k in streams},
            "caption": s.get("caption"), "fps": float(s["meta"].get("fps", 30.0))}


def cached_inputs(urls: list[str], vae, streams: tuple[str, ...]) -> dict:
    """First sample of cached shards -> the same frames, its latents decoded with the frozen VAE."""
    text = cached_text_embeds(urls)
    s = decode_cached_sample(_first_raw(urls[0]), text)
    latent = [k for k in streams if k != "face"]  # the face crops are stored as pixels
    with torch.no_grad():
        decoded = {k: vae.decode(s[k].unsqueeze(0).float())[0] for k in ("ref", *latent, "target")}
    n = decoded["target"].shape[1]
    return {"ref": tensor_to_frames(decoded["ref"][:, 0]), **{k: tensor_to_frames(decoded[k]) for k in latent},
            **({"face": tensor_to_frames(s["face"][:, :n])} if "face" in streams else {}),
            "truth": tensor_to_frames(decoded["target"]),
            "caption": s.get("caption"), "fps": float(s["meta"].get("fps", 30.0))}


def validation_inputs(cfg: Config, pipe, urls: list[str], streams: tuple[str, ...] = ("pose", "face")) -> dict:
    if cfg.train.validation_urls:
        return raw_inputs(resolve_urls(list(cfg.train.validation_urls))[0], cfg.data.clip_len, streams)
    if cfg.data.source == "cached":
        return cached_inputs(urls, pipe.vae, streams)
    return raw_inputs(urls[0], cfg.data.clip_len, streams)


def _render(cfg: Config, acc, pipe, raw_dit, urls: list[str], step: int) -> Path | None:
    streams = tuple(get_family(cfg.model.family).streams)
    x = validation_inputs(cfg, pipe, urls, streams)
    was_training = raw_dit.training
    val_pipe = type(pipe)(raw_dit, pipe.vae, pipe.text_encoder, pipe.image_encoder, device=acc.device)
    video = val_pipe.generate(x["ref"], **{f"{k}_video": x[k] for k in streams}, steps=cfg.train.validation_steps,
                              seed=cfg.train.seed, clip_len=cfg.data.clip_len, refert_num=min(cfg.data.refert_nums),
                              progress=False, prompt=x["caption"] or cfg.data.default_caption)
    raw_dit.train(was_training)
    if not acc.is_main_process:  # another rank of rank 0's sequence-parallel group
        return None
    # ground truth | first driving stream (Wan-Animate-14B: pose) | generated
    panel = np.concatenate([x["truth"], x[streams[0]], video], axis=2)
    out = Path(cfg.train.output_dir) / "validation" / f"step-{step:06d}.mp4"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_video(out, panel, fps=x["fps"])
    return out


# ---------------------------------------------------------------------------- condition gaps

GAP_SAMPLES = 4  # clips the end-of-run condition gaps are measured on
GAP_TIMESTEPS = (300.0, 600.0, 900.0)


def gap_batches(cfg: Config, pipe, urls: list[str], cached: bool, device, dtype, face_size: int,
                limit: int = GAP_SAMPLES) -> list[dict]:
    """The first ``limit`` samples of ``urls`` (raw or ``cached`` shards) as one-sample DiT batches
    with the training recipe's random choices off (no dropout, no temporal-reference frames,
    animate mode; the clip window drawn from a seeded generator)."""
    recipe = dataclasses.replace(cfg.data, source="cached" if cached else "shards", temporal_ref_prob=0.0,
                                 text_dropout=0.0, face_dropout=0.0, face_aug_prob=0.0, replace_prob=0.0)
    family = get_family(cfg.model.family)
    stream = ShardStream(StreamSpec(urls=urls, cfg=recipe, micro_batch_size=1, seed=cfg.train.seed,
                                    face_size=face_size, streams=tuple(family.streams)))
    batches = []
    for i, raw in enumerate(itertools.islice(tarfile_samples([{"url": u} for u in urls]), limit)):
        ex = stream.example(raw, stream.bucket_of(raw), np.random.default_rng([cfg.train.seed, i, 0x6A95]))
        batches.append(family.build_inputs([ex], pipe, device, dtype, cfg.data.clip_len))
    return batches


def condition_gaps(cfg: Config, acc, pipe, raw_dit, urls: list[str], dtype, stage: int) -> dict | None:
    """Collective. Rank 0: held-out loss with each clip's pose / face crops / reference swapped for
    the next clip's, minus its own (``wan_animate.heldout.condition_sensitivity``), on ``GAP_SAMPLES``
    clips at ``GAP_TIMESTEPS``: a model that follows its conditions shows positive gaps."""
    out, family = None, get_family(cfg.model.family)
    if acc.is_main_process:
        if stage == 3 or cfg.train.sequence_parallel > 1:
            print("[train] condition gaps skipped (ZeRO-3 / sequence parallelism: the DiT is partitioned); run "
                  "eval with metrics.names=[sensitivity] on the export instead.", flush=True)
        else:
            try:
                if cfg.train.validation_urls:
                    urls, cached, where = resolve_urls(list(cfg.train.validation_urls)), False, "validation clips"
                else:
                    cached, where = cfg.data.source == "cached", "training clips"
                batches = gap_batches(cfg, pipe, urls, cached, acc.device, dtype,
                                      cfg.data.face_size or family.stream_sizes(raw_dit.config).get("face") or 0)
                out = {"clips": where, **condition_sensitivity(raw_dit, batches, timesteps=GAP_TIMESTEPS,
                                                               seed=cfg.train.seed, family=family)}
            except (*_DATA_FAULTS, FileNotFoundError) as e:
                print(f"[train] condition gaps skipped: {type(e).__name__}: {str(e)[:300]}", flush=True)
            if out is not None:
                print(f"[train] condition gaps on {out['sensitivity_samples']} {out['clips']} (loss with another "
                      f"clip's condition minus own {out['sensitivity_own_loss']:.4f}; > 0: the model follows it): "
                      + ", ".join(f"{c} {out[f'sensitivity_{c}']:+.4f}" for c in family.conditions), flush=True)
    acc.wait_for_everyone()
    return out
