"""Decoding shard samples (schema v1 raw shards and cached-latent shards) into tensors.

``decode_sample`` is what the trainer's webdataset pipeline, eval and ``inspect`` call on every
raw sample; ``decode_cached_sample`` does the same for ``cache_latents`` output.
"""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image

from wan_animate.video_io import VideoDecodeError, frames_to_tensor, read_video

VIDEO_FIELDS = ("mp4", "pose.mp4", "face.mp4", "bg.mp4", "mask.mp4")


class SampleDecodeError(ValueError):
    """One shard sample is unusable (a stream does not decode, streams disagree, field missing)."""


def _field(raw: dict, name: str, key: str):
    if name in raw:
        return raw[name]
    raise SampleDecodeError(f"sample {key!r}: missing field {name!r} (has {sorted(k for k in raw if not k.startswith('__'))})")


def _to_bytes(value) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if hasattr(value, "read"):
        return value.read()
    raise TypeError(f"expected bytes, got {type(value).__name__}")


def _video(raw: dict, name: str, key: str) -> np.ndarray:
    try:
        frames, _ = read_video(_to_bytes(_field(raw, name, key)))
    except VideoDecodeError as e:
        raise SampleDecodeError(f"sample {key!r}: stream {name!r} does not decode ({e})") from e
    return frames


def _image(raw: dict, name: str, key: str) -> np.ndarray:
    try:
        return np.array(Image.open(io.BytesIO(_to_bytes(_field(raw, name, key)))).convert("RGB"))
    except SampleDecodeError:
        raise
    except Exception as e:
        raise SampleDecodeError(f"sample {key!r}: {name!r} is not a readable image ({e})") from e




def sample_key(raw: dict) -> str:
    return str(raw.get("__key__", "<no key>"))


def decode_meta(raw: dict) -> dict:
    key = sample_key(raw)
    try:
        return json.loads(_to_bytes(_field(raw, "json", key)).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SampleDecodeError(f"sample {key!r}: json field is not valid JSON ({e})") from e


def decode_sample(raw: dict) -> dict:
    """One raw schema-v1 sample (bytes per field) -> tensors.

    Returns ``video`` float [3, T, H, W] in [-1, 1], ``pose`` same, ``face`` [3, T, S, S],
    ``ref`` [3, H, W], optional ``bg`` [3, T, H, W] and ``mask`` [1, T, H, W] in {0, 1}
    (1 = character), ``meta`` (the json dict), ``caption`` (str), ``key``.
    Raises ``SampleDecodeError`` naming the sample key when a stream does not decode or the
    streams' frame counts / sizes disagree.
    """
    key = sample_key(raw)
    meta = decode_meta(raw)
    version = meta.get("schema_version")
    if version != 1:
        raise SampleDecodeError(f"sample {key!r}: schema_version {version!r} is not supported (this reader knows 1)")
    video = _video(raw, "mp4", key)
    pose = _video(raw, "pose.mp4", key)
    face = _video(raw, "face.mp4", key)
    ref = _image(raw, "ref.png", key)
    t, h, w = video.shape[:3]
    if pose.shape != video.shape:
        raise SampleDecodeError(f"sample {key!r}: pose.mp4 is {pose.shape[:3]} but mp4 is {video.shape[:3]} (T, H, W)")
    if len(face) != t:
        raise SampleDecodeError(f"sample {key!r}: face.mp4 has {len(face)} frames but mp4 has {t}")
    if ref.shape[:2] != (h, w):
        raise SampleDecodeError(f"sample {key!r}: ref.png is {ref.shape[:2]} but frames are {(h, w)}")
    if meta.get("num_frames", t) != t:
        raise SampleDecodeError(f"sample {key!r}: json says {meta['num_frames']} frames, mp4 has {t}")
    out = {
        "key": key,
        "video": frames_to_tensor(video),
        "pose": frames_to_tensor(pose),
        "face": frames_to_tensor(face),
        "ref": frames_to_tensor(ref[None])[:, 0],
        "meta": meta,
        "caption": _to_bytes(raw["txt"]).decode("utf-8") if "txt" in raw else meta.get("caption", ""),
    }
    if "bg.mp4" in raw or "mask.mp4" in raw:
        bg = _video(raw, "bg.mp4", key)
        mask = _video(raw, "mask.mp4", key)
        if bg.shape != video.shape or mask.shape != video.shape:
            raise SampleDecodeError(f"sample {key!r}: bg.mp4 {bg.shape[:3]} / mask.mp4 {mask.shape[:3]} "
                                    f"differ from mp4 {video.shape[:3]}")
        out["bg"] = frames_to_tensor(bg)
        out["mask"] = torch.from_numpy(mask[..., 0] > 127).float()[None]
    return out


# =============================================================================================
# cached latents
# =============================================================================================
def load_text_embeds(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``text_embeds.safetensors`` -> ({text_key: [L, D] tensor}, {text_key: caption})."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        captions = json.loads((f.metadata() or {}).get("captions", "{}"))
        for name in f.keys():
            tensors[name] = f.get_tensor(name)
    return tensors, captions


def decode_cached_sample(raw: dict, text_embeds: dict[str, torch.Tensor]) -> dict:
    """One cached sample (``latents.safetensors``, ``face.mp4``, ``json``) -> tensors.

    Returns every tensor of ``latents.safetensors`` under its own name (``target``, ``pose``,
    ``ref``, ``cond_r0`` / ``cond_r1`` / ``cond_r5``, ``clip``, and in replace mode
    ``cond_replace_r*`` and ``char_mask``), ``face`` float [3, T, S, S] in [-1, 1], ``text``
    [L, D] (the caption's embedding), ``text_empty`` (the "" embedding, for condition dropout,
    when the file has it), ``meta``, ``caption``, ``key``.
    """
    from safetensors.torch import load as load_safetensors

    key = sample_key(raw)
    meta = decode_meta(raw)
    try:
        tensors = load_safetensors(_to_bytes(_field(raw, "latents.safetensors", key)))
    except SampleDecodeError:
        raise
    except Exception as e:
        raise SampleDecodeError(f"sample {key!r}: latents.safetensors does not load ({e})") from e
    face = _video(raw, "face.mp4", key)
    for name in ("target", "pose", "ref", "clip"):
        if name not in tensors:
            raise SampleDecodeError(f"sample {key!r}: latents.safetensors lacks {name!r}")
    if tensors["pose"].shape != tensors["target"].shape:
        raise SampleDecodeError(f"sample {key!r}: pose latents {tuple(tensors['pose'].shape)} differ from target "
                                f"{tuple(tensors['target'].shape)}")
    if meta.get("num_frames") is not None and len(face) != meta["num_frames"]:
        raise SampleDecodeError(f"sample {key!r}: face.mp4 has {len(face)} frames, json says {meta['num_frames']}")
    text_key = meta.get("text_key")
    if text_key not in text_embeds:
        raise SampleDecodeError(f"sample {key!r}: text_key {text_key!r} not in text_embeds.safetensors")
    out = dict(tensors)
    out.update(key=key, face=frames_to_tensor(face), text=text_embeds[text_key], meta=meta,
               caption=meta.get("caption", ""))
    empty_key = meta.get("empty_text_key")
    if empty_key in text_embeds:
        out["text_empty"] = text_embeds[empty_key]
    return out
