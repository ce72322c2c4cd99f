"""Official Wan 2.x encoder checkpoints <-> library classes (key maps; see docs/inference.md).

* ``Wan2.1_VAE.pth``                                  <-> diffusers ``AutoencoderKLWan``
* ``models_t5_umt5-xxl-enc-bf16.pth``                 <-> transformers ``UMT5EncoderModel``
* ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` (vision tower) <-> transformers ``CLIPVisionModel``

Every map is one key function (library name -> official name) used in both directions, so a
converted state dict loads *strictly* (every key present, none left over) or fails naming the
keys. Model sizes are read back from tensor shapes because the official files carry no config.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch

from wan_animate.weights.diagnose import CheckpointError
from wan_animate.weights.load import assign_state, empty_model

VAE_FILE = "Wan2.1_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
T5_TOKENIZER_DIR = "google/umt5-xxl"


class OfficialEncoderError(RuntimeError):
    """An official encoder file does not have the expected keys or shapes."""


def _strict_gather(target_keys, name_of: Callable[[str], str], sd: dict[str, torch.Tensor], what: str):
    """Pick ``sd[name_of(k)]`` for every library key ``k``; fail naming missing and unused keys."""
    sources = {k: name_of(k) for k in target_keys}
    missing = [f"{src} (for {k})" for k, src in sources.items() if src not in sd]
    unused = sorted(set(sd) - set(sources.values()))
    if missing or unused:
        raise OfficialEncoderError(
            f"{what}: {len(missing)} keys missing {missing[:5]}, {len(unused)} unexpected {unused[:5]}."
        )
    return {k: sd[src] for k, src in sources.items()}


def _load_assigned(build, name_of: Callable[[str], str], sd: dict[str, torch.Tensor], what: str):
    """Build the module with its parameters on the meta device (no random init of billions of
    weights), gather its tensors from ``sd`` (``_strict_gather``) and assign them in fp32; fails if
    anything stays unmaterialised."""
    model = empty_model(build)
    picked = _strict_gather(model.state_dict(), name_of, sd, what)
    fp32 = {id(v): v.float() for v in picked.values()}  # one copy per official tensor (umT5's embedding has two names)
    try:
        return assign_state(model, {k: fp32[id(v)] for k, v in picked.items()}, what)
    except CheckpointError as err:
        raise OfficialEncoderError(str(err)) from err


# ---- VAE: official WanVAE (encoder/decoder with flat "downsamples"/"upsamples" lists)

_RESIDUAL = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
             "conv2": "residual.6", "conv_shortcut": "shortcut"}


def _residual_name(rest: str) -> str:
    for lib, off in _RESIDUAL.items():
        if rest == lib or rest.startswith(lib + "."):
            return off + rest[len(lib):]
    raise OfficialEncoderError(f"unknown residual-block parameter {rest!r}")


def vae_key_to_official(key: str, num_res_blocks: int) -> str:
    """diffusers ``AutoencoderKLWan`` key -> official ``Wan2.1_VAE.pth`` key."""
    for lib, off in (("quant_conv.", "conv1."), ("post_quant_conv.", "conv2.")):
        if key.startswith(lib):
            return off + key[len(lib):]
    side, rest = key.split(".", 1)  # encoder | decoder
    for lib, off in (("conv_in.", "conv1."), ("norm_out.", "head.0."), ("conv_out.", "head.2."),
                     ("mid_block.attentions.0.", "middle.1.")):  # middle = [residual, attention, residual]
        if rest.startswith(lib):
            return f"{side}.{off}{rest[len(lib):]}"
    m = re.match(r"mid_block\.resnets\.(\d)\.(.*)", rest)
    if m:
        return f"{side}.middle.{2 * int(m.group(1))}.{_residual_name(m.group(2))}"
    m = re.match(r"down_blocks\.(\d+)\.(.*)", rest)
    if m:  # same flat list on both sides
        idx, p = m.groups()
        if p.startswith(("resample.", "time_conv.")):
            return f"{side}.downsamples.{idx}.{p}"
        return f"{side}.downsamples.{idx}.{_residual_name(p)}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", rest)
    if m:  # official flattens each stage's (num_res_blocks + 1) residuals + 1 resample
        stage, _, res, p = m.groups()
        per_stage = num_res_blocks + 2
        if res is None:
            return f"{side}.upsamples.{int(stage) * per_stage + num_res_blocks + 1}.{p}"
        return f"{side}.upsamples.{int(stage) * per_stage + int(res)}.{_residual_name(p)}"
    raise OfficialEncoderError(f"no official name for VAE key {key!r}")


def vae_config_from_official(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``AutoencoderKLWan`` kwargs read from the official tensor shapes."""
    try:
        base_dim = sd["encoder.conv1.weight"].shape[0]
        z_dim = sd["conv2.weight"].shape[0]
    except KeyError as e:
        raise OfficialEncoderError(f"not a Wan VAE state dict (no {e}).") from e
    idx = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.downsamples.")})
    stages: list[list[int]] = [[]]
    temporal = []
    for i in idx:
        if f"encoder.downsamples.{i}.resample.1.weight" in sd:
            temporal.append(f"encoder.downsamples.{i}.time_conv.weight" in sd)
            stages.append([])
        else:
            stages[-1].append(sd[f"encoder.downsamples.{i}.residual.6.weight"].shape[0])
    num_res_blocks = len(stages[0])
    if any(len(s) != num_res_blocks for s in stages):
        raise OfficialEncoderError(f"uneven residual blocks per VAE stage: {[len(s) for s in stages]}.")
    dim_mult = [s[-1] // base_dim for s in stages]  # output width of each stage
    return {"base_dim": int(base_dim), "z_dim": int(z_dim), "dim_mult": dim_mult,
            "num_res_blocks": num_res_blocks, "attn_scales": [], "temperal_downsample": temporal}


def vae_from_official(sd: dict[str, torch.Tensor]):
    from diffusers import AutoencoderKLWan

    cfg = vae_config_from_official(sd)
    return _load_assigned(lambda: AutoencoderKLWan(**cfg), lambda k: vae_key_to_official(k, cfg["num_res_blocks"]),
                          sd, "Wan2.1 VAE")


def vae_to_official(vae) -> dict[str, torch.Tensor]:
    nrb = vae.config.num_res_blocks
    return {vae_key_to_official(k, nrb): v.detach().clone() for k, v in vae.state_dict().items()}


# ---- umT5 encoder: official T5Encoder (per-block relative position embedding, gated GELU FFN)

_T5_BLOCK = {
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",  # GELU(tanh) branch
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",  # linear branch
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
}


def t5_key_to_official(key: str) -> str:
    if key in ("shared.weight", "encoder.embed_tokens.weight"):
        return "token_embedding.weight"
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    m = re.match(r"encoder\.block\.(\d+)\.(.*)", key)
    if m and m.group(2) in _T5_BLOCK:
        return f"blocks.{m.group(1)}.{_T5_BLOCK[m.group(2)]}"
    raise OfficialEncoderError(f"no official name for umT5 key {key!r}")


def t5_config_from_official(sd: dict[str, torch.Tensor]):
    from transformers import UMT5Config

    try:
        vocab, dim = sd["token_embedding.weight"].shape
        dim_attn = sd["blocks.0.attn.q.weight"].shape[0]
        buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
        d_ff = sd["blocks.0.ffn.fc1.weight"].shape[0]
    except KeyError as e:
        raise OfficialEncoderError(f"not an official umT5 encoder state dict (no {e}).") from e
    layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    return UMT5Config(
        vocab_size=int(vocab), d_model=int(dim), d_kv=int(dim_attn // heads), d_ff=int(d_ff),
        num_layers=layers, num_heads=int(heads), relative_attention_num_buckets=int(buckets),
        relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
        is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False,
    )


def t5_from_official(sd: dict[str, torch.Tensor]):
    from transformers import UMT5EncoderModel

    config = t5_config_from_official(sd)
    # shared.weight and encoder.embed_tokens.weight are the same official tensor: one copy, tied here
    model = _load_assigned(lambda: UMT5EncoderModel(config), t5_key_to_official, sd, "umT5 encoder")
    model.encoder.embed_tokens = model.shared
    return model


def t5_to_official(model) -> dict[str, torch.Tensor]:
    return {t5_key_to_official(k): v.detach().clone() for k, v in model.state_dict().items()}


# ---- CLIP vision tower: official open-clip XLM-RoBERTa ViT-H/14 "visual.*" (fused qkv)


def _clip_heads(dim: int) -> int:
    # open-clip ViT-H/14 uses 80-wide heads (1280 / 16); tiny test towers use 16-wide heads.
    return next((dim // width for width in (80, 64, 16) if dim % width == 0), 1)


def clip_config_from_official(sd: dict[str, torch.Tensor]):
    from transformers import CLIPVisionConfig

    try:
        dim, _, patch, _ = sd["visual.patch_embedding.weight"].shape
        tokens = sd["visual.pos_embedding"].shape[1]
        mlp = sd["visual.transformer.0.mlp.0.weight"].shape[0]
    except KeyError as e:
        raise OfficialEncoderError(f"not an official CLIP state dict (no {e}).") from e
    grid = int(round((tokens - 1) ** 0.5))
    layers = len({k.split(".")[2] for k in sd if k.startswith("visual.transformer.")})
    return CLIPVisionConfig(
        hidden_size=int(dim), intermediate_size=int(mlp), num_hidden_layers=layers,
        num_attention_heads=_clip_heads(int(dim)), image_size=grid * int(patch), patch_size=int(patch),
        hidden_act="gelu", layer_norm_eps=1e-5,
    )


_CLIP_LAYER = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj",
               "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2"}


def clip_key_to_official(key: str) -> tuple[str, int | None]:
    """CLIPVisionModel key -> (official key, q/k/v slice index of a fused ``to_qkv`` or None)."""
    k = key.removeprefix("vision_model.")
    fixed = {"embeddings.class_embedding": "visual.cls_embedding",
             "embeddings.patch_embedding.weight": "visual.patch_embedding.weight",
             "embeddings.position_embedding.weight": "visual.pos_embedding"}
    if k in fixed:
        return fixed[k], None
    m = re.match(r"(pre_layrnorm|post_layernorm)\.(weight|bias)", k)
    if m:
        return f"visual.{'pre_norm' if m.group(1) == 'pre_layrnorm' else 'post_norm'}.{m.group(2)}", None
    m = re.match(r"encoder\.layers\.(\d+)\.(.*)\.(weight|bias)", k)
    if m:
        i, mod, p = m.groups()
        qkv = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
        if mod in qkv:
            return f"visual.transformer.{i}.attn.to_qkv.{p}", qkv[mod]
        if mod in _CLIP_LAYER:
            return f"visual.transformer.{i}.{_CLIP_LAYER[mod]}.{p}", None
    raise OfficialEncoderError(f"no official name for CLIP key {key!r}")


def clip_from_official(sd: dict[str, torch.Tensor]):
    from transformers import CLIPVisionModel

    model = CLIPVisionModel(clip_config_from_official(sd))
    target = model.state_dict()
    # the text tower, logit scale and visual projection head are not part of the vision model
    visual = {k: v for k, v in sd.items() if k.startswith("visual.") and k != "visual.head"}
    names = [k for k in target if not k.endswith("position_ids")]
    picked = _strict_gather(names, lambda k: clip_key_to_official(k)[0], visual, "CLIP vision")
    out = {k: v for k, v in target.items() if k.endswith("position_ids")}
    for k, v in picked.items():
        part = clip_key_to_official(k)[1]
        if part is not None:
            v = v.chunk(3, dim=0)[part]
        out[k] = v.reshape(target[k].shape).float()
    model.load_state_dict(out, strict=True)
    return model


def clip_to_official(model) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, list] = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        dst, part = clip_key_to_official(k)
        if part is None:
            if dst in ("visual.cls_embedding", "visual.pos_embedding"):  # official: [1, n, dim]
                v = v.reshape(1, -1, v.shape[-1])
            out[dst] = v.detach().clone()
        else:
            qkv.setdefault(dst, [None] * 3)[part] = v
    for dst, parts in qkv.items():
        out[dst] = torch.cat(parts, dim=0).detach().clone()
    dim = model.config.hidden_size
    out["visual.post_norm.weight"] = out.get("visual.post_norm.weight", torch.ones(dim))
    out["visual.head"] = torch.zeros(dim, dim)  # projection head of the official tower (unused)
    return out
