"""Parameter-name maps between the official Wan-Animate layout and the diffusers one.

The official ``WanAnimateModel`` names (facts section 5) are the names of our ``WanAnimateDiT``.
Diffusers' ``WanAnimateTransformer3DModel`` stores the same numbers under other names, with four
structural differences that the maps below undo exactly (so a round trip is bit-identical):

* ``face_adapter.fuser_blocks.K.linear1_kv`` packs key and value rows ``[k; v]``; diffusers keeps
  them as two projections ``face_adapter.K.to_k`` / ``to_v``  -> split / concatenate on dim 0.
* fused leaky-ReLU biases of the motion encoder are ``(1, C, 1, 1)`` officially and ``(C,)`` in
  diffusers  -> squeeze / unsqueeze.
* the 14 LIA blur kernels are persistent buffers officially (``...conv2.0.kernel``,
  ``...skip.0.kernel``) but non-persistent in diffusers  -> dropped / re-created from the config.
* the cross-attention norm is ``norm3`` officially and ``norm2`` in diffusers (and the
  parameter-free FFN norm the other way round)  -> swapped.

Both functions work on any tensors, meta tensors included, so a checkpoint's key set and shapes
can be checked from its headers before a byte of weights is read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from wan_animate.config import WanAnimateConfig
from wan_animate.model.motion_encoder import make_blur_kernel


class KeyMapError(ValueError):
    """A state dict holds names the map does not know, or a split pair is incomplete."""

    def __init__(self, message: str, unknown: list[str] | None = None):
        super().__init__(message)
        self.unknown = list(unknown or [])


def lia_blur_kernel(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The LIA blur kernel (the only tensor the diffusers layout does not store), cast exactly."""
    return make_blur_kernel().to(device=device, dtype=dtype)


def num_motion_res_blocks(config: WanAnimateConfig) -> int:
    """Down-sampling residual blocks of the LIA encoder: motion_encoder_size -> 4 px."""
    return int(round(math.log2(config.motion_encoder_size))) - 2


def blur_kernel_keys(config: WanAnimateConfig) -> list[str]:
    """Official names of the persistent blur-kernel buffers (2 per residual block)."""
    return [f"{_ME_APP}.convs.{r}.{suffix}" for r in range(1, num_motion_res_blocks(config) + 1)
            for suffix in _BLUR_SUFFIXES]


# ------------------------------------------------------------------------------------------------
# Rename table: (official prefix, diffusers prefix). `{n}` is a block index kept as is.
# A key matches a row when it starts with the prefix (prefixes ending without "." are full names).
# ------------------------------------------------------------------------------------------------

