"""The frozen encoders at their real sizes for the memory planner, built on ``meta`` (no weights read).

Sizes come from the model folder's ``vae/``, ``text_encoder/``, ``image_encoder/`` ``config.json``, else
the published ones (facts file): Wan2.1 VAE (diffusers defaults), umT5-XXL encoder, open-clip
ViT-H/14. They are wrapped in the pipeline's own encoder classes so the planned encode is training's.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from wan_animate.encoders import ImageEncoder, TextEncoder, WanVAE

UMT5_XXL = {"vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
            "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
            "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6, "is_encoder_decoder": False,
            "use_cache": False, "tie_word_embeddings": False}
CLIP_VIT_H14 = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
                "image_size": 224, "patch_size": 14, "hidden_act": "gelu", "layer_norm_eps": 1e-5}
PUBLISHED = {"vae": "Wan2.1 VAE (diffusers AutoencoderKLWan defaults)",  # where sizes come from without a folder
             "text_encoder": "umT5-XXL encoder (published sizes)",
             "image_encoder": "CLIP ViT-H/14 vision tower (published sizes)"}


def _folder_config(path: str | None, sub: str) -> dict | None:
    if not path:
        return None
    f = Path(path) / sub / "config.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _configs(model_path: str | None) -> tuple[dict[str, dict | None], dict[str, str]]:
    """({name: the folder's config or None}, {name: where the sizes come from})."""
    found = {name: _folder_config(model_path, name) for name in PUBLISHED}
    return found, {name: f"{model_path}/{name}/config.json" if c else PUBLISHED[name] for name, c in found.items()}


def text_width(model_path: str | None) -> tuple[int, str]:
    """(width of umT5's embeddings, where its sizes come from), read without building any encoder."""
    from transformers import UMT5Config

    found, sources = _configs(model_path)
    return UMT5Config(**(found["text_encoder"] or UMT5_XXL)).d_model, sources["text_encoder"]


def build_meta_encoders(model_path: str | None) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """``({"vae", "text_encoder", "image_encoder"} modules on meta, {name: where the sizes came from})``."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    found, sources = _configs(model_path)
    vae_keys = set(inspect.signature(AutoencoderKLWan.__init__).parameters)
    clip_cfg = {k: v for k, v in (found["image_encoder"] or CLIP_VIT_H14).items()
                if k not in ("architectures", "model_type", "transformers_version")}
    with torch.device("meta"):
        vae = AutoencoderKLWan(**{k: v for k, v in (found["vae"] or {}).items() if k in vae_keys})
        t5 = UMT5EncoderModel(UMT5Config(**(found["text_encoder"] or UMT5_XXL)))
        clip = CLIPVisionModel(CLIPVisionConfig(**clip_cfg))
    return {"vae": vae, "text_encoder": t5, "image_encoder": clip}, sources


class _StubTokenizer:
    """Stands in for the umT5 tokenizer (no files read): every prompt fills ``max_length`` tokens,
    the worst case for the encoder's activations."""

    def __call__(self, prompts, max_length: int, **_):
        n = len(prompts)
        return SimpleNamespace(input_ids=torch.ones(n, max_length, dtype=torch.long),
                               attention_mask=torch.ones(n, max_length, dtype=torch.long))


def wrap_encoders(modules: dict[str, torch.nn.Module], *, text_len: int, encoder_dtype: torch.dtype,
                  vae_dtype: torch.dtype, offload: bool):
    """The pipeline's encoder wrappers around materialised (fake) modules, as the trainer sets them up."""
    dtypes = {"vae": vae_dtype, "text_encoder": encoder_dtype, "image_encoder": encoder_dtype}
    for name, m in modules.items():
        # Module.to() swaps fake parameters, which fails once the fake mode has seen them; cast
        # through .data instead and make the wrappers' own (same device, same dtype) .to() a no-op.
        with torch.no_grad():
            for p in [*m.parameters(), *m.buffers()]:
                if p.is_floating_point() and p.dtype != dtypes[name]:
                    p.data = p.data.to(dtypes[name])
        m.to = lambda *a, _m=m, **k: _m
    try:
        vae = WanVAE(modules["vae"], dtype=vae_dtype, device="cpu", offload=offload)
        text = TextEncoder(modules["text_encoder"], _StubTokenizer(), text_len=text_len, dtype=encoder_dtype,
                           device="cpu", offload=offload)
        image = ImageEncoder(modules["image_encoder"], dtype=encoder_dtype, device="cpu", offload=offload)
    finally:
        for m in modules.values():
            del m.to
    return SimpleNamespace(vae=vae, text_encoder=text, image_encoder=image)
