"""Frozen encoders around well-kept library classes: Wan VAE, umT5 text encoder, CLIP image encoder.

Every wrapper keeps its module in eval mode with ``requires_grad=False``, runs it under
``torch.no_grad`` in a configurable dtype/device, and can park it on the CPU between uses
(``offload=True``) so a 14B DiT and the encoders fit on one GPU.
"""

from __future__ import annotations

import contextlib
import html
import json
import re
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class _FrozenEncoder:
    """Shared device/dtype/offload handling."""

    module: nn.Module

    def __init__(self, module: nn.Module, *, dtype: torch.dtype, device: torch.device | str, offload: bool):
        self.dtype = dtype
        self.device = torch.device(device)
        self.offload = offload
        module = module.eval().requires_grad_(False)
        if any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
            module = module.to(dtype=dtype)
        self.module = module.to("cpu" if offload else self.device)

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[nn.Module]:
        """The module on ``self.device`` for one use; parked (``offload``), device copies of its
        weights are swapped in and dropped afterwards (frozen: nothing to copy back)."""
        parked = self._copy_in() if self.offload else []
        try:
            with torch.no_grad():
                yield self.module
        finally:
            for store, name, host in parked:
                store[name] = host

    def _copy_in(self) -> list:
        """Put device copies in place of every parameter / buffer (a shared one copied once);
        returns (dict, name, host tensor) to put back."""
        tensors = [*self.module.parameters(), *self.module.buffers()]
        if all(t.device == self.device for t in tensors):
            return []
        stores = [s for module in self.module.modules() for s in (module._parameters, module._buffers)]
        parked = [(store, name, host) for store in stores for name, host in store.items() if host is not None]
        copies = {}
        with torch.no_grad():
            for store, name, host in parked:
                if id(host) not in copies:
                    dev = host.detach().to(self.device)
                    copies[id(host)] = nn.Parameter(dev, requires_grad=False) if isinstance(host, nn.Parameter) else dev
            for store, name, host in parked:
                store[name] = copies[id(host)]
        return parked


# ---- VAE


