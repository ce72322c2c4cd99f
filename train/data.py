"""Training data: webdataset shards -> resolution-bucketed, deterministic, resumable batches.

Design (what makes exact resume and multi-rank splitting work):

* The stream is infinite: epoch ``e`` visits the shard list in an order shuffled by ``(seed, e)``.
  With at least ``world * workers`` shards each (rank, worker) reads its own shards; with fewer
  (small data sets, the quick start) every reader sees all shards and keeps the samples whose
  running index falls to it, so ranks never train on the same sample in one epoch.
* A small seeded shuffle buffer mixes samples; each sample's random choices (clip window,
  condition dropout, temporal reference, replace mode) come from a generator seeded by
  ``(seed, epoch, sample index)``, so they do not depend on the worker count.
* Samples are grouped by resolution bucket from their ``json`` (no video decoding); a bucket
  emits a batch once it holds ``micro_batch_size`` samples. Only emitted batches are decoded, so
  skipping ``n`` batches on resume is cheap. The position saved in checkpoints is the number of
  batches this rank consumed; workers are read round-robin by the DataLoader, so worker ``w``
  skips the batches ``k < n`` with ``k % workers == w``.
* Bad data is skipped, counted (``data/skipped``) and explained (the first reasons printed), never a
  crash that repeats on every rerun: an undecodable sample is dropped from its batch, one with a bad
  ``json`` before bucketing; an unreadable shard counts once. Faults are reported with the next
  batch, so the counts after a resume equal those of an uninterrupted run.

Raw shards give pixels, cached shards latents and embeddings (``wan_animate.samples``); the model
family turns either into DiT inputs. Also here: ``resolve_urls`` (where ``data.urls`` point).
"""

from __future__ import annotations

import glob
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples

from train.config import DataConfig
from train.face_augment import augment_face, draw_face_augment


REMOTE = ("pipe:", "http://", "https://", "gs://", "s3://")  # data.urls streamed as given, never globbed
from wan_animate.geometry import crop_box_map, nearest_bucket, resize_crop_tensor
from wan_animate.samples import TEXT_EMBEDS, decode_cached_sample, decode_meta, decode_sample, load_text_embeds

# ---------------------------------------------------------------------------- face regions


def face_region_map(boxes: list | None, frame_start: int, clip_len: int, src_hw: tuple[int, int],
                    size: tuple[int, int]) -> torch.Tensor | None:
    """Face boxes (pixels, per source frame) -> ``[T_lat, h, w]`` mask on the latent grid of the
    target slots (latent frame 0 = pixel frame 0, latent frame j = pixel frames 4j-3..4j)."""
    if not boxes:
        return None
    scale, top, left = crop_box_map(*src_hw, size)
    th, tw = size
    lh, lw = th // 8, tw // 8
    t_lat = (clip_len - 1) // 4 + 1
    out = torch.zeros(t_lat, lh, lw)
    for j in range(t_lat):
        frames = [0] if j == 0 else range(4 * j - 3, 4 * j + 1)
        for f in frames:
            idx = frame_start + f
            if idx >= len(boxes) or boxes[idx] is None:
                continue
            x1, y1, x2, y2 = [float(v) for v in boxes[idx][:4]]
            x1, x2 = (x1 * scale - left) / 8, (x2 * scale - left) / 8
            y1, y2 = (y1 * scale - top) / 8, (y2 * scale - top) / 8
            c1, c2 = max(0, int(math.floor(x1))), min(lw, int(math.ceil(x2)))
            r1, r2 = max(0, int(math.floor(y1))), min(lh, int(math.ceil(y2)))
            if c2 > c1 and r2 > r1:
                out[j, r1:r2, c1:c2] = 1.0
    return out


# ---------------------------------------------------------------------------- per-sample recipe


@dataclass
class StreamSpec:
    urls: list[str]
    cfg: DataConfig
    micro_batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    face_size: int = 32
    default_size: tuple[int, int] | None = None  # bucket when data.buckets is empty and sizes vary
    # driving streams the model family reads (``ModelFamily.streams``): "face" is cropped to
    # ``face_size`` (augmentation, dropout); every other stream like the target clip
    streams: tuple[str, ...] = ("pose", "face")


