"""Shard schema (versions 1 and 2) and sample decoding: what the trainer, eval and
``data_tools.inspect`` read (``data_tools.shards`` writes; docs/data.md lists every field).

A raw sample is the tar members sharing a key (``<key>.mp4``, ``.pose.mp4``, ``.face.mp4``,
``.ref.png``, optional ``.bg.mp4`` / ``.mask.mp4``, ``.json``, ``.txt``). Version 2 adds
``<key>.driving.mp4`` (the same motion performed by another appearance, frame for frame: the
Animate-2 family's driving video); a sample is stamped with the lowest version that describes it,
so readers of version 1 still read samples without one. A cached sample
(``data_tools.cache_latents``) is ``<key>.latents.safetensors`` + ``.face.mp4`` + ``.json``, the text
embeddings deduplicated in ``text_embeds.safetensors`` at the dataset root.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np

from wan_animate.video_io import VideoDecodeError, frames_to_tensor, read_video

SCHEMA_VERSIONS = (1, 2)  # every version the readers accept
DRIVING_FIELD = "driving.mp4"  # version 2
SHARD_PATTERN = "shard-{:06d}.tar"
SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
RAW_FIELDS = ("mp4", "pose.mp4", "face.mp4", "ref.png", "json")  # required in a raw sample
TEXT_EMBEDS = "text_embeds.safetensors"
# json fields with a fixed type when present (a mistyped one is a decode error, not a crash later)
_META_TYPES = {"schema_version": int, "num_frames": int, "height": int, "width": int, "face_size": int,
               "fps": (int, float), "caption": str, "replace": bool}


class SampleDecodeError(ValueError):
    """One shard sample is unusable (a stream does not decode, streams disagree, field missing)."""


def sample_schema_version(has_driving: bool) -> int:
    """The version a sample is stamped with: 2 when it carries ``driving.mp4``, else 1 (a v1 reader
    reads it)."""
    return 2 if has_driving else 1


# ---- shards on disk
def list_shards(directory: str | os.PathLike) -> list[Path]:
    """Completed shards (``shard-NNNNNN.tar``) in index order."""
    return sorted(p for p in Path(directory).glob("shard-*.tar") if SHARD_RE.match(p.name))


def shard_index(path: str | os.PathLike) -> int:
    return int(SHARD_RE.match(Path(path).name).group(1))


def read_shard(path: str | os.PathLike) -> list[dict[str, bytes]]:
    """All samples of one tar shard as ``{"__key__": key, field: bytes}`` dicts, in tar order."""
    samples: dict[str, dict] = {}
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            key, _, field = name.partition(".")
            sample = samples.setdefault(key, {"__key__": key})
            sample[field] = tar.extractfile(member).read()
    return list(samples.values())


def shard_keys(path: str | os.PathLike) -> list[str]:
    with tarfile.open(path, "r") as tar:  # in tar order, each key once
        return list(dict.fromkeys(name.rsplit("/", 1)[-1].partition(".")[0] for name in tar.getnames()))


def sample_kind(raw: dict) -> str:
    """``"cached"`` (cache_latents output), ``"raw"`` (schema v1 or v2) or ``"unknown"``, from the fields."""
    if "latents.safetensors" in raw:
        return "cached"
    if "mp4" in raw or "pose.mp4" in raw:
        return "raw"
    return "unknown"


def shard_kind(path: str | os.PathLike) -> str:
    """Kind of the first sample of a shard (member names only, nothing decoded)."""
    with tarfile.open(path, "r") as tar:
        fields = {n.rsplit("/", 1)[-1].partition(".")[2] for n in tar.getnames()[:16]}
    return sample_kind(dict.fromkeys(fields))


# ---- fields
def sample_key(raw: dict) -> str:
    return str(raw.get("__key__", "<no key>"))


def _field(raw: dict, name: str, key: str):
    if name in raw:
        return raw[name]
    kind = sample_kind(raw)
    if kind == "cached" and name in RAW_FIELDS:
        raise SampleDecodeError(f"sample {key!r}: these are cached shards (data_tools.cache_latents output), not "
                                f"raw shards: use data=cached to train on them (eval needs the raw shards "
                                f"they were made from)")
    if kind == "raw" and name == "latents.safetensors":
        raise SampleDecodeError(f"sample {key!r}: these are raw schema-v1 shards, not cached latents: use "
                                f"data=shards, or make cached ones with python -m data_tools.cache_latents")
    raise SampleDecodeError(f"sample {key!r}: missing field {name!r} (has {sorted(k for k in raw if not k.startswith('__'))})")


def _video(raw: dict, name: str, key: str) -> np.ndarray:
    try:
        frames, _ = read_video(_field(raw, name, key))
    except VideoDecodeError as e:
        raise SampleDecodeError(f"sample {key!r}: stream {name!r} does not decode ({e})") from e
    return frames


def _image(raw: dict, name: str, key: str) -> np.ndarray:
    from PIL import Image

    data = _field(raw, name, key)
    try:
        return np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    except Exception as e:
        raise SampleDecodeError(f"sample {key!r}: {name!r} is not a readable image ({e})") from e


def decode_meta(raw: dict) -> dict:
    """The sample's ``json`` as a dict; missing, invalid, non-object or mistyped -> SampleDecodeError."""
    key = sample_key(raw)
    try:
        meta = json.loads(_field(raw, "json", key).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SampleDecodeError(f"sample {key!r}: json field is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise SampleDecodeError(f"sample {key!r}: json field is a {type(meta).__name__}, not an object")
    for name, types in _META_TYPES.items():
        value = meta.get(name)
        bad_bool = isinstance(value, bool) and types is not bool
        if value is not None and (bad_bool or not isinstance(value, types)):
            raise SampleDecodeError(f"sample {key!r}: json {name!r} is {value!r} ({type(value).__name__}), "
                                    f"expected {getattr(types, '__name__', 'a number')}")
    return meta


# ---- raw samples
def decode_sample(raw: dict) -> dict:
    """One raw sample (schema version 1 or 2; bytes per field) -> tensors.

    Returns ``video`` float [3, T, H, W] in [-1, 1], ``pose`` same, ``face`` [3, T, S, S],
    ``ref`` [3, H, W], ``driving`` [3, T, H, W] (version 2), optional ``bg`` [3, T, H, W] and
    ``mask`` [1, T, H, W] in {0, 1} (1 = character), ``meta`` (the json dict), ``caption``, ``key``.
    """
    import torch

    key = sample_key(raw)
    if sample_kind(raw) == "cached":
        _field(raw, "mp4", key)  # raises the "these are cached shards" message
    meta = decode_meta(raw)
    version = meta.get("schema_version")
    if version not in SCHEMA_VERSIONS:
        raise SampleDecodeError(f"sample {key!r}: schema_version {version!r} is not supported (this reader knows "
                                f"{', '.join(map(str, SCHEMA_VERSIONS))}); update wan-animate-train or remake the shards")
    if (version == 2) != (DRIVING_FIELD in raw):
        raise SampleDecodeError(
            f"sample {key!r}: schema_version {version} " + ("needs a driving.mp4 stream, which is missing"
                                                            if version == 2 else "has no driving.mp4 stream, but "
                                                            "the sample carries one") + "; remake the sample")
    video = _video(raw, "mp4", key)
    replace = "bg.mp4" in raw or "mask.mp4" in raw
    # the streams that cover the target clip frame for frame (driving: version 2; bg and mask: replace mode)
    names = ["pose.mp4"] + [DRIVING_FIELD] * (DRIVING_FIELD in raw) + ["bg.mp4", "mask.mp4"] * replace
    streams = {name: _video(raw, name, key) for name in names}
    face, ref = _video(raw, "face.mp4", key), _image(raw, "ref.png", key)
    t, h, w = video.shape[:3]
    for name, other in streams.items():
        if other.shape != video.shape:
            raise SampleDecodeError(f"sample {key!r}: {name} is {other.shape[:3]} but mp4 is {video.shape[:3]} "
                                    f"(T, H, W): every stream must cover the target clip frame for frame")
    if len(face) != t:
        raise SampleDecodeError(f"sample {key!r}: face.mp4 has {len(face)} frames but mp4 has {t}")
    if ref.shape[:2] != (h, w):
        raise SampleDecodeError(f"sample {key!r}: ref.png is {ref.shape[:2]} but frames are {(h, w)}")
    if meta.get("num_frames", t) != t:
        raise SampleDecodeError(f"sample {key!r}: json says {meta['num_frames']} frames, mp4 has {t}")
    if (meta.get("height", h), meta.get("width", w)) != (h, w):  # the trainer buckets by the json size
        raise SampleDecodeError(f"sample {key!r}: json says {meta.get('height')}x{meta.get('width')}, mp4 frames are "
                                f"{h}x{w}; re-run data_tools.prepare for it (data_tools.inspect lists such samples)")
    out = {
        "key": key,
        "video": frames_to_tensor(video),
        "pose": frames_to_tensor(streams["pose.mp4"]),
        "face": frames_to_tensor(face),
        "ref": frames_to_tensor(ref[None])[:, 0],
        "meta": meta,
        "caption": raw["txt"].decode("utf-8") if "txt" in raw else meta.get("caption", ""),
    }
    if DRIVING_FIELD in streams:
        out["driving"] = frames_to_tensor(streams[DRIVING_FIELD])
    if replace:
        out["bg"] = frames_to_tensor(streams["bg.mp4"])
        out["mask"] = torch.from_numpy(streams["mask.mp4"][..., 0] > 127).float()[None]
    return out


# ---- cached latents
def load_text_embeds(path) -> tuple[dict, dict[str, str]]:
    """``text_embeds.safetensors`` -> ({text_key: [L, D] tensor}, {text_key: caption})."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        captions = json.loads((f.metadata() or {}).get("captions", "{}"))
        return {name: f.get_tensor(name) for name in f.keys()}, captions


def decode_cached_sample(raw: dict, text_embeds: dict) -> dict:
    """One cached sample (``latents.safetensors``, ``face.mp4``, ``json``) -> every tensor of
    ``latents.safetensors`` under its own name (docs/data.md), ``face`` float [3, T, S, S] in
    [-1, 1], ``text`` [L, D] (the caption's embedding), ``text_empty`` (the "" embedding, for
    condition dropout, when the file has it), ``text_driving`` (the driving pass's prompt
    embedding, version 2), ``meta``, ``caption``, ``key``."""
    from safetensors.torch import load as load_safetensors

    key = sample_key(raw)
    data = _field(raw, "latents.safetensors", key)  # a raw sample: the "these are raw shards" message
    meta = decode_meta(raw)
    try:
        tensors = load_safetensors(data)
    except Exception as e:
        raise SampleDecodeError(f"sample {key!r}: latents.safetensors does not load ({e})") from e
    face = _video(raw, "face.mp4", key)
    for name in ("target", "pose", "ref", "clip"):
        if name not in tensors:
            raise SampleDecodeError(f"sample {key!r}: latents.safetensors lacks {name!r}")
    for name in ("pose", "driving"):  # driving: a version-2 sample, the driving stream of the Animate-2 family
        if name in tensors and tensors[name].shape != tensors["target"].shape:
            raise SampleDecodeError(f"sample {key!r}: {name} latents {tuple(tensors[name].shape)} differ from target "
                                    f"{tuple(tensors['target'].shape)}")
    if meta.get("num_frames") is not None and len(face) != meta["num_frames"]:
        raise SampleDecodeError(f"sample {key!r}: face.mp4 has {len(face)} frames, json says {meta['num_frames']}")
    if "driving" in tensors:
        if "clip_driving" not in tensors:
            raise SampleDecodeError(f"sample {key!r}: latents.safetensors has driving latents but no 'clip_driving' "
                                    f"(CLIP of driving frame 0); re-run cache_latents")
        if meta.get("driving_text_key") not in text_embeds:
            raise SampleDecodeError(f"sample {key!r}: driving_text_key {meta.get('driving_text_key')!r} (the driving "
                                    f"pass's prompt) not in {TEXT_EMBEDS}; re-run cache_latents")
    text_key = meta.get("text_key")
    if text_key not in text_embeds:
        raise SampleDecodeError(f"sample {key!r}: text_key {text_key!r} not in {TEXT_EMBEDS}")
    out = dict(tensors, key=key, face=frames_to_tensor(face), text=text_embeds[text_key], meta=meta,
               caption=meta.get("caption", ""))
    if "driving" in tensors:
        out["text_driving"] = text_embeds[meta["driving_text_key"]]
    if (empty_key := meta.get("empty_text_key")) in text_embeds:
        out["text_empty"] = text_embeds[empty_key]
    return out
