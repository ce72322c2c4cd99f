"""Training examples -> DiT inputs, with the frozen encoders (no gradients) and the one shared
conditioning builder (``wan_animate.conditioning``).

Raw examples carry pixels and are encoded here on the fly; cached examples carry latents and
embeddings and skip every encoder. Both end as the batch ``wan_animate.objective.flow_matching_loss`` takes.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

from wan_animate import conditioning
from wan_animate.objective import sample_timesteps


@torch.no_grad()
def build_dit_inputs(examples: list[dict], encoders: Any, device: torch.device, dtype: torch.dtype,
                     clip_len: int) -> dict[str, torch.Tensor]:
    """``examples`` (one micro-batch, same bucket) -> ``{latents, context, clip_fea, y,
    pose_latents, face_pixel_values[, face_region], noise_seeds}`` on ``device``.

    ``encoders`` has ``vae`` / ``text_encoder`` / ``image_encoder`` (``AnimatePipeline`` or any
    object with those attributes); it may be ``None`` for cached examples.
    """
    if examples[0].get("cached"):
        return _build_cached(examples, device, dtype)
    vae = encoders.vae
    video = torch.stack([e["video"] for e in examples]).to(device)  # [B, 3, F, H, W]
    pose = torch.stack([e["pose"] for e in examples]).to(device)
    ref = torch.stack([e["ref"] for e in examples]).to(device)  # [B, 3, H, W]
    face = torch.stack([e["face"] for e in examples]).to(device)  # [B, 3, F, S, S]

    target_latents = vae.encode(video)  # [B, 16, T, h, w]
    ref_latent = vae.encode(ref.unsqueeze(2))  # [B, 16, 1, h, w]
    pose_latents = vae.encode(pose)
    y = conditioning.encode_conditions(vae, ref_latent, [
        dict(mode=e["mode"], prev_frames=video[i: i + 1, :, :e["num_given"]] if e["num_given"] else None,
             bg_video=e["bg"].unsqueeze(0).to(device) if e["mode"] == "replace" else None,
             character_mask=e["mask"].unsqueeze(0).to(device) if e["mode"] == "replace" else None)
        for i, e in enumerate(examples)], clip_len=clip_len, height=ref.shape[-2], width=ref.shape[-1])
    context = encoders.text_encoder.encode([e["caption"] for e in examples]).to(device)
    clip_fea = encoders.image_encoder.encode(ref).to(device)
    latents = torch.cat([ref_latent, target_latents], dim=2)  # [B, 16, T+1, h, w]
    return _finish(examples, device, dtype, latents=latents, context=context, clip_fea=clip_fea, y=y,
                   pose_latents=pose_latents, face_pixel_values=face)


def _build_cached(examples: list[dict], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    ys, refs = [], []
    for e in examples:
        ref = e["ref_latent"]
        refs.append(ref if ref.ndim == 4 else ref.unsqueeze(1))  # [16, 1, h, w]
        ys.append(conditioning.build_condition(
            refs[-1].unsqueeze(0).to(device), e["temporal_latent"].unsqueeze(0).to(device),
            num_given=e["num_given"], mode=e["mode"],
            character_mask=e["char_mask"].unsqueeze(0).to(device) if e["mode"] == "replace" else None,
        ))

    def stack(key: str) -> torch.Tensor:
        return torch.stack([e[key] for e in examples])

    latents = torch.cat([torch.stack(refs), stack("latents_target")], dim=2)
    return _finish(examples, device, dtype, latents=latents, context=stack("context"), clip_fea=stack("clip_fea"),
                   y=torch.cat(ys), pose_latents=stack("pose_latents"), face_pixel_values=stack("face"))


def _finish(examples: list[dict], device: torch.device, dtype: torch.dtype, **tensors: torch.Tensor) -> dict:
    """The DiT inputs on ``device`` in ``dtype``, plus the face regions, noise seeds and keys."""
    batch = {name: t.to(device, dtype) for name, t in tensors.items()}
    if all("face_region" in e for e in examples):
        batch["face_region"] = torch.stack([e["face_region"] for e in examples]).to(device)
    batch["noise_seeds"] = [int(e["noise_seed"]) for e in examples]
    batch["keys"] = [e["key"] for e in examples]
    return batch


def fixed_draw(batch: dict, loss_cfg, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One timestep + noise per sample from its key (``train.fixed_noise_per_sample``)."""
    ts, noises = [], []
    shape = batch["latents"].shape[1:]
    for key in batch["keys"]:
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        ts.append(sample_timesteps(1, loss_cfg, generator=g))
        noises.append(torch.randn(shape, generator=g))
    return torch.cat(ts).to(device), torch.stack(noises).to(device)