def _face_choices(face: torch.Tensor, cfg, rng: np.random.Generator) -> torch.Tensor:
    """Per-clip face augmentation, then face dropout (all -1). Augmentation draws come from a child
    generator, and only when enabled, so runs without it keep their exact random stream."""
    if cfg.face_aug_prob > 0 and rng.random() < cfg.face_aug_prob:
        child = np.random.default_rng(int(rng.integers(0, 2**62)))
        params = draw_face_augment(child, scale=cfg.face_aug_scale, color=cfg.face_aug_color, noise=cfg.face_aug_noise)
        face = augment_face(face, params, noise_seed=int(child.integers(0, 2**62)))
    if rng.random() < cfg.face_dropout:
        face = torch.full_like(face, -1.0)
    return face


def _check_streams(sample: dict, spec: StreamSpec) -> None:
    missing = [s for s in spec.streams if s not in sample]
    if missing:
        fix = (" (driving.mp4: shard schema version 2; data_tools.prepare driving=appearance or data_tools.synthetic "
               "driving=true, then cache_latents again for cached shards)" if "driving" in missing else "")
        raise ValueError(f"sample {sample['key']!r} has no {missing} stream(s), which this model family reads{fix}")


def preprocess_raw(sample: dict, spec: StreamSpec, size: tuple[int, int], rng: np.random.Generator) -> dict:
    """Decoded raw sample -> one training example at bucket ``size`` (all random choices from ``rng``)."""
    cfg = spec.cfg
    video = sample["video"]  # [3, T, H, W]
    total = video.shape[1]
    clip_len = cfg.clip_len
    if total < clip_len:
        raise ValueError(f"sample {sample['key']!r} has {total} frames < data.clip_len={clip_len}")
    start = int(rng.integers(0, total - clip_len + 1))
    sl = slice(start, start + clip_len)
    src_hw = tuple(video.shape[-2:])
    ex: dict[str, Any] = {"key": sample["key"], "video": resize_crop_tensor(video[:, sl], size)}
    _check_streams(sample, spec)
    for stream in spec.streams:
        if stream != "face":
            ex[stream] = resize_crop_tensor(sample[stream][:, sl], size)
    ex["ref"] = resize_crop_tensor(sample["ref"], size)
    replace = "bg" in sample and rng.random() < cfg.replace_prob
    ex["mode"] = "replace" if replace else "animate"
    if replace:
        ex["bg"] = resize_crop_tensor(sample["bg"][:, sl], size)
        ex["mask"] = resize_crop_tensor(sample["mask"][:, sl], size, mode="nearest")
    ex["num_given"] = int(rng.choice(cfg.refert_nums)) if rng.random() < cfg.temporal_ref_prob else 0
    caption = sample.get("caption") or cfg.default_caption
    ex["caption"] = "" if rng.random() < cfg.text_dropout else caption
    return _face_and_noise(ex, sample, spec, rng, sl, src_hw, size)