_RENAMES: list[tuple[str, str]] = [
    # embeddings
    ("patch_embedding.", "patch_embedding."),
    ("pose_patch_embedding.", "pose_patch_embedding."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
    # head
    ("head.modulation", "scale_shift_table"),
    ("head.head.", "proj_out."),
    # transformer blocks
    ("blocks.{n}.modulation", "blocks.{n}.scale_shift_table"),
    ("blocks.{n}.self_attn.q.", "blocks.{n}.attn1.to_q."),
    ("blocks.{n}.self_attn.k.", "blocks.{n}.attn1.to_k."),
    ("blocks.{n}.self_attn.v.", "blocks.{n}.attn1.to_v."),
    ("blocks.{n}.self_attn.o.", "blocks.{n}.attn1.to_out.0."),
    ("blocks.{n}.self_attn.norm_q.", "blocks.{n}.attn1.norm_q."),
    ("blocks.{n}.self_attn.norm_k.", "blocks.{n}.attn1.norm_k."),
    ("blocks.{n}.cross_attn.q.", "blocks.{n}.attn2.to_q."),
    ("blocks.{n}.cross_attn.k.", "blocks.{n}.attn2.to_k."),
    ("blocks.{n}.cross_attn.v.", "blocks.{n}.attn2.to_v."),
    ("blocks.{n}.cross_attn.o.", "blocks.{n}.attn2.to_out.0."),
    ("blocks.{n}.cross_attn.k_img.", "blocks.{n}.attn2.add_k_proj."),
    ("blocks.{n}.cross_attn.v_img.", "blocks.{n}.attn2.add_v_proj."),
    ("blocks.{n}.cross_attn.norm_q.", "blocks.{n}.attn2.norm_q."),
    ("blocks.{n}.cross_attn.norm_k.", "blocks.{n}.attn2.norm_k."),
    ("blocks.{n}.cross_attn.norm_k_img.", "blocks.{n}.attn2.norm_added_k."),
    # the affine cross-attention norm is norm3 officially and norm2 in diffusers (and vice versa
    # for the parameter-free FFN norm, listed so a non-standard file with its affine still maps)
    ("blocks.{n}.norm3.", "blocks.{n}.norm2."),
    ("blocks.{n}.norm2.", "blocks.{n}.norm3."),
    ("blocks.{n}.ffn.0.", "blocks.{n}.ffn.net.0.proj."),
    ("blocks.{n}.ffn.2.", "blocks.{n}.ffn.net.2."),
    # face encoder: the causal convs wrap an nn.Conv1d under `.conv` officially
    ("face_encoder.conv1_local.conv.", "face_encoder.conv1_local."),
    ("face_encoder.conv2.conv.", "face_encoder.conv2."),
    ("face_encoder.conv3.conv.", "face_encoder.conv3."),
    ("face_encoder.out_proj.", "face_encoder.out_proj."),
    ("face_encoder.padding_tokens", "face_encoder.padding_tokens"),
    # face adapter (linear1_kv is handled separately: it splits in two)
    ("face_adapter.fuser_blocks.{n}.linear1_q.", "face_adapter.{n}.to_q."),
    ("face_adapter.fuser_blocks.{n}.linear2.", "face_adapter.{n}.to_out."),
    ("face_adapter.fuser_blocks.{n}.q_norm.", "face_adapter.{n}.norm_q."),
    ("face_adapter.fuser_blocks.{n}.k_norm.", "face_adapter.{n}.norm_k."),
    # motion encoder: fully connected part and direction matrix
    ("motion_encoder.enc.fc.{n}.", "motion_encoder.motion_network.{n}."),
    ("motion_encoder.dec.direction.weight", "motion_encoder.motion_synthesis_weight"),
]

_ME_APP = "motion_encoder.enc.net_app"


def _compile(prefix: str) -> re.Pattern[str]:
    pattern = re.escape(prefix).replace(re.escape("{n}"), r"(?P<n>\d+)")
    # a prefix ending in "." is followed by a parameter name; otherwise it is the full key
    return re.compile("^" + pattern + ("(?P<rest>.+)$" if prefix.endswith(".") else "(?P<rest>)$"))


_OFFICIAL_TO_DIFFUSERS = [(_compile(o), d) for o, d in _RENAMES]
_DIFFUSERS_TO_OFFICIAL = [(_compile(d), o) for o, d in _RENAMES]


def _table_key_or_keep(key: str, table: list[tuple[re.Pattern[str], str]], unknown: list[str]) -> str:
    """The table's name for ``key``; a key without one is noted in ``unknown`` and kept as it is."""
    for pattern, target in table:
        m = pattern.match(key)
        if m:
            return (target.replace("{n}", m.group("n")) if "{n}" in target else target) + m.group("rest")
    unknown.append(key)
    return key


# ---- Motion encoder convs: official convs.0 / convs.1..R / convs.R+1 <-> conv_in / res_blocks.0..R-1 / conv_out
# Every bias among them is a fused leaky-ReLU bias: (1, C, 1, 1) officially, (C,) in diffusers.

_RES_OFFICIAL_TO_DIFFUSERS = {
    "conv1.0.weight": "conv1.weight",
    "conv1.1.bias": "conv1.act_fn.bias",
    "conv2.1.weight": "conv2.weight",
    "conv2.2.bias": "conv2.act_fn.bias",
    "skip.1.weight": "conv_skip.weight",
}
_BLUR_SUFFIXES = ("conv2.0.kernel", "skip.0.kernel")


def _motion_conv_names(num_res: int) -> dict[str, str]:
    """Official motion-encoder conv key -> diffusers key for ``num_res`` residual blocks."""
    names = {
        f"{_ME_APP}.convs.0.0.weight": "motion_encoder.conv_in.weight",
        f"{_ME_APP}.convs.0.1.bias": "motion_encoder.conv_in.act_fn.bias",
        f"{_ME_APP}.convs.{num_res + 1}.weight": "motion_encoder.conv_out.weight",
    }
    for r in range(1, num_res + 1):
        for official, diffusers in _RES_OFFICIAL_TO_DIFFUSERS.items():
            names[f"{_ME_APP}.convs.{r}.{official}"] = f"motion_encoder.res_blocks.{r - 1}.{diffusers}"
    return names


# ---- Face adapter key/value packing

_RE_KV_OFFICIAL = re.compile(r"^face_adapter\.fuser_blocks\.(\d+)\.linear1_kv\.(weight|bias)$")
KV_DIFFUSERS_RE = re.compile(r"^face_adapter\.(\d+)\.to_(k|v)\.(weight|bias)$")


# ---- Public maps


def _raise_unknown(unknown: list[str], direction: str) -> None:
    shown = ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else "")
    raise KeyMapError(
        f"{len(unknown)} key(s) have no {direction} name: {shown}. The state dict is not a "
        "Wan-Animate DiT in the expected layout (or the config does not match it).",
        unknown,
    )


