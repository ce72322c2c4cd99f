"""Encode raw shards once with the frozen VAE / CLIP / umT5 of a model folder.

    python -m data_tools.cache_latents input=RAW_DIR output=CACHED_DIR model=MODEL_DIR [device=auto dtype=bf16]

Per sample ``<key>.latents.safetensors`` (``target``, ``pose``, ``ref``, ``cond_r{n}``, ``clip``;
replace mode ``cond_replace_r{n}``, ``char_mask``; schema v2 ``driving``, ``clip_driving``), the face
crops as pixels and the json; prompt embeddings deduplicated in ``text_embeds.safetensors`` (the
empty prompt always included). Layout: docs/data.md. Output shards keep the input names; finished
ones are skipped on rerun.

CPU threads (``threads``, 0 = auto): libgomp spin-waits between the encoders' many small ops, and on
a machine whose cores are busy a spinning thread holds the core the awaited one needs (the tiny
model: 22 s per sample on 2 threads, 1.3 s on 1; bench/results/cache-latents-cpu.md). So waiting
threads sleep (``OMP_WAIT_POLICY=PASSIVE`` unless set) before torch loads; auto then uses every
core, or one thread when torch was loaded earlier with the spinning default (library use).
"""

from __future__ import annotations

import os
import sys

# Must precede the first torch import (libgomp reads it once, at load). See the docstring.
_TORCH_PRELOADED = "torch" in sys.modules
if not _TORCH_PRELOADED:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hashlib
import json
import tarfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

from data_tools.config import CacheLatentsConfig
from data_tools.shards import add_members
from wan_animate.animate2.config import REFERENCE_PROMPT
from wan_animate.conditioning import temporal_reference_video
from wan_animate.config import DEFAULT_PROMPT
from wan_animate.family import family_of
from wan_animate.files import atomic_write_bytes, atomic_write_json
from wan_animate.options import parse_dtype, resolve_device
from wan_animate.samples import TEXT_EMBEDS, decode_sample, list_shards, load_text_embeds, read_shard, shard_keys


def text_key(caption: str) -> str:
    return "text_" + hashlib.sha1(caption.encode("utf-8")).hexdigest()[:16]


def load_encoders(model_dir, *, device: str, compute_dtype: torch.dtype):
    """(vae, text_encoder, image_encoder) of a model folder (any model family: ``family_of`` reads
    the tensor names) via its pipeline's ``from_pretrained`` with a config-only DiT, so the DiT
    weights are never read."""
    model_dir = Path(model_dir)
    family = family_of(model_dir)
    config_only = torch.nn.Module()  # stands in for the DiT: only its config is read, no weights loaded
    config_only.config, _ = family.config(folder=model_dir)
    pipe = family.pipeline_class.from_pretrained(model_dir, dtype=compute_dtype, device=device,
                                                 dit=config_only, vae_dtype=compute_dtype)
    return pipe.vae, pipe.text_encoder, pipe.image_encoder


def omp_threads_sleep_when_waiting() -> bool:
    """True when this process's OpenMP threads sleep rather than spin while waiting (the wait
    policy was PASSIVE when torch loaded)."""
    return not _TORCH_PRELOADED and os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"


def cpu_threads(requested: int) -> int:
    """Intra-op threads for CPU encoding: ``requested`` when > 0; auto (0): the cores this
    process may use if waiting threads sleep, else 1 (spinning threads on a shared machine are
    10-70x slower than one thread; see the module docstring)."""
    if requested > 0:
        return requested
    if omp_threads_sleep_when_waiting():
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 1