def preprocess_cached(sample: dict, spec: StreamSpec, rng: np.random.Generator) -> dict:
    """Decoded cached sample -> one training example (latents as cached; no resizing)."""
    cfg = spec.cfg
    ex: dict[str, Any] = {"key": sample["key"], "cached": True, "latents_target": sample["target"],
                          "ref_latent": sample["ref"], "clip_fea": sample["clip"]}
    _check_streams(sample, spec)
    for stream in spec.streams:  # latents of the driving streams (the face crops stay pixels)
        if stream != "face":
            ex[f"{stream}_latents"] = sample[stream]
        # its cached CLIP / prompt embeddings, if any
        ex.update({k: sample[k] for k in (f"clip_{stream}", f"text_{stream}") if k in sample})
    replace = "char_mask" in sample and rng.random() < cfg.replace_prob
    ex["mode"] = "replace" if replace else "animate"
    prefix = "cond_replace_r" if replace else "cond_r"
    options = [n for n in cfg.refert_nums if f"{prefix}{n}" in sample]
    n = int(rng.choice(options)) if options and rng.random() < cfg.temporal_ref_prob else 0
    if f"{prefix}{n}" not in sample:
        raise ValueError(f"cached sample {sample['key']!r} lacks {prefix}{n}; re-run cache_latents.")
    ex["num_given"] = n
    ex["temporal_latent"] = sample[f"{prefix}{n}"]
    if replace:
        ex["char_mask"] = sample["char_mask"]
    drop_text = rng.random() < cfg.text_dropout
    if drop_text and "text_empty" not in sample:
        raise ValueError("data.text_dropout > 0 needs the empty-prompt embedding in text_embeds.safetensors.")
    ex["context"] = sample["text_empty"] if drop_text else sample["text"]
    # cached latents cover the stored clip from its first frame at its own size (8 px per cell)
    clip_frames = 4 * (sample["target"].shape[1] - 1) + 1
    pixel_hw = (8 * sample["target"].shape[-2], 8 * sample["target"].shape[-1])
    return _face_and_noise(ex, sample, spec, rng, slice(0, clip_frames), pixel_hw, pixel_hw)


def _face_and_noise(ex: dict, sample: dict, spec: StreamSpec, rng: np.random.Generator, frames: slice,
                    src_hw: tuple[int, int], size: tuple[int, int]) -> dict:
    """The face crop (resized, augmented, dropped), the face region map and the noise seed."""
    if "face" in spec.streams:
        face = resize_crop_tensor(sample["face"][:, frames], (spec.face_size, spec.face_size))  # no-op at that size
        ex["face"] = _face_choices(face, spec.cfg, rng)
    region = face_region_map(sample["meta"].get("face_boxes"), frames.start, frames.stop - frames.start, src_hw, size)
    if region is not None:
        ex["face_region"] = region
    ex["noise_seed"] = int(rng.integers(0, 2**62))
    return ex


# ---------------------------------------------------------------------------- stream