def official_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: WanAnimateConfig) -> dict[str, torch.Tensor]:
    """Official names -> diffusers ``WanAnimateTransformer3DModel`` names (blur kernels dropped:
    diffusers re-creates them)."""
    convs = _motion_conv_names(num_motion_res_blocks(config))
    blur = set(blur_kernel_keys(config))
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        m = _RE_KV_OFFICIAL.match(key)
        if m:
            if tensor.shape[0] % 2:
                raise KeyMapError(f"{key} has an odd first dimension {tuple(tensor.shape)}; cannot split into k and v.")
            # clones: the halves own their storage (safetensors refuses tensors that share memory)
            k, v = (half.clone() for half in tensor.chunk(2))
            out[f"face_adapter.{m.group(1)}.to_k.{m.group(2)}"] = k
            out[f"face_adapter.{m.group(1)}.to_v.{m.group(2)}"] = v
            continue
        if key in blur:
            continue
        if key in convs:  # reshape of a contiguous bias is a view, no copy
            out[convs[key]] = tensor.reshape(-1) if key.endswith(".bias") else tensor
            continue
        out[_table_key_or_keep(key, _OFFICIAL_TO_DIFFUSERS, unknown)] = tensor
    if unknown:
        _raise_unknown(unknown, "diffusers")
    return out


def diffusers_to_official(
    state_dict: Mapping[str, torch.Tensor],
    config: WanAnimateConfig,
    *,
    strict: bool = True,
    add_blur_kernels: bool = True,
) -> dict[str, torch.Tensor]:
    """Diffusers names -> official names, re-creating the persistent blur-kernel buffers.

    The kernels get the dtype of the conv weight they blur
    (an official file stores the whole model in one dtype). ``face_adapter.K.to_k`` and ``to_v``
    must both be present; they are concatenated into ``linear1_kv``.
    """
    num_res = num_motion_res_blocks(config)
    convs = {d: o for o, d in _motion_conv_names(num_res).items()}
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    kv_parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        m = KV_DIFFUSERS_RE.match(key)
        if m:
            kv_parts.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = tensor
            continue
        if key in convs:
            out[convs[key]] = tensor.reshape(1, -1, 1, 1) if key.endswith(".bias") else tensor
            continue
        out[_table_key_or_keep(key, _DIFFUSERS_TO_OFFICIAL, unknown)] = tensor
    for (block, param), parts in kv_parts.items():
        if set(parts) != {"k", "v"}:
            if not strict:  # pass the lone half through; the caller's key check reports it
                for which, tensor in parts.items():
                    out[f"face_adapter.{block}.to_{which}.{param}"] = tensor
                continue
            lacking = "to_v" if "k" in parts else "to_k"
            raise KeyMapError(
                f"face_adapter.{block}.{lacking}.{param} is missing while its partner is present; "
                "both halves are needed to build linear1_kv (truncated or partial checkpoint?)."
            )
        out[f"face_adapter.fuser_blocks.{block}.linear1_kv.{param}"] = torch.cat([parts["k"], parts["v"]], dim=0)
    if unknown and strict:
        _raise_unknown(unknown, "official")
    if add_blur_kernels:
        for r in range(1, num_res + 1):
            sibling = out.get(f"{_ME_APP}.convs.{r}.conv2.1.weight")
            if sibling is None:
                continue  # the missing weight itself will be reported by the caller's key check
            for suffix in _BLUR_SUFFIXES:
                out[f"{_ME_APP}.convs.{r}.{suffix}"] = lia_blur_kernel(sibling.dtype, sibling.device)
    return out