class LatentCacher:
    def __init__(self, vae, text_encoder, image_encoder, *, device: str, store_dtype: torch.dtype,
                 refert_nums=(0, 1, 5)):
        self.vae, self.text_encoder, self.image_encoder = vae, text_encoder, image_encoder
        self.device = device
        self.store_dtype = store_dtype
        self.refert_nums = list(refert_nums)
        self._zeros_latent: dict[tuple, torch.Tensor] = {}

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(video.to(self.device)[None])[0].float().cpu()  # [16, t, h, w]

    def encode_sample(self, d: dict) -> dict[str, torch.Tensor]:
        video, pose, ref = d["video"], d["pose"], d["ref"]
        _, t_pix, h, w = video.shape
        out = {"target": self._encode(video), "pose": self._encode(pose), "ref": self._encode(ref[:, None])}
        out["clip"] = self.image_encoder.encode(ref[None].to(self.device))[0].float().cpu()
        if "driving" in d:  # schema v2: the driving stream of the Animate-2 family, and its CLIP (frame 0)
            out["driving"] = self._encode(d["driving"])
            out["clip_driving"] = self.image_encoder.encode(d["driving"][None, :, 0].to(self.device))[0].float().cpu()
        modes = [("cond_r", None)] + ([("cond_replace_r", d["bg"])] if "bg" in d else [])
        for prefix, bg in modes:
            for n in self.refert_nums:
                if n >= t_pix:
                    raise ValueError(f"refert_num {n} must be < clip frames {t_pix}")
                if n == 0 and bg is None:  # all zeros: same latent for every sample of this size
                    shape = (t_pix, h, w)
                    if shape not in self._zeros_latent:
                        self._zeros_latent[shape] = self._encode(torch.zeros(3, t_pix, h, w))
                    out[f"{prefix}{n}"] = self._zeros_latent[shape].clone()
                    continue
                clip, _ = temporal_reference_video(
                    t_pix, h, w, mode="replace" if bg is not None else "animate",
                    prev_frames=video[None, :, :n] if n > 0 else None,
                    bg_video=bg[None] if bg is not None else None)
                out[f"{prefix}{n}"] = self._encode(clip[0])
        if "mask" in d:
            lat_h, lat_w = out["target"].shape[-2:]
            out["char_mask"] = F.interpolate(d["mask"].float(), size=(lat_h, lat_w), mode="nearest")  # [1, T, h, w]
        return {k: v.to(self.store_dtype).contiguous() for k, v in out.items()}

    def embed_once(self, text: str, embeds: dict, captions: dict) -> str:
        """``text``'s key, encoding it into ``embeds`` / ``captions`` unless it is already there."""
        key = text_key(text)
        if key not in embeds:
            embeds[key] = self.text_encoder.encode([text])[0].float().cpu().to(self.store_dtype).contiguous()
            captions[key] = text
        return key


def _save_text_embeds(path: Path, embeds: dict[str, torch.Tensor], captions: dict[str, str]) -> None:
    atomic_write_bytes(path, save_safetensors(embeds, metadata={"captions": json.dumps(captions, ensure_ascii=False)}))


def _cache_shard(shard: Path, tmp: Path, cfg: CacheLatentsConfig, cacher: LatentCacher, embeds: dict,
                 captions: dict, skipped: list, on_sample) -> int:
    """Encode every sample of one raw shard into ``tmp``; returns the number written."""
    n = 0
    with tarfile.open(tmp, "w") as tar:
        for raw in read_shard(shard):
            try:
                d = decode_sample(raw)
            except Exception as e:  # a bad sample is skipped and reported, the shard goes on
                skipped.append({"shard": shard.name, "key": raw.get("__key__"), "reason": str(e)})
                on_sample(written=False)
                continue
            # An uncaptioned sample trains on the default prompt, as the raw-shard path does;
            # "" is reserved for condition dropout.
            cap_key = cacher.embed_once(d["caption"] or DEFAULT_PROMPT, embeds, captions)
            tensors = cacher.encode_sample(d)
            # the driving pass's fixed prompt, deduplicated like the captions
            extra = {"driving_text_key": cacher.embed_once(REFERENCE_PROMPT, embeds, captions)} if "driving" in d else {}
            meta = dict(d["meta"], **extra, text_key=cap_key, empty_text_key=text_key(""),
                        latent_shape=list(tensors["target"].shape), latent_dtype=cfg.dtype,
                        cached_from=str(shard), model=str(cfg.model))
            add_members(tar, d["key"], {"latents.safetensors": save_safetensors(tensors),
                                           "face.mp4": raw["face.mp4"],
                                           "json": json.dumps(meta, ensure_ascii=False).encode()})
            n += 1
            on_sample(written=True)
    return n


