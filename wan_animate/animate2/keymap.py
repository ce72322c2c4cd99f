"""Parameter names of Animate-2: official (``blocks.N.block.self_attn.q``) <-> diffusers
(``blocks.N.self_attn.to_q``), and which family a set of names belongs to.

The two layouts hold the same tensors with the same shapes; only names differ (diffusers 0.42.1
``convert_wan_animate_2_transformer_to_diffusers`` reads the same correspondence):

* the official wrapper level ``blocks.N.block.`` is dropped (``blocks.N.``);
* attention projections ``q/k/v/o`` -> ``to_q/to_k/to_v/to_out.0``; the image branch
  ``k_img/v_img/norm_k_img`` -> ``add_k_proj/add_v_proj/norm_added_k``.
  ``norm3`` (the cross-attention norm) keeps its name (unlike Animate v1's diffusers layout).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from wan_animate.weights.keymap import KeyMapError

__all__ = ["official_to_diffusers", "diffusers_to_official", "detect_family", "is_animate2_names"]

_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "k_img": "add_k_proj", "v_img": "add_v_proj",
         "norm_k_img": "norm_added_k"}
_ATTN_BACK = {v: k for k, v in _ATTN.items()}
_OFFICIAL_BLOCK = re.compile(r"^blocks\.(\d+)\.block\.(.+)$")
_DIFFUSERS_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_ATTN_NAME = re.compile(r"^(self_attn|cross_attn)\.(to_out\.0|[a-z_]+)\.(weight|bias)$")
_TOP = re.compile(r"^(patch_embedding|text_embedding|time_embedding|time_projection|head|img_emb)\.")


def _map(sd: Mapping, block_re: re.Pattern, table: dict[str, str], wrap: bool, strict: bool) -> dict:
    out, unknown = {}, []
    for name, tensor in sd.items():
        m = block_re.match(name)
        if m and not (wrap and m.group(2).startswith("block.")):  # a diffusers name never has the wrapper
            idx, rest = m.groups()
            a = _ATTN_NAME.match(rest)
            if a and a.group(2) in table:
                rest = f"{a.group(1)}.{table[a.group(2)]}.{a.group(3)}"
            elif a and strict and a.group(2) not in ("norm_q", "norm_k"):
                unknown.append(name)
                continue
            out[f"blocks.{idx}.block.{rest}" if wrap else f"blocks.{idx}.{rest}"] = tensor
        elif _TOP.match(name):
            out[name] = tensor
        elif strict:
            unknown.append(name)
        else:
            out[name] = tensor
    if unknown:
        raise KeyMapError(f"{len(unknown)} names are not Animate-2 DiT parameters: {unknown[:5]}", unknown)
    return out


def official_to_diffusers(sd: Mapping, strict: bool = True) -> dict:
    """Official names -> diffusers names (same tensors, no copies)."""
    return _map(sd, _OFFICIAL_BLOCK, _ATTN, wrap=False, strict=strict)


def diffusers_to_official(sd: Mapping, strict: bool = True) -> dict:
    """Diffusers names -> official names (same tensors, no copies)."""
    return _map(sd, _DIFFUSERS_BLOCK, _ATTN_BACK, wrap=True, strict=strict)


# ------------------------------------------------------------------------------------------------
# Family and layout from names
# ------------------------------------------------------------------------------------------------

_A2_OFFICIAL = re.compile(r"^blocks\.\d+\.block\.(self_attn|cross_attn|ffn|norm3|modulation)")
_A2_DIFFUSERS = re.compile(r"^blocks\.\d+\.(self_attn|cross_attn)\.(to_q|to_k|to_v|to_out|add_k_proj)")


def detect_family(names: list[str], prefix: str = "") -> tuple[str, str]:
    """(family, layout) of stripped names: ("animate2", "official"|"diffusers") or ("animate", "")
    when the names are not Animate-2's (Animate v1's layouts are detected by ``wan_animate.weights``)."""
    stripped = [n[len(prefix):] if prefix and n.startswith(prefix) else n for n in names]
    official = sum(bool(_A2_OFFICIAL.match(n)) for n in stripped)
    diffusers = sum(bool(_A2_DIFFUSERS.match(n)) for n in stripped)
    if official == diffusers == 0:
        return "animate", ""
    return "animate2", "official" if official >= diffusers else "diffusers"


def is_animate2_names(names: list[str], prefix: str = "") -> bool:
    return detect_family(names, prefix)[0] == "animate2"
