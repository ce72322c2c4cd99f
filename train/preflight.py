"""What a run will do, said and checked before any model loads: the first shard's metadata
(``json`` members only, no video decoded) against ``data.clip_len``, and the ``[train]`` header
(resolution, latent shape, tokens per sample, data set size, effective batch) with its warnings."""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from train.config import Config, ConfigError
from wan_animate.family import family_of, get_family
from wan_animate.geometry import nearest_bucket
from wan_animate.samples import shard_keys

_COUNT_LIMIT = 64  # count samples by listing at most this many local shards (headers only)
# said before the model loads and at each validation the run would have made (train.validation.validate)
ZERO3_VALIDATION = "validation skipped under ZeRO-3 (parameters are partitioned); run eval.generate on the export"


@dataclass
class DataFacts:
    """What the shards say about themselves (None: unknown, e.g. remote shards)."""

    shards: int
    kind: str = "unknown"  # raw | cached | unknown
    samples: int | None = None
    first_shard: str = ""
    sizes: list[tuple[int, int]] = field(default_factory=list)  # distinct (H, W) of the first shard's samples
    num_frames: int | None = None  # frames of the first sample's stored clip
    latent_frames: int | None = None  # cached: latent frames of the stored clip (without the reference)


def _first_shard_metas(url: str, limit: int = 256) -> list[dict]:
    """The ``json`` of the first shard's samples (up to ``limit``); [] when it cannot be read here."""
    if not Path(url).is_file():  # remote or piped shards: not read here
        return []
    metas = []
    try:
        with tarfile.open(url, "r") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    try:
                        meta = json.loads(tar.extractfile(member).read())
                    except ValueError:
                        continue  # a bad sample is the data loader's to skip and count
                    if isinstance(meta, dict):
                        metas.append(meta)
                    if len(metas) >= limit:
                        break
    except (OSError, tarfile.TarError):
        return []
    return metas


def _count_samples(urls: list[str]) -> int | None:
    """Samples in the shards: from a ``manifest.json`` next to them, else by listing local shards."""
    folder = Path(urls[0]).parent
    manifest = folder / "manifest.json"
    if manifest.is_file() and all(Path(u).parent == folder for u in urls):
        try:
            counts = json.loads(manifest.read_text()).get("counts", {})
        except (ValueError, AttributeError):
            counts = {}
        n = counts.get("clips_written", counts.get("samples"))
        if isinstance(n, int):
            return n
    if len(urls) > _COUNT_LIMIT or not all(Path(u).is_file() for u in urls):
        return None
    try:
        return sum(len(shard_keys(u)) for u in urls)
    except (OSError, tarfile.TarError):
        return None


def read_data_facts(urls: list[str]) -> DataFacts:
    facts = DataFacts(shards=len(urls), first_shard=urls[0] if urls else "")
    metas = _first_shard_metas(urls[0]) if urls else []
    if not metas:
        return facts
    first = metas[0]
    lat = first.get("latent_shape")
    if lat:  # cached: [C, T_lat, h, w] of the target clip
        facts.kind = "cached"
        facts.latent_frames = int(lat[-3])
        facts.num_frames = 4 * (facts.latent_frames - 1) + 1
        facts.sizes = sorted({(8 * int(m["latent_shape"][-2]), 8 * int(m["latent_shape"][-1]))
                              for m in metas if m.get("latent_shape")})
    else:
        facts.kind = "raw"
        facts.num_frames = first.get("num_frames")
        facts.sizes = sorted({(int(m["height"]), int(m["width"])) for m in metas
                              if isinstance(m.get("height"), int) and isinstance(m.get("width"), int)})
    facts.samples = _count_samples(urls)
    return facts


def check_data(cfg: Config, facts: DataFacts) -> None:
    """``data.clip_len`` against the first shard (raw: at most its frames; cached: exactly the cached length)."""
    n, want = facts.num_frames, cfg.data.clip_len
    if n is None:
        return
    where = f"{facts.first_shard} holds {n}-frame clips"
    if facts.kind == "cached" and want != n:
        raise ConfigError(f"data.clip_len={want} but the cached shards were encoded at {n} frames ({where}); "
                          f"set data.clip_len={n} (cached latents cover the clips prepare wrote; for {want}-frame clips prepare "
                          f"and cache them again).")
    if facts.kind == "raw" and want > n:
        fix = f"set data.clip_len={4 * ((n - 1) // 4) + 1}" if n >= 5 else "prepare clips of >= 5 frames"
        raise ConfigError(f"data.clip_len={want} is longer than the data ({where}); {fix} "
                          f"(or prepare longer clips).")


def training_sizes(cfg: Config, facts: DataFacts) -> list[tuple[int, int]]:
    """The (H, W) the samples of the first shard will train at."""
    d = cfg.data
    if facts.kind == "cached":
        return list(facts.sizes)
    if d.buckets:  # the stream buckets every raw sample, synthetic ones too (train.data.ShardStream)
        stored = facts.sizes or ([(d.synthetic_height, d.synthetic_width)] if d.source == "synthetic" else [])
        return sorted({nearest_bucket(h, w, d.buckets) for h, w in stored}) or [tuple(b) for b in d.buckets]
    if d.source == "synthetic":
        return [(d.synthetic_height, d.synthetic_width)]
    return list(facts.sizes)


