"""Animate-2 weights: official single file / diffusers folder load, convert both ways, the CLI,
clear errors, the tiny model folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from wan_animate import checkpoint as ckpt
from wan_animate.animate2 import Animate2Config, Animate2DiT
from wan_animate.animate2.keymap import official_to_diffusers
from wan_animate.animate2.weights import (
    convert_animate2,
    inspect_animate2,
    load_animate2,
    save_animate2,
)
from wan_animate.family import family_of
from wan_animate.weights.diagnose import CheckpointError


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Animate2DiT(Animate2Config.preset("tiny")).eval()


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_official_single_file_with_community_prefix_loads(tiny, tmp_path):
    # the official release is one file without config; community copies prefix the names
    path = tmp_path / "wan_animate_2.safetensors"
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    assert family_of(path).name == "animate2"
    info = inspect_animate2(path)
    assert (info["layout"], info["prefix"]) == ("official", "model.diffusion_model.")
    loaded = load_animate2(path, dtype=None, config=Animate2Config.preset("tiny"))
    _same(loaded, tiny)
    # without a config the 14b default is assumed, and the error says which preset fits
    with pytest.raises(CheckpointError, match="preset 'tiny'") as err:
        load_animate2(path, dtype=None)
    assert "Animate2Config.preset('tiny')" in str(err.value)


def test_diffusers_folder_round_trip_and_diffusers_class_loads_it(tiny, tmp_path):
    save_animate2(tiny, tmp_path / "diffusers", layout="diffusers")
    cfg = json.loads((tmp_path / "diffusers" / "config.json").read_text())
    assert cfg["_class_name"] == "WanAnimate2Transformer3DModel"
    from diffusers import WanAnimate2Transformer3DModel

    theirs = WanAnimate2Transformer3DModel.from_pretrained(tmp_path / "diffusers")
    ours = official_to_diffusers(tiny.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(v, ours[k]), k
    _same(load_animate2(tmp_path / "diffusers", dtype=None), tiny)


def test_convert_both_ways_bit_identical(tiny, tmp_path):
    save_animate2(tiny, tmp_path / "official", layout="official", max_shard_size="200KB")
    assert len(list((tmp_path / "official").glob("*.safetensors"))) > 1  # sharded + index
    convert_animate2(tmp_path / "official", tmp_path / "diffusers", "diffusers", progress=False)
    convert_animate2(tmp_path / "diffusers", tmp_path / "back.safetensors", "official", progress=False)
    _same(load_animate2(tmp_path / "back.safetensors", dtype=None), tiny)  # config from the file's metadata
    bf16 = load_animate2(tmp_path / "diffusers", dtype=torch.bfloat16)
    assert bf16.blocks[0].block.self_attn.q.weight.dtype == torch.bfloat16
    assert bf16.blocks[0].block.modulation.dtype == torch.float32  # fp32 by design


def test_cli_inspect_names_the_family_and_converts(tiny, tmp_path, capsys):
    save_animate2(tiny, tmp_path / "official", layout="official")
    assert ckpt.main(["inspect", str(tmp_path / "official")]) == 0
    out = capsys.readouterr().out
    assert "family: animate2" in out and "layout: official" in out
    assert ckpt.main(["convert", str(tmp_path / "official"), str(tmp_path / "d"), "--to", "diffusers"]) == 0
    assert ckpt.main(["inspect", str(tmp_path / "d")]) == 0
    assert "family: animate2" in capsys.readouterr().out
    _same(load_animate2(tmp_path / "d", dtype=None), tiny)


def test_clear_errors(tiny, tmp_path):
    sd = tiny.state_dict()
    partial = {k: v for k, v in sd.items() if not k.startswith("blocks.2.")}
    save_file({k: v.contiguous() for k, v in partial.items()}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys") as err:
        load_animate2(tmp_path / "partial.safetensors", config=Animate2Config.preset("tiny"))
    assert "Wan-Animate-2 DiT" in str(err.value) and err.value.missing
    # a v1 checkpoint is refused with the loader to use
    from wan_animate.config import WanAnimateConfig
    from wan_animate.model import WanAnimateDiT
    from wan_animate.weights.save import save_dit

    save_dit(WanAnimateDiT(WanAnimateConfig.preset("tiny")), tmp_path / "v1")
    assert family_of(tmp_path / "v1").name == "animate"
    with pytest.raises(CheckpointError, match="load_dit"):
        load_animate2(tmp_path / "v1")
    # the CLI prints one line and exits 2 (the project's status for expected errors)
    assert ckpt.main(["convert", str(tmp_path / "partial.safetensors"), str(tmp_path / "x"), "--to", "diffusers",
                      "--preset", "tiny"]) == 2


def test_make_tiny_animate2_folders(tmp_path, capsys):
    for layout in ("diffusers", "official"):
        assert ckpt.main(["make-tiny", str(tmp_path / layout), "--layout", layout, "--family", "animate2"]) == 0
        assert family_of(tmp_path / layout).name == "animate2"
        model = load_animate2(tmp_path / layout, dtype=None)
        assert model.config == Animate2Config.preset("tiny")
    index = json.loads((tmp_path / "diffusers" / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "WanAnimate2Transformer3DModel"]
    # both layouts of one seed hold the same DiT
    _same(load_animate2(tmp_path / "diffusers", dtype=None), load_animate2(tmp_path / "official", dtype=None))
