"""Training examples -> Wan-Animate-2 inputs: the generation stream (reference-image slot + the
target frames, conditioned on the reference latent and, for long-video training, the previous
segment's tail frames) and the driving stream (the driving video's latents, the driving prompt,
CLIP of driving frame 0).

    batch = build_inputs(examples, encoders, device, dtype, clip_len)
    v = predict(model, noisy, timesteps, batch)          # the joint pass: both streams per block

Raw examples (``train.data.preprocess_raw`` with the family's ``driving`` stream) carry pixels and
are encoded here with the frozen encoders; cached ones (``data_tools.cache_latents`` of schema-v2
shards) carry every latent and embedding and need no encoder. The generation condition is the
shared builder's (``wan_animate.conditioning``): Animate-2's is the same [mask | latent] layout
(slot 0: ones + reference latent; then ones on the given pixel frames + the latent of [given
frames, zeros]). The driving condition is ``wan_animate.animate2.model.driving_condition`` (ones
mask + driving latents), built by the model.

Long-video training: ``num_given`` (``data.temporal_ref_prob`` / ``data.refert_nums``) gives the
first frames of the clip as the previous segment's tail, as the sampler does from the second
segment on (the official overlap is 1 frame).
"""

from __future__ import annotations

from typing import Any

import torch

from wan_animate import conditioning
from wan_animate.animate2.config import REFERENCE_PROMPT

BATCH_KEYS = ("latents", "context", "clip_fea", "y", "driving", "context_ref", "clip_ref")


def _check_mode(examples: list[dict]) -> None:
    for e in examples:
        if e.get("mode", "animate") != "animate":
            raise ValueError(f"sample {e.get('key')!r}: Wan-Animate-2 has no replace mode; set data.replace_prob=0 "
                             f"(its bg/mask streams are ignored).")


@torch.no_grad()
def build_inputs(examples: list[dict], encoders: Any, device: torch.device, dtype: torch.dtype,
                 clip_len: int) -> dict[str, Any]:
    """One micro-batch (same bucket) -> ``{latents [B,16,T+1,h,w], y [B,20,T+1,h,w], context,
    clip_fea (reference image), driving [B,16,T,h,w], context_ref (the driving prompt), clip_ref
    (driving frame 0), noise_seeds, keys}`` on ``device``. ``encoders`` (``vae`` /
    ``text_encoder`` / ``image_encoder``) may be ``None`` for cached examples."""
    _check_mode(examples)
    if examples[0].get("cached"):
        return _build_cached(examples, device, dtype)
    missing = [e.get("key") for e in examples if "driving" not in e]
    if missing:
        raise ValueError(f"samples {missing} have no driving video: Wan-Animate-2 trains on schema-v2 shards "
                         f"(driving.mp4; data_tools.prepare driving=appearance, or data_tools.synthetic driving=true).")
    vae = encoders.vae
    video = torch.stack([e["video"] for e in examples]).to(device)  # [B, 3, F, H, W]
    driving = torch.stack([e["driving"] for e in examples]).to(device)  # [B, 3, F, H, W]
    ref = torch.stack([e["ref"] for e in examples]).to(device)  # [B, 3, H, W]
    target = vae.encode(video)  # [B, 16, T, h, w]
    ref_latent = vae.encode(ref.unsqueeze(2))  # [B, 16, 1, h, w]
    driving_latents = vae.encode(driving)  # [B, 16, T, h, w]
    y = conditioning.encode_conditions(vae, ref_latent, [
        dict(mode="animate", prev_frames=video[i: i + 1, :, :e["num_given"]] if e["num_given"] else None)
        for i, e in enumerate(examples)], clip_len=clip_len, height=ref.shape[-2], width=ref.shape[-1])
    b = len(examples)
    batch = {
        "latents": torch.cat([ref_latent, target], dim=2).to(dtype),  # slot 0: the reference image
        "y": y.to(dtype),
        "context": encoders.text_encoder.encode([e["caption"] for e in examples]).to(device, dtype),
        "clip_fea": encoders.image_encoder.encode(ref).to(device, dtype),
        "driving": driving_latents.to(dtype),
        "context_ref": encoders.text_encoder.encode([REFERENCE_PROMPT] * b).to(device, dtype),
        "clip_ref": encoders.image_encoder.encode(driving[:, :, 0]).to(device, dtype),
    }
    _add_common(batch, examples)
    return batch


def _build_cached(examples: list[dict], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    for e in examples:
        lacking = [k for k in ("driving_latents", "clip_driving", "text_driving") if k not in e]
        if lacking:
            raise ValueError(f"cached sample {e.get('key')!r} lacks {lacking}: cache schema-v2 shards (with "
                             f"driving.mp4) with data_tools.cache_latents.")
    ys, refs = [], []
    for e in examples:
        r = e["ref_latent"]
        r = (r if r.ndim == 4 else r.unsqueeze(1)).unsqueeze(0).to(device)  # [1, 16, 1, h, w]
        refs.append(r)
        ys.append(conditioning.build_condition(r, e["temporal_latent"].unsqueeze(0).to(device),
                                               num_given=e["num_given"], mode="animate"))

    def stack(name):
        return torch.stack([e[name] for e in examples]).to(device, dtype)

    batch = {
        "latents": torch.cat([torch.cat(refs), stack("latents_target")], dim=2).to(dtype),
        "y": torch.cat(ys).to(dtype),
        "context": stack("context"),
        "clip_fea": stack("clip_fea"),
        "driving": stack("driving_latents"),
        "context_ref": stack("text_driving"),
        "clip_ref": stack("clip_driving"),
    }
    _add_common(batch, examples)
    return batch


def _add_common(batch: dict, examples: list[dict]) -> None:
    batch["noise_seeds"] = [int(e["noise_seed"]) for e in examples]
    batch["keys"] = [e["key"] for e in examples]


def predict(model, noisy: torch.Tensor, timesteps: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """The velocity of the generation stream for ``noisy`` latents (shape of ``batch["latents"]``):
    the joint pass, both streams through every block (gradients reach the driving stream through
    its keys and values)."""
    dtype = batch["y"].dtype  # the conditioning is already in the model's input dtype
    return model(noisy.to(dtype), timesteps, batch["context"], batch["clip_fea"], batch["y"], batch["driving"],
                 batch["context_ref"], batch["clip_ref"])