def upscale_warnings(cfg: Config, facts: DataFacts) -> list[str]:
    """One line per stored size that a bucket enlarges (resize-to-cover then centre crop)."""
    d = cfg.data
    if facts.kind != "raw" or not d.buckets or d.source == "synthetic":
        return []
    out = []
    for h, w in facts.sizes:
        bh, bw = nearest_bucket(h, w, d.buckets)
        scale = max(bh / h, bw / w)
        if scale <= 1.0 + 1e-6:
            continue
        out.append(f"data.buckets upscales the data: {h}x{w} clips are enlarged {scale:.2f}x to the {bh}x{bw} "
                   f"bucket ({bh * bw / (h * w):.1f}x the pixels and tokens per frame, no added detail); "
                   f"to train at the data's size set data.buckets=[[{16 * (h // 16)},{16 * (w // 16)}]]")
    return out


def model_facts(model_path: Path, family: str | None = None) -> tuple[object | None, str | None]:
    """(model config, layout) of the model folder from its config / headers only (no weights read),
    through its family (``model.family``; None: recognised from the tensor names); (None, None) when
    they cannot be read here (loading reports a bad folder properly later)."""
    try:
        fam = get_family(family) if family else family_of(model_path)
        config = fam.config(folder=fam.dit_path(model_path))[0]
        return config, fam.pipeline_class.detect_layout(model_path)
    except Exception:
        return None, None


def latent_geometry(clip_len: int, size: tuple[int, int], dit_config) -> tuple[tuple[int, int, int, int], int]:
    """((C, T+1, h, w) of one sample's latents with the reference slot, DiT tokens per sample)."""
    t = (clip_len - 1) // 4 + 1 + 1  # target latent frames + the reference slot
    h, w = size[0] // 8, size[1] // 8
    pt, ph, pw = dit_config.patch_size
    return (16, t, h, w), (t // pt) * (h // ph) * (w // pw)


def run_header(cfg: Config, facts: DataFacts, world: int, dit_config, data_parallel: int | None = None) -> list[str]:
    """The lines printed before the model loads (without the ``[train]`` prefix)."""
    t, d = cfg.train, cfg.data
    dp = data_parallel or world
    clip_len = facts.num_frames if facts.kind == "cached" and facts.num_frames else d.clip_len
    sizes = training_sizes(cfg, facts)
    size_text = ", ".join(f"{h}x{w}" for h, w in sizes) or "each sample's own size"
    stored = ", ".join(f"{h}x{w}" for h, w in facts.sizes)
    lines = [f"data: source={d.source} shards={facts.shards} samples={facts.samples if facts.samples is not None else 'unknown'}"
             + (f" stored at {stored}" if stored else "") + (f", {facts.num_frames} frames" if facts.num_frames else "")]
    geo = ""
    if sizes and dit_config is not None:
        shape, tokens = latent_geometry(clip_len, sizes[0], dit_config)
        geo = f" latent={list(shape)} tokens/sample={tokens:,}"
    lines.append(f"resolution: {size_text} clip_len={clip_len}{geo}")
    batch = t.micro_batch_size * t.grad_accum * dp
    lines.append(f"batch: {t.micro_batch_size} micro x {t.grad_accum} accum x {dp} data-parallel = {batch} "
                 f"samples/step; {t.max_steps} steps")
    return lines


def schedule_notes(cfg: Config) -> list[str]:
    """What a short run does with a longer cadence or warm-up (a preset's values meeting the user's
    ``train.max_steps``): said, never refused. ``("note" | "WARNING", text)`` lines."""
    t, o = cfg.train, cfg.optim
    notes = []
    if t.checkpoint_every > t.max_steps:
        notes.append(f"note: train.checkpoint_every={t.checkpoint_every} > train.max_steps={t.max_steps}: "
                     "one checkpoint, at the end")
    if t.validation and t.validate_every > t.max_steps:
        notes.append(f"note: train.validate_every={t.validate_every} > train.max_steps={t.max_steps}: "
                     "validation at the end only")
    if o.warmup_steps >= t.max_steps:
        notes.append(f"WARNING: optim.warmup_steps={o.warmup_steps} >= train.max_steps={t.max_steps}: the run ends "
                     f"before the learning rate reaches optim.lr={o.lr:g}; lower optim.warmup_steps")
    return notes


def announce(cfg: Config, acc, model_path: Path, urls: list[str], stage: int) -> tuple[object | None, str | None]:
    """Every rank: check the data against the config (``ConfigError``); rank 0: print the header,
    the warnings and why validation will not run. Returns (DiT config, layout) of the model folder."""
    facts = read_data_facts(urls)
    check_data(cfg, facts)
    dit_config, layout = model_facts(model_path, cfg.model.family)
    if acc.is_main_process:
        dp = max(1, acc.num_processes // cfg.train.sequence_parallel)
        for line in run_header(cfg, facts, acc.num_processes, dit_config, data_parallel=dp):
            print(f"[train] {line}", flush=True)
        if cfg.data.buckets and facts.kind == "cached":
            print("[train] note: data.buckets is ignored for cached shards (latents are stored at their size)",
                  flush=True)
        for line in upscale_warnings(cfg, facts):
            print(f"[train] WARNING: {line}", flush=True)
        for line in schedule_notes(cfg):
            print(f"[train] {line}", flush=True)
        if not cfg.train.validation:
            print("[train] validation off (train.validation=false)", flush=True)
        elif stage == 3:
            print(f"[train] {ZERO3_VALIDATION}", flush=True)
        print(f"[train] loading {model_path} ...", flush=True)
    return dit_config, layout