class WanVAE(_FrozenEncoder):
    """diffusers ``AutoencoderKLWan`` with per-channel latent normalisation.

    ``encode(video [B, 3, T, H, W] in [-1, 1]) -> (mu - mean) / std  [B, 16, (T-1)//4+1, H/8, W/8]``
    (the posterior mean, as the official sampler uses), ``decode`` inverts both steps and clamps
    to [-1, 1]. ``tiling`` / ``slicing`` turn on diffusers' memory savers for 720p decodes.
    """

    def __init__(self, vae: nn.Module, *, dtype: torch.dtype = torch.float32, device="cpu",
                 offload: bool = False, tiling: bool = False, slicing: bool = False):
        super().__init__(vae, dtype=dtype, device=device, offload=offload)
        cfg = vae.config
        self.z_dim = int(cfg.z_dim)
        self.spatial_stride = int(cfg.scale_factor_spatial)
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        if self.mean.shape[1] != self.z_dim or self.std.shape[1] != self.z_dim:
            raise ValueError(f"VAE latents_mean/std need {self.z_dim} entries (z_dim).")
        if tiling:
            vae.enable_tiling()
        if slicing:
            vae.enable_slicing()

    @classmethod
    def from_pretrained(cls, path: str | Path, **kw) -> "WanVAE":
        from diffusers import AutoencoderKLWan

        return cls(AutoencoderKLWan.from_pretrained(str(path), torch_dtype=torch.float32), **kw)

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        return (mu.float() - self.mean.to(mu.device)) / self.std.to(mu.device)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z.float() * self.std.to(z.device) + self.mean.to(z.device)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, T, H, W] in [-1, 1], got {tuple(video.shape)}.")
        if video.shape[-1] % self.spatial_stride or video.shape[-2] % self.spatial_stride:
            raise ValueError(f"video size {tuple(video.shape[-2:])} must be a multiple of {self.spatial_stride}.")
        out_device = video.device
        with self._on_device() as vae:
            mu = vae.encode(video.to(self.device, self.dtype)).latent_dist.mode()
        return self.normalize(mu).to(out_device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        out_device = latents.device
        with self._on_device() as vae:
            video = vae.decode(self.denormalize(latents).to(self.device, self.dtype)).sample
        return video.float().clamp(-1, 1).to(out_device)


# ---- Text


def clean_prompt(text: str) -> str:
    """The official umT5 tokenizer wrapper's ``clean="whitespace"``: ``ftfy.fix_text`` (curly
    quotes -> straight, full-width punctuation -> ASCII, mojibake repaired), HTML-unescape twice
    (``&amp;amp;`` -> ``&``), then whitespace runs collapsed to one space and the ends stripped.

    The official wrapper collapses with the ``regex`` package's ``\\s``; after ``ftfy`` (which
    drops the control characters U+001C..U+001F) stdlib ``re`` matches the same code points.
    """
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder(_FrozenEncoder):
    """transformers ``UMT5EncoderModel`` + tokenizer.

    ``encode(prompts) -> [B, text_len, d_model]``: padded/truncated to ``text_len`` tokens, the
    encoder run with the attention mask, and every position past the real tokens set to zero (the
    official model trims each sequence to its length and zero-pads it back to ``text_len``).
    """

    def __init__(self, model: nn.Module, tokenizer, *, text_len: int = 512, dtype=torch.float32,
                 device="cpu", offload: bool = False):
        super().__init__(model, dtype=dtype, device=device, offload=offload)
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.dim = int(model.config.d_model)

    @classmethod
    def from_pretrained(cls, model_path: str | Path, tokenizer_path: str | Path, **kw) -> "TextEncoder":
        from transformers import AutoTokenizer, UMT5EncoderModel

        model = UMT5EncoderModel.from_pretrained(str(model_path), dtype=torch.float32)
        return cls(model, AutoTokenizer.from_pretrained(str(tokenizer_path)), **kw)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        tok = self.tokenizer(
            [clean_prompt(p) for p in prompts], padding="max_length", truncation=True,
            max_length=self.text_len, add_special_tokens=True, return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = tok.input_ids, tok.attention_mask
        with self._on_device() as model:
            hidden = model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        hidden = hidden.float() * mask.to(hidden.device).unsqueeze(-1).float()
        return hidden.cpu()


# ---- Image


class ImageEncoder(_FrozenEncoder):
    """transformers ``CLIPVisionModel``: penultimate-block hidden states of the reference image.

    ``encode(images [B, 3, H, W] in [-1, 1]) -> [B, 1 + (S/p)^2, hidden]`` (257 x 1280 for ViT-H/14).
    Preprocessing as the official model: the caller passes the reference letterboxed to the video
    size; it is resized bicubically (no antialias) straight to ``S x S`` (aspect not kept), mapped to
    [0, 1] and normalised with the CLIP mean/std.
    """

    def __init__(self, model: nn.Module, *, image_size: int | None = None, mean=CLIP_MEAN, std=CLIP_STD,
                 dtype=torch.float32, device="cpu", offload: bool = False):
        super().__init__(model, dtype=dtype, device=device, offload=offload)
        self.image_size = int(image_size or model.config.image_size)
        self.dim = int(model.config.hidden_size)
        self.mean, self.std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (mean, std))

    @classmethod
    def from_pretrained(cls, model_path: str | Path, processor_path: str | Path | None = None,
                        **kw) -> "ImageEncoder":
        from transformers import CLIPVisionModel

        model = CLIPVisionModel.from_pretrained(str(model_path), dtype=torch.float32)
        extra = {}
        if processor_path and (cfg_file := Path(processor_path) / "preprocessor_config.json").exists():
            cfg = json.loads(cfg_file.read_text())
            extra = {"mean": cfg.get("image_mean", CLIP_MEAN), "std": cfg.get("image_std", CLIP_STD)}
            size = cfg.get("crop_size") or cfg.get("size")
            if isinstance(size, dict):
                size = size.get("height") or size.get("shortest_edge")
            if size:
                extra["image_size"] = int(size)
        return cls(model, **extra, **kw)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}.")
        x = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bicubic",
                          align_corners=False)
        x = x * 0.5 + 0.5
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(images)
        with self._on_device() as model:
            out = model(pixel_values=pixels.to(self.device, self.dtype), output_hidden_states=True)
        return out.hidden_states[-2].float().to(images.device)