class ShardStream(torch.utils.data.IterableDataset):
    """Infinite, deterministic stream of lists of training examples (one list = one micro-batch)."""

    def __init__(self, spec: StreamSpec, start_batch: int = 0):
        super().__init__()
        self.spec = spec
        self.start_batch = start_batch
        self.cached = spec.cfg.source == "cached"
        self._text_embeds = None
        self._faults: list[str] = []  # found since the last emitted batch (shard or json faults)
        self.buckets = [tuple(b) for b in spec.cfg.buckets]

    def _shard_fault(self, exn: Exception) -> bool:
        """webdataset's handler for a shard that does not open or read to its end: note it, go on."""
        url = next((a for a in reversed(exn.args) if isinstance(a, str)), "?")
        first = str(exn.args[0]).split(" @ ")[0] if exn.args else ""
        self._faults.append(f"shard {url}: {type(exn).__name__}: {first or 'unreadable'} (empty or truncated tar?)")
        return True

    def bucket_of(self, raw: dict) -> tuple[int, int]:
        meta = decode_meta(raw)  # SampleDecodeError when missing, invalid, not an object or mistyped
        if self.cached:
            lat = meta.get("latent_shape")
            if lat:
                return (int(lat[-2]) * 8, int(lat[-1]) * 8)
            return (int(meta.get("height", 0)), int(meta.get("width", 0)))
        h, w = int(meta["height"]), int(meta["width"])
        if self.buckets:
            return nearest_bucket(h, w, self.buckets)
        return self.spec.default_size or (h, w)

    def example(self, raw: dict, size: tuple[int, int], rng: np.random.Generator) -> dict:
        """One shard sample -> a training example at bucket ``size`` (cached: at its stored size)."""
        if not self.cached:
            return preprocess_raw(decode_sample(raw), self.spec, size, rng)
        if self._text_embeds is None:
            self._text_embeds = cached_text_embeds(self.spec.urls)
        return preprocess_cached(decode_cached_sample(raw, self._text_embeds), self.spec, rng)

    def __iter__(self) -> Iterator[dict]:
        spec = self.spec
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        # The DataLoader interleaves workers round-robin from worker 0, so after ``start_batch``
        # batches the next one belongs to stream ``start_batch % workers``: worker w resumes the
        # stream of that shifted slot and skips the batches that slot already delivered.
        slot = (worker + self.start_batch) % workers
        readers = spec.world_size * workers
        reader = spec.rank * workers + slot
        to_skip = sum(1 for k in range(self.start_batch) if k % workers == slot)
        shard_split = len(spec.urls) >= readers
        epoch = 0
        while True:
            order = np.random.default_rng([spec.seed, epoch, 0xD1CE]).permutation(len(spec.urls))
            urls = [spec.urls[i] for i in order]
            if shard_split:
                urls = urls[reader::readers]
            shuffle_rng = np.random.default_rng([spec.seed, epoch, reader, 0xB0F])
            raws = tarfile_samples(({"url": u} for u in urls), handler=self._shard_fault)
            # index per sample for its seeds: (reader, position) when readers split the shards
            samples = (((reader, i) if shard_split else i, raw) for i, raw in enumerate(raws)
                       if shard_split or i % readers == reader)
            pending: dict[tuple[int, int], list[tuple[int, dict]]] = {}
            seen_any = emitted = False
            for index, raw in _shuffled(samples, spec.cfg.shuffle_buffer, shuffle_rng):
                seen_any = True
                try:
                    size = self.bucket_of(raw)
                except Exception as e:  # unreadable json: skip before bucketing, count with the next batch
                    self._faults.append(f"{raw.get('__key__', '?')}: {e}")
                    continue
                group = pending.setdefault(size, [])
                group.append((index, raw))
                if len(group) < spec.micro_batch_size:
                    continue
                pending[size] = []
                emitted = True
                batch = self._finish(size, group, epoch, to_skip)
                if to_skip:
                    to_skip -= 1
                if batch is not None:
                    yield batch
            if not seen_any:
                raise RuntimeError(
                    f"rank {spec.rank} worker {worker} (slot {slot}) got no sample from {len(urls)} shard(s): the data set "
                    f"has fewer samples than ranks x workers ({readers}) or its shards are unreadable; lower "
                    f"data.num_workers or add data. Faults: {self._faults[:5]}")
            if not emitted:  # a whole pass without one batch would loop forever
                raise RuntimeError(
                    f"rank {spec.rank} worker {worker}: a full pass over {len(urls)} shard(s) gave no batch of "
                    f"train.micro_batch_size={spec.micro_batch_size} samples of one bucket; first faults: "
                    f"{self._faults[:5]}. Fix the data (data_tools.inspect) or lower train.micro_batch_size.")
            # incomplete buckets are carried into the next epoch's order implicitly (dropped here)
            epoch += 1

    def _finish(self, size: tuple[int, int], group: list, epoch: int, to_skip: int) -> dict | None:
        faults, self._faults = self._faults, []
        if to_skip:  # counted before the checkpoint this run resumed from
            return None
        examples, skipped, errors = [], len(faults), list(faults)
        for index, raw in group:
            idx = index if isinstance(index, int) else hash(index) & 0x7FFFFFFF
            rng = np.random.default_rng([self.spec.seed, epoch, idx, 0x5EED])  # the sample's own random choices
            try:
                examples.append({**self.example(raw, size, rng), "index": idx, "epoch": epoch})
            except Exception as e:  # bad sample: drop, count, report
                skipped += 1
                errors.append(f"{raw.get('__key__', '?')}: {e}")
        return {"examples": examples, "skipped": skipped, "errors": errors, "size": size}


def _shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """A seeded shuffle buffer of ``size``: fill it, then emit a random member per new item."""
    buffer: list = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            yield buffer.pop(int(rng.integers(len(buffer))))
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))


def collate_identity(batch):
    return batch


