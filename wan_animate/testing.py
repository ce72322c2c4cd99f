"""Test-only builders: complete tiny random model folders (DiT, VAE, umT5 + offline tokenizer,
CLIP vision) for tests, the training quick start and demos, built in a few seconds on a CPU with no
network (the eval metrics' tiny LPIPS / I3D files: ``tests/_eval_weights.py``).

``make_tiny_model_folder(dst, layout="diffusers")`` writes the ``Wan2.2-Animate-14B-Diffusers``
layout (``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``image_encoder/``, ``image_processor/``, ``scheduler/``), which diffusers' own
``WanAnimatePipeline.from_pretrained`` also loads; ``layout="official"`` writes the
``Wan2.2-Animate-14B`` layout (DiT ``config.json`` + safetensors, ``Wan2.1_VAE.pth``,
``models_t5_umt5-xxl-enc-bf16.pth``, ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``,
``google/umt5-xxl/`` tokenizer).
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Literal

import torch

from wan_animate.config import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT
from wan_animate.encoders import CLIP_MEAN, CLIP_STD
from wan_animate.official_encoders import (
    CLIP_FILE,
    T5_FILE,
    T5_TOKENIZER_DIR,
    VAE_FILE,
    clip_to_official,
    t5_to_official,
    vae_to_official,
)
from wan_animate.family import get_family


TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True])
TINY_CLIP_IMAGE_SIZE, TINY_CLIP_PATCH = 224, 14  # (224 / 14)^2 + 1 = 257 image tokens


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------


def build_tiny_tokenizer():
    """A character-level unigram tokenizer built in code (T5 special ids: pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation
                       + DEFAULT_PROMPT + DEFAULT_NEGATIVE_PROMPT + "，。"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("▁" + c, -2.5) for c in string.ascii_lowercase]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def build_tiny_text_encoder(text_dim: int, vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    heads = 4 if text_dim % 4 == 0 else 1
    cfg = UMT5Config(vocab_size=vocab_size, d_model=text_dim, d_kv=text_dim // heads, d_ff=2 * text_dim,
                     num_layers=2, num_heads=heads, relative_attention_num_buckets=32,
                     feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                     tie_word_embeddings=False)
    return UMT5EncoderModel(cfg)


def build_tiny_image_encoder(image_dim: int, num_layers: int = 2):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    heads = image_dim // 16 if image_dim % 16 == 0 else 1  # matches official_encoders._clip_heads
    cfg = CLIPVisionConfig(hidden_size=image_dim, intermediate_size=2 * image_dim, num_hidden_layers=num_layers,
                           num_attention_heads=heads, image_size=TINY_CLIP_IMAGE_SIZE,
                           patch_size=TINY_CLIP_PATCH, hidden_act="gelu", layer_norm_eps=1e-5)
    return CLIPVisionModel(cfg)


def build_tiny_vae():
    """A real ``AutoencoderKLWan`` (the Wan 2.1 architecture at toy width) whose weights are set, not
    random: an information-keeping pooling encoder and its smoothing inverse (``_pooling_vae``)."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(**TINY_VAE)
    _pooling_vae(vae)
    return vae


# Latent layout of the tiny VAE: channel 3k + c is colour c (RGB) averaged over sub-block k of the
# 8x8-pixel cell (k = 2 * row + column of its 4x4-pixel quarters) and over the latent's frames;
# channel 12 holds the (known) constant that makes the encoder's output norm invertible; 13-15 are 0.
_VAE_CONST = 32.0  # the constant channel's value; >> |features| keeps the output RMS norm near-linear
_VAE_GAMMA = 0.05  # RMS-norm gain before SiLU: keeps SiLU's input within +-0.02, where it is near-linear
_VAE_SCALE = 1.5  # normalised latent = _VAE_SCALE * pooled pixel value in [-1, 1]


@torch.no_grad()
def _pooling_vae(vae) -> None:
    """Set every weight of the tiny ``AutoencoderKLWan`` (``TINY_VAE``): residual branches and
    attention projections are zero (identity blocks), the convolutions of the main path average
    pixels (2x2 per spatial downsample, 2 frames per temporal one) and the last downsample turns the
    four 4x4-pixel quarters of each 8x8 cell into channels (space-to-depth), so a 1-3 pixel limb
    still changes the latent of its cell. The encoder's RMS norm + SiLU head is made invertible by a
    constant channel; its output is folded with the default ``latents_mean/std`` so that the
    *normalised* latents are ``_VAE_SCALE`` x the pooled pixel values. The decoder maps a latent back
    to its cell's mean colour, upsampled with [1, 2, 1] smoothing (a blurred inverse: the pooled
    latent keeps 4x4-pixel quarters, a convolutional decoder cannot place them without position)."""
    enc, dec = vae.encoder, vae.decoder
    for p in vae.parameters():
        p.zero_()
    for name, p in vae.named_parameters():
        if name.endswith("gamma"):
            p.fill_(1.0)
    mean = torch.tensor(vae.config.latents_mean)
    std = torch.tensor(vae.config.latents_std)
    smooth = torch.tensor([1.0, 2.0, 1.0]) / 4
    smooth2d = smooth[:, None] * smooth[None, :]

    def eye_center(conv, pairs, gain=1.0):  # current frame, centre pixel: out[o] += gain * in[i]
        t = conv.weight.shape[2] - 1
        ch, cw = conv.weight.shape[3] // 2, conv.weight.shape[4] // 2
        for o, i in pairs:
            conv.weight[o, i, t, ch, cw] = gain

    i4, i16 = torch.arange(4), torch.arange(16)  # channel indices (diagonals: channel c -> c)

    # ---- encoder: RGB + constant (4 ch) -> 2x2 average -> 4 copies -> 2x2 average -> quarters
    eye_center(enc.conv_in, [(c, c) for c in range(3)])
    enc.conv_in.bias[3] = _VAE_CONST
    blocks = enc.down_blocks
    # downsample2d: ZeroPad(0,1,0,1) + 3x3 stride 2 -> taps (0..1, 0..1) = 2x2 mean
    blocks[1].resample[1].weight[i4, i4, :2, :2] = 0.25
    blocks[2].conv_shortcut.weight[i16, i16 % 4, 0, 0, 0] = 1.0  # residual 8 -> 16: (R, G, B, const) x 4
    blocks[3].resample[1].weight[i16, i16, :2, :2] = 0.25
    blocks[3].time_conv.weight[i16, i16, 1:, 0, 0] = 0.5  # strided causal time conv: taps 1, 2 = the 2 new frames
    # space-to-depth: copy k keeps quarter (k // 2, k % 2) of its 2x2 neighbourhood (RGB channels 4 k + c)
    k, c = i4.repeat_interleave(3), torch.arange(3).repeat(4)
    blocks[5].resample[1].weight[4 * k + c, 4 * k + c, k // 2, k % 2] = 1.0
    blocks[5].resample[1].weight[3, 3, 0, 0] = 1.0  # one constant channel
    blocks[5].time_conv.weight[i16, i16, 1:, 0, 0] = 0.5
    enc.norm_out.gamma.fill_(_VAE_GAMMA)
    # norm_out: y = 4 g x / |x| with |x| ~ _VAE_CONST; SiLU(y) ~ y / 2 -> x ~ SiLU(y) * 2 C / (4 g)
    gain = 2 * _VAE_CONST / (4 * _VAE_GAMMA)
    z = torch.arange(12)  # latent channel 3 k + c <- feature channel 4 k + c (quarter k, colour c)
    enc.conv_out.weight[z, 4 * (z // 3) + z % 3, -1, 1, 1] = std[z] * _VAE_SCALE * gain  # eye_center's tap
    eye_center(enc.conv_out, [(12, 3)], float(std[12] * _VAE_SCALE * gain / _VAE_CONST))
    enc.conv_out.bias[12] = -float(std[12] * _VAE_SCALE * gain / _VAE_CONST) * torch.nn.functional.silu(
        torch.tensor(4 * _VAE_GAMMA)).item()
    enc.conv_out.bias[:16] += mean  # mu = mean + std * latent: the normalised latent is the feature
    vae.quant_conv.weight[:, :, 0, 0, 0] = torch.eye(32)

    # ---- decoder: latent -> cell mean colour + constant, upsampled (x2 nearest, [1,2,1] smoothing)
    vae.post_quant_conv.weight[:, :, 0, 0, 0] = torch.diag(1.0 / std)
    vae.post_quant_conv.bias.copy_(-mean / std)
    eye_center(dec.conv_in, [(c, 3 * k + c) for k in range(4) for c in range(3)], 1.0 / (4 * _VAE_SCALE))
    dec.conv_in.bias[3] = _VAE_CONST
    for up in dec.up_blocks:
        for res in up.resnets:
            if not isinstance(res.conv_shortcut, torch.nn.Identity):
                eye_center(res.conv_shortcut, [(c, c) for c in range(4)])
        if up.upsamplers is not None:
            sampler = up.upsamplers[0]
            if sampler.mode == "upsample3d":  # each latent frame -> two equal frames
                half = sampler.time_conv.weight.shape[1]
                eye_center(sampler.time_conv, [(c, c) for c in range(4)] + [(half + c, c) for c in range(4)])
            sampler.resample[1].weight[i4, i4] = smooth2d
    dec.norm_out.gamma.fill_(_VAE_GAMMA)
    width = dec.norm_out.gamma.shape[0]
    eye_center(dec.conv_out, [(c, c) for c in range(3)], 2 * _VAE_CONST / (width ** 0.5 * _VAE_GAMMA))


def _save_dit(dst: Path, family, cfg, layout: str) -> None:
    """Random tiny DiT of ``family``, written in the requested layout."""
    model = family.build(cfg)
    _randomize_zero_init(model)
    family.save(model, dst, layout=layout)


@torch.no_grad()
def _randomize_zero_init(model: torch.nn.Module) -> None:
    """Zero-initialised output layers would make every tiny output identical; give them small noise
    so tests can tell inputs apart."""
    for p in model.parameters():
        if p.is_floating_point() and p.numel() > 1 and torch.count_nonzero(p) == 0:
            p.normal_(0.0, 0.02)


# ---------------------------------------------------------------------------------------------
# Folder writer
# ---------------------------------------------------------------------------------------------


def make_tiny_model_folder(
    dst: str | Path,
    layout: Literal["diffusers", "official"] = "diffusers",
    seed: int = 0,
    config_preset: str = "tiny",
    family: Literal["animate", "animate2"] = "animate",
) -> Path:
    """Write a complete tiny random model folder of ``family`` (Animate v1 or Animate-2); returns its path.

    Animate-2 folders hold the same encoders; their CLIP is one layer, as wide as the preset's
    ``image_dim`` (``tiny``: 1280, the width diffusers' class fixes; ``tiny_narrow``: 32, official
    layout only)."""
    if layout not in ("diffusers", "official"):
        raise ValueError(f"layout={layout!r} must be 'diffusers' or 'official'.")
    if family not in ("animate", "animate2"):
        raise ValueError(f"family={family!r} must be 'animate' or 'animate2'.")
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty; choose a new folder.")
    dst.mkdir(parents=True, exist_ok=True)
    model_family = get_family(family)
    cfg, _ = model_family.config(config_preset)

    with torch.random.fork_rng(devices=()):  # the caller's CPU generator is left as it was
        torch.manual_seed(seed)
        tokenizer = build_tiny_tokenizer()
        text_encoder = build_tiny_text_encoder(cfg.text_dim, len(tokenizer))
        image_encoder = build_tiny_image_encoder(cfg.image_dim, num_layers=1 if family == "animate2" else 2)
        vae = build_tiny_vae()
        if layout == "diffusers":
            _write_diffusers(dst, model_family, cfg, tokenizer, text_encoder, image_encoder, vae)
        else:
            _write_official(dst, model_family, cfg, tokenizer, text_encoder, image_encoder, vae)
    return dst


def _write_diffusers(dst, family, cfg, tokenizer, text_encoder, image_encoder, vae) -> None:
    import diffusers
    from diffusers import UniPCMultistepScheduler
    from transformers import CLIPImageProcessor

    _save_dit(dst / "transformer", family, cfg, "diffusers")
    vae.save_pretrained(dst / "vae")
    text_encoder.save_pretrained(dst / "text_encoder")
    tokenizer.save_pretrained(dst / "tokenizer")
    image_encoder.save_pretrained(dst / "image_encoder")
    CLIPImageProcessor(
        size={"shortest_edge": TINY_CLIP_IMAGE_SIZE},
        crop_size={"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3,
    ).save_pretrained(dst / "image_processor")
    UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0, num_train_timesteps=1000,
    ).save_pretrained(dst / "scheduler")
    animate2 = family.name == "animate2"
    (dst / "model_index.json").write_text(json.dumps({
        "_class_name": "WanAnimate2ModularPipeline" if animate2 else "WanAnimatePipeline",
        "_diffusers_version": diffusers.__version__,
        "image_encoder": ["transformers", "CLIPVisionModel"],
        "image_processor": ["transformers", "CLIPImageProcessor"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanAnimate2Transformer3DModel" if animate2 else "WanAnimateTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }, indent=2, ensure_ascii=False))


def _write_official(dst, family, cfg, tokenizer, text_encoder, image_encoder, vae) -> None:
    _save_dit(dst, family, cfg, "official")
    torch.save(vae_to_official(vae), dst / VAE_FILE)
    # fp32 despite the file name so both layouts of one seed hold bit-identical weights
    torch.save(t5_to_official(text_encoder), dst / T5_FILE)
    torch.save(clip_to_official(image_encoder), dst / CLIP_FILE)
    tokenizer.save_pretrained(dst / T5_TOKENIZER_DIR)
