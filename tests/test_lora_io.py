"""LoRA and weight-file trust: the official relighting LoRA (torch file holding a peft state dict),
atomic loading, one-line errors for bad/unsafe/truncated files, group-readable safetensors."""

from __future__ import annotations

import copy
import os
import pathlib
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from wan_animate.config import WanAnimateConfig
from wan_animate.lora import (
    LoraError,
    apply_lora,
    apply_relighting_lora,
    default_lora_targets,
    read_lora,
    save_lora,
)
from wan_animate.model import WanAnimateDiT
from wan_animate.weights.files import WeightsFileError, load_torch_file, save_safetensors


@pytest.fixture(scope="module")
def base() -> WanAnimateDiT:
    torch.manual_seed(0)
    return WanAnimateDiT(WanAnimateConfig.preset("tiny")).eval()


def _official_targets(model: nn.Module) -> list[str]:
    """The official relighting-LoRA target rule: linears whose name contains "blocks" but neither
    "face" nor "modulation"."""
    return [n for n, m in model.named_modules()
            if "blocks" in n and "face" not in n and "modulation" not in n and isinstance(m, nn.Linear)]


def _official_adapter(model: nn.Module, rank: int) -> nn.Module:
    """The official recipe: a peft LoRA (r = alpha, gaussian init) on the official targets."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=_official_targets(model))
    return inject_adapter_in_model(config, model)


def _write_relight_file(base: nn.Module, path: Path, rank: int = 4) -> dict[str, torch.Tensor]:
    """A file in the format of the official relighting_lora.ckpt: torch.save({"state_dict": peft sd})."""
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    trained = _official_adapter(copy.deepcopy(base), rank)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in trained.modules():
            if isinstance(m, LoraLayer):  # B starts at zero: give it values so the LoRA has an effect
                m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape, generator=gen) * 0.1)
    sd = get_peft_model_state_dict(trained)
    torch.save({"state_dict": sd}, path)
    return sd


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------
# the official relighting LoRA
# ------------------------------------------------------------------------------------------------


def test_relighting_lora_is_applied_as_the_official_pipeline_does(base, tmp_path):
    from peft import set_peft_model_state_dict

    path = tmp_path / "relighting_lora.ckpt"
    sd = _write_relight_file(base, path)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) and k.startswith("blocks.") for k in sd)
    assert _official_targets(base) == default_lora_targets(base)  # our default rule is the official one

    official = _official_adapter(copy.deepcopy(base), rank=4)  # what the official pipeline does
    set_peft_model_state_dict(official, sd)
    ours = copy.deepcopy(base)
    adapted = apply_relighting_lora(ours, path)
    assert sorted(adapted) == sorted(_official_targets(base))
    assert _same_state(ours, official)  # same peft layers, same weights, unmerged

    x = torch.randn(3, base.config.dim)
    for name in ("blocks.0.self_attn.q", "blocks.3.ffn.0", "blocks.1.cross_attn.k_img"):
        layer = ours.get_submodule(name)
        want = official.get_submodule(name)(x)
        assert layer.scaling["default"] == 1.0  # alpha / rank, official 128 / 128
        assert torch.equal(layer(x), want)
        # negative control: the plain layer gives another result, so the LoRA is really applied
        assert not torch.allclose(base.get_submodule(name)(x), want)
    assert not any(p.requires_grad for p in ours.parameters())


def test_relighting_lora_never_unpickles_code(base, tmp_path):
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return pathlib.Path.touch, (marker,)

    path = tmp_path / "relighting_lora.ckpt"
    torch.save({"state_dict": {"blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 64)}, "x": Payload()}, path)
    model = copy.deepcopy(base)
    with pytest.raises(WeightsFileError, match=r"weights_only=True.*trusted environment") as err:
        apply_relighting_lora(model, path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists() and _same_state(model, base)
    # negative control: the payload is live, a plain torch.load would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


# ------------------------------------------------------------------------------------------------
# atomic loading
# ------------------------------------------------------------------------------------------------


def _peft_state() -> dict[str, torch.Tensor]:
    """What a peft-wrapped DiT's state_dict holds for one adapted layer (save_lora's input)."""
    return {k.removeprefix("diffusion_model.").replace(".weight", ".default.weight"): v for k, v in _factors().items()}


def _factors(rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.randn(rank, 64, generator=g),
        "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.randn(64, rank, generator=g),
    }


@pytest.mark.parametrize("bad", ["shape", "unknown module", "nan"])
def test_a_bad_lora_leaves_the_model_untouched(base, bad):
    state = _factors()
    if bad == "shape":  # sorts after block 0: block 0 would be merged first without the pre-check
        state["diffusion_model.blocks.3.ffn.0.lora_A.weight"] = torch.randn(2, 64)
        state["diffusion_model.blocks.3.ffn.0.lora_B.weight"] = torch.randn(99, 2)
    elif bad == "unknown module":
        state["diffusion_model.blocks.99.self_attn.q.lora_A.weight"] = torch.randn(2, 64)
        state["diffusion_model.blocks.99.self_attn.q.lora_B.weight"] = torch.randn(64, 2)
    else:
        state["diffusion_model.blocks.3.ffn.0.lora_A.weight"] = torch.full((2, 64), float("nan"))
        state["diffusion_model.blocks.3.ffn.0.lora_B.weight"] = torch.randn(128, 2)
    model = copy.deepcopy(base)
    with pytest.raises(LoraError, match={"shape": "shape", "unknown module": "blocks.99", "nan": "NaN"}[bad]) as err:
        apply_lora(model, state)
    assert "\n" not in str(err.value)
    assert _same_state(model, base)
    with pytest.raises(LoraError):
        apply_relighting_lora(model, _as_relight_file(state, model))
    assert _same_state(model, base)  # no adapter was added either
    # negative control: the good part alone changes block 0
    apply_lora(model, _factors())
    assert not torch.equal(model.blocks[0].self_attn.q.weight, base.blocks[0].self_attn.q.weight)


def _as_relight_file(state: dict[str, torch.Tensor], model: nn.Module) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "relighting_lora.ckpt"
    torch.save({"state_dict": {k.removeprefix("diffusion_model."): v for k, v in state.items()}}, path)
    return path


# ------------------------------------------------------------------------------------------------
# bad files: one line with the path and the fix
# ------------------------------------------------------------------------------------------------


def test_truncated_and_garbage_files_give_one_line_errors(base, tmp_path):
    good = save_lora(_peft_state(), tmp_path / "good.safetensors", alpha=2.0)
    assert set(read_lora(good)) == {"blocks.0.self_attn.q"}  # negative control: the intact file reads
    cases = {}
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good.read_bytes()[:-100])
    cases[trunc] = "truncated shard.*download it again"
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    cases[empty] = "truncated or corrupted.*download it again"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file" * 10)
    cases[garbage] = "truncated or corrupted.*download it again"
    half = tmp_path / "half.ckpt"
    torch.save({"state_dict": _factors()}, half)
    half.write_bytes(half.read_bytes()[:-300])
    cases[half] = "download it again"
    for path, pattern in cases.items():
        with pytest.raises(WeightsFileError, match=pattern) as err:
            read_lora(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(LoraError, match="does not exist"):
        read_lora(tmp_path / "missing.safetensors")
    not_lora = tmp_path / "dit.safetensors"
    save_safetensors({"blocks.0.self_attn.q.weight": torch.zeros(64, 64)}, not_lora)
    with pytest.raises(LoraError, match=r"not LoRA factors.*lora_A"):
        read_lora(not_lora)
    with pytest.raises(WeightsFileError, match="not a state dict of tensors"):
        torch.save([1, 2, 3], tmp_path / "list.pt")
        load_torch_file(tmp_path / "list.pt")


# ------------------------------------------------------------------------------------------------
# group-readable safetensors
# ------------------------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_safetensors_are_group_readable(base, tmp_path, umask):
    from safetensors.torch import save_file

    from wan_animate.weights.save import save_dit

    old = os.umask(umask)
    try:
        plain = tmp_path / "plain.safetensors"
        save_file({"a": torch.zeros(2)}, str(plain))
        ours = save_safetensors({"a": torch.zeros(2)}, tmp_path / "ours.safetensors", metadata={"k": "v"})
        lora = save_lora(_peft_state(), tmp_path / "lora.safetensors", alpha=2.0)
        dit = save_dit(base, tmp_path / "dit", max_shard_size="100KB")
    finally:
        os.umask(old)
    want = 0o644 & ~umask
    assert _mode(plain) & 0o040 == 0  # negative control: safetensors alone leaves the group out
    assert len(dit) > 1
    for path in [ours, lora, *dit]:
        assert _mode(path) == want, (path, oct(_mode(path)))
    assert not list(tmp_path.rglob("*.tmp"))


# ------------------------------------------------------------------------------------------------
# python -m eval.generate --relight
# ------------------------------------------------------------------------------------------------


class _Unsafe:
    """Any non-tensor object: a weights file holding one is refused, never unpickled."""


def _replace_inputs(d: Path, n: int = 9, size: int = 32) -> list[str]:
    from PIL import Image

    from wan_animate.video_io import write_video

    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(d / "ref.png")
    for name in ("pose", "bg", "mask"):
        write_video(d / f"{name}.mp4", rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), 24)
    write_video(d / "face.mp4", rng.integers(0, 256, (n, 40, 40, 3), dtype=np.uint8), 24)
    return ["--ref", str(d / "ref.png"), "--pose", str(d / "pose.mp4"), "--face", str(d / "face.mp4"),
            "--clip-len", "9"]


def test_generate_relight_flag(base, tmp_path, monkeypatch, capsys):
    from eval import generate as cli
    from wan_animate import pipeline as pl

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    monkeypatch.setattr(pl.AnimatePipeline, "detect_layout", staticmethod(lambda path: "official"))
    monkeypatch.setattr(cli, "_model_family", lambda model: "animate")  # the folder holds no weights
    loaded = []

    class FakePipeline:
        def __init__(self):
            self.dit = copy.deepcopy(base)

        def generate(self, pose_video, **kw):
            return np.zeros_like(pose_video)

    def fake_load(*a, **k):
        loaded.append(FakePipeline())
        return loaded[-1]

    monkeypatch.setattr(pl.AnimatePipeline, "from_pretrained", fake_load)
    inputs = _replace_inputs(tmp_path / "in")
    replace = ["--bg", str(tmp_path / "in" / "bg.mp4"), "--mask", str(tmp_path / "in" / "mask.mp4")]
    common = ["--model", str(model_dir), "--out", str(tmp_path / "o.mp4"), *inputs, "--no-progress"]

    # a bad (here: unsafe) relighting file fails in one line before any model is loaded
    torch.save({"state_dict": {}, "obj": _Unsafe()}, model_dir / "relighting_lora.ckpt")
    assert cli.main([*common, *replace, "--relight"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "weights_only=True" in err and "\n" not in err and not loaded
    # animate mode: refused
    _write_relight_file(base, model_dir / "relighting_lora.ckpt")
    assert cli.main([*common, "--relight"]) == 2
    assert "replace mode" in capsys.readouterr().err and not loaded
    # replace mode with the default path: applied to the pipeline's DiT
    assert cli.main([*common, *replace, "--relight"]) == 0
    assert "relighting LoRA" in capsys.readouterr().err
    dit = loaded[-1].dit
    assert type(dit.blocks[0].self_attn.q).__module__.startswith("peft")
    # negative control: without the flag the DiT stays plain
    assert cli.main([*common, *replace]) == 0
    assert isinstance(loaded[-1].dit.blocks[0].self_attn.q, nn.Linear)