def cache_latents(cfg: CacheLatentsConfig, *, progress: bool = True, encoders=None) -> dict:
    """Run (or resume) latent caching; returns the manifest (also written to manifest.json).
    ``encoders=(vae, text, image)`` skips loading them from ``cfg.model`` (tests). The progress
    bar counts samples (not shards) and shows samples/s."""
    src, out = Path(cfg.input), Path(cfg.output)
    shards = list_shards(src)
    if not shards:
        raise SystemExit(f"error: input={src} has no shard-*.tar files (make them with data_tools.prepare)")
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob("*.tmp"):
        tmp.unlink()
    device = str(resolve_device(cfg.device))
    threads_before = torch.get_num_threads()
    threads = cpu_threads(cfg.threads)
    torch.set_num_threads(threads)  # restored below: a library call leaves global state as it was
    try:
        compute = parse_dtype(cfg.compute_dtype, device)
        vae, text_enc, image_enc = encoders or load_encoders(cfg.model, device=device, compute_dtype=compute)
        cacher = LatentCacher(vae, text_enc, image_enc, device=device, store_dtype=parse_dtype(cfg.dtype),
                              refert_nums=cfg.refert_nums)
        embeds_path = out / TEXT_EMBEDS
        embeds, captions = load_text_embeds(embeds_path) if embeds_path.is_file() else ({}, {})
        cacher.embed_once("", embeds, captions)
        todo = [s for s in shards if not (out / s.name).is_file()]
        started, n_done, skipped = time.time(), 0, []
        bar = tqdm(total=sum(len(shard_keys(s)) for s in todo), desc="cache_latents", unit="sample",
                   disable=not progress, dynamic_ncols=True)

        def on_sample(written: bool) -> None:
            bar.update(1)
            bar.set_postfix(samples_per_s=f"{bar.n / max(time.time() - started, 1e-9):.3f}",
                            skipped=len(skipped), refresh=False)

        for i, shard in enumerate(todo):
            bar.set_description(f"cache_latents shard {i + 1}/{len(todo)}")
            tmp = out / (shard.name + ".tmp")
            n_done += _cache_shard(shard, tmp, cfg, cacher, embeds, captions, skipped, on_sample)
            # Text embeddings first: a completed shard never refers to a caption that is not saved.
            _save_text_embeds(embeds_path, embeds, captions)
            os.replace(tmp, out / shard.name)
        bar.close()
    finally:
        torch.set_num_threads(threads_before)
    if not embeds_path.is_file():
        _save_text_embeds(embeds_path, embeds, captions)
    seconds = time.time() - started
    manifest = {"kind": "cached", "schema_version": 1, "config": asdict(cfg), "source_shards": len(shards),
                "shards": [p.name for p in list_shards(out)], "samples_this_run": n_done,
                "skipped_samples": skipped, "captions": len(captions), "device": device,
                "cpu_threads": threads, "omp_wait_policy_passive": omp_threads_sleep_when_waiting(),
                "seconds_this_run": round(seconds, 2),
                "samples_per_s": round(n_done / seconds, 4) if seconds > 0 else None}
    atomic_write_json(out / "manifest.json", manifest, indent=2)
    return manifest


def _main(cfg: CacheLatentsConfig) -> None:
    m = cache_latents(cfg)
    print(f"cached {m['samples_this_run']} samples this run into {cfg.output} ({len(m['shards'])} shards, "
          f"{m['captions']} captions, {len(m['skipped_samples'])} skipped) in {m['seconds_this_run']} s, "
          f"{m['samples_per_s']} samples/s on {m['cpu_threads']} CPU thread(s)")


if __name__ == "__main__":
    from data_tools.config import run_hydra

    run_hydra("cache_latents", CacheLatentsConfig, _main)