class BatchIterator:
    """Iterator of micro-batches (lists of examples) over the loader: counts consumed batches (the
    resume position), skipped samples (the first reasons printed, and kept in ``reasons`` for
    ``summary.json``), and stops the run when the skipped share exceeds
    ``data.max_skipped_fraction``. ``state_dict()`` is what a checkpoint stores per rank."""

    PRINTED = 5  # reasons printed per rank; the rest are counted only

    def __init__(self, spec: StreamSpec, start_batch: int = 0, skipped: int = 0, seen: int = 0):
        self.spec = spec
        self.position = start_batch
        self.skipped = skipped
        self.seen = seen
        self.recent_errors: list[str] = []
        self.reasons: list[str] = []  # the first 20 of this process
        self._it = iter(torch.utils.data.DataLoader(ShardStream(spec, start_batch), batch_size=None,
                                                    num_workers=spec.cfg.num_workers, collate_fn=collate_identity))

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> list[dict]:
        while True:
            item = next(self._it)
            self.position += 1
            self.skipped += item["skipped"]
            self.seen += item["skipped"] + len(item["examples"])
            self.recent_errors = (self.recent_errors + item["errors"])[-5:]
            for reason in item["errors"]:
                if len(self.reasons) < self.PRINTED:
                    print(f"[train] data (rank {self.spec.rank}): skipped {reason}", flush=True)
                    if len(self.reasons) == self.PRINTED - 1:
                        print("[train] data: further faults are counted in data/skipped and summary.json", flush=True)
                if len(self.reasons) < 20:
                    self.reasons.append(reason)
            if self.seen >= 8 and self.skipped > self.spec.cfg.max_skipped_fraction * self.seen:
                raise RuntimeError(
                    f"{self.skipped} of {self.seen} samples failed to decode (> data.max_skipped_fraction="
                    f"{self.spec.cfg.max_skipped_fraction}); last errors: {self.recent_errors}")
            if item["examples"]:
                return item["examples"]

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "skipped": self.skipped, "seen": self.seen}


# ---------------------------------------------------------------------------- where the data lives
# ``data.urls`` (folders, globs, brace patterns, files, ``pipe:``/remote URLs) resolved to shard
# URLs, and the text-embedding file of a cached data set.


def resolve_urls(urls: list[str]) -> list[str]:
    """Directories -> their ``*.tar`` shards; globs expanded; brace patterns expanded; ``pipe:``,
    ``http(s)://`` and other URLs kept as given. Raises when nothing is found."""
    out: list[str] = []
    for url in urls:
        if url.startswith(REMOTE):
            out.extend(expand_urls(url))
            continue
        for item in expand_urls(url):
            p = Path(item)
            folder = p.is_dir()
            if folder or any(c in item for c in "*?["):  # a folder's shards, a pattern's files
                found = sorted(glob.glob(glob.escape(str(p)) + "/*.tar" if folder else item))
                if not found:
                    raise FileNotFoundError(f"data.urls: folder {p} has no *.tar shards." if folder
                                            else f"data.urls: pattern {item} matches no file.")
                out.extend(found)
            elif p.is_file():
                out.append(str(p))
            else:
                raise FileNotFoundError(f"data.urls: {item} does not exist (give shard files, folders, globs or pipe: URLs).")
    if not out:
        raise FileNotFoundError("data.urls resolved to no shard.")
    return out


def cached_text_embeds(urls: list[str]) -> dict[str, torch.Tensor]:
    """The prompt embeddings of a cached data set: ``text_embeds.safetensors`` next to its shards
    (or one folder up)."""
    for url in urls:
        if url.startswith("pipe:"):
            continue
        folder = Path(url) if Path(url).is_dir() else Path(url).parent
        for cand in (folder / TEXT_EMBEDS, folder.parent / TEXT_EMBEDS):
            if cand.is_file():
                return load_text_embeds(cand)[0]
    raise FileNotFoundError(f"cached data: {TEXT_EMBEDS} not found next to the shards.")
