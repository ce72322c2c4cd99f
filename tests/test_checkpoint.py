"""Checkpoint I/O: key maps, round trips between layouts, sharding, streaming load, bad files, CLI."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from wan_animate import checkpoint as ckpt
from wan_animate.weights.diagnose import CheckpointError
from wan_animate.weights.keymap import KeyMapError, diffusers_to_official, official_to_diffusers
from wan_animate.weights.source import inspect_checkpoint
from wan_animate.weights.load import load_dit
from wan_animate.weights.save import save_dit
from wan_animate.config import WanAnimateConfig
from wan_animate.weights.keymap import blur_kernel_keys, lia_blur_kernel
from wan_animate.model import WanAnimateDiT, set_precision
from wan_animate.weights import load as wload
from wan_animate.weights import source
from wan_animate.weights.diagnose import check_against_model

REPO = Path(__file__).resolve().parents[1]
PRESETS = ["tiny", "tiny_b"]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _diffusers_meta(config: WanAnimateConfig):
    from diffusers import WanAnimateTransformer3DModel

    kw = config.to_diffusers_config()
    kw.pop("_class_name")
    with torch.device("meta"):
        return WanAnimateTransformer3DModel(**kw)


def _random_model(preset: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> WanAnimateDiT:
    """Our DiT with every parameter random and non-zero (zero-init tensors would hide swaps)."""
    gen = torch.Generator().manual_seed(seed)
    model = WanAnimateDiT(WanAnimateConfig.preset(preset))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + 0.1)
    return set_precision(model, dtype)


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, (k, a[k].dtype, b[k].dtype)
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
        assert torch.equal(a[k], b[k]), k


def _files_state_dict(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "wan_animate.checkpoint", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module", params=PRESETS)
def saved(request, tmp_path_factory):
    """A random model (bf16 with fp32 tables, as used) saved in every layout we read."""
    preset = request.param
    model = _random_model(preset, torch.bfloat16)
    root = tmp_path_factory.mktemp(f"ckpt_{preset}")
    save_dit(model, root / "official", layout="official", max_shard_size="40KB")
    save_dit(model, root / "diffusers", layout="diffusers", max_shard_size="40KB")
    save_dit(model, root / "single.safetensors", layout="official")
    sd = model.state_dict()
    # a community file: official names under "diffusion_model.", no config metadata
    save_file({f"diffusion_model.{k}": v.contiguous() for k, v in sd.items()}, str(root / "community.safetensors"))
    return preset, model, root


# ------------------------------------------------------------------------------------------------
# key maps
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "tiny_b", "14b"])
def test_key_maps_match_diffusers_and_our_model_on_meta(preset):
    config = WanAnimateConfig.preset(preset)
    theirs = _diffusers_meta(config).state_dict()
    with torch.device("meta"):
        ours = WanAnimateDiT(config).state_dict()
    official = diffusers_to_official(theirs, config)
    assert {k: tuple(v.shape) for k, v in official.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    back = official_to_diffusers(ours, config)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    if preset == "14b":
        assert len(ours) == 1441 and len(theirs) == 1443
        assert len(blur_kernel_keys(config)) == 14
        assert sum(v.numel() for k, v in ours.items() if not k.endswith(".kernel")) == 17_274_816_884
        assert tuple(ours["face_adapter.fuser_blocks.0.linear1_kv.weight"].shape) == (10240, 5120)
        assert tuple(ours["motion_encoder.enc.net_app.convs.1.conv1.1.bias"].shape) == (1, 32, 1, 1)
        assert tuple(ours["motion_encoder.enc.net_app.convs.8.weight"].shape) == (512, 512, 4, 4)


def test_blur_kernel_matches_both_implementations():
    config = WanAnimateConfig.preset("tiny")
    from diffusers import WanAnimateTransformer3DModel

    kw = config.to_diffusers_config()
    kw.pop("_class_name")
    theirs = [b for n, b in WanAnimateTransformer3DModel(**kw).named_buffers() if n.endswith("blur_kernel")]
    ours = [b for n, b in WanAnimateDiT(config).named_buffers() if n.endswith(".kernel")]
    assert len(theirs) == len(ours) == len(blur_kernel_keys(config)) > 0
    for t in theirs + ours:
        assert torch.equal(t.float(), lia_blur_kernel())
    assert torch.isclose(lia_blur_kernel().sum(), torch.tensor(1.0))
    assert lia_blur_kernel()[1, 1] == 9 / 64


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_official_diffusers_official_is_bit_identical(preset, dtype):
    model = _random_model(preset)
    sd = {k: v.to(dtype) for k, v in model.state_dict().items()}  # an official file: one dtype
    config = model.config
    diff = official_to_diffusers(sd, config)
    assert not any(k.endswith("kernel") for k in diff)
    # the fused leaky-ReLU biases lose their (1, C, 1, 1) shape and nothing else
    official_bias = sd["motion_encoder.enc.net_app.convs.1.conv2.2.bias"]
    assert official_bias.ndim == 4
    assert torch.equal(diff["motion_encoder.res_blocks.0.conv2.act_fn.bias"], official_bias.flatten())
    _assert_same_tensors(diffusers_to_official(diff, config), sd)
    # linear1_kv really is [k; v]: the halves are the diffusers to_k / to_v
    kv = sd["face_adapter.fuser_blocks.0.linear1_kv.weight"]
    half = kv.shape[0] // 2
    assert torch.equal(diff["face_adapter.0.to_k.weight"], kv[:half])
    assert torch.equal(diff["face_adapter.0.to_v.weight"], kv[half:])
    # norm3 (official, affine) is diffusers' norm2
    assert torch.equal(diff["blocks.0.norm2.weight"], sd["blocks.0.norm3.weight"])
    assert diff["motion_encoder.conv_in.act_fn.bias"].ndim == 1


def test_key_map_rejects_unknown_and_half_pairs():
    config = WanAnimateConfig.preset("tiny")
    with pytest.raises(KeyMapError, match="no diffusers name"):
        official_to_diffusers({"encoder.layer.0.weight": torch.zeros(1)}, config)
    with pytest.raises(KeyMapError, match="to_v.weight is missing"):
        diffusers_to_official({"face_adapter.0.to_k.weight": torch.zeros(4, 4)}, config)


# ------------------------------------------------------------------------------------------------
# save / load round trips
# ------------------------------------------------------------------------------------------------


def test_load_every_layout_gives_identical_weights(saved):
    preset, model, root = saved
    reference = model.state_dict()
    config = WanAnimateConfig.preset(preset)
    sources = {
        "official folder": dict(path=root / "official"),
        "diffusers folder": dict(path=root / "diffusers"),
        "single file (metadata config)": dict(path=root / "single.safetensors"),
        "community file + config=": dict(path=root / "community.safetensors", config=config),
    }
    for what, kw in sources.items():
        loaded = load_dit(**kw, dtype=None)
        assert isinstance(loaded, WanAnimateDiT), what
        assert loaded.config == config, what
        assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()]), what
        _assert_same_tensors(loaded.state_dict(), reference)


def test_load_dit_dtype_and_layout_detection(saved, tmp_path):
    preset, model, root = saved
    loaded = load_dit(root / "diffusers", dtype=torch.float32)
    _assert_same_tensors(loaded.state_dict(), set_precision(copy.deepcopy(model), torch.float32).state_dict())
    # an fp32 file loaded as bf16 (the default) is cast exactly like set_precision does it
    fp32_model = _random_model(preset, torch.float32, seed=5)
    save_dit(fp32_model, tmp_path / "fp32", layout="diffusers", max_shard_size="40KB")
    loaded = load_dit(tmp_path / "fp32")
    _assert_same_tensors(loaded.state_dict(), set_precision(fp32_model, torch.bfloat16).state_dict())
    dtypes = {n: p.dtype for n, p in loaded.named_parameters()}
    assert dtypes["blocks.0.self_attn.q.weight"] == torch.bfloat16
    assert dtypes["blocks.0.modulation"] == torch.float32
    assert not loaded.training
    info = inspect_checkpoint(root / "community.safetensors")
    assert (info["layout"], info["prefix"]) == ("official", "diffusion_model.")
    assert inspect_checkpoint(root / "diffusers")["layout"] == "diffusers"


def test_sharded_folders_have_index_and_configs(saved):
    preset, model, root = saved
    config = WanAnimateConfig.preset(preset)
    for layout in ("official", "diffusers"):
        folder = root / layout
        shards = sorted(folder.glob("diffusion_pytorch_model-*-of-*.safetensors"))
        assert len(shards) > 2
        index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
        stored = _files_state_dict(folder)
        assert set(index["weight_map"]) == set(stored)
        assert set(index["weight_map"].values()) == {s.name for s in shards}
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in stored.values())
        cfg_json = json.loads((folder / "config.json").read_text())
        want = config.to_official_config() if layout == "official" else config.to_diffusers_config()
        assert {k: cfg_json[k] for k in want} == json.loads(json.dumps(want))
        from safetensors import safe_open

        with safe_open(str(shards[0]), "pt") as f:
            assert json.loads(f.metadata()["config"])["_class_name"] == want["_class_name"]
    assert "_diffusers_version" in json.loads((root / "diffusers" / "config.json").read_text())


def test_diffusers_loads_our_diffusers_folder_and_we_load_theirs(saved, tmp_path):
    from diffusers import WanAnimateTransformer3DModel

    preset, model, root = saved
    theirs = WanAnimateTransformer3DModel.from_pretrained(root / "diffusers", torch_dtype=torch.float32)
    expected = official_to_diffusers({k: v.float() for k, v in model.state_dict().items()}, model.config)
    got = theirs.state_dict()
    assert sorted(got) == sorted(expected)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    # and a folder written by diffusers itself, inside a pipeline folder, loads back into our model
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    theirs.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="50KB")
    ours = load_dit(tmp_path / "pipe", dtype=None)
    _assert_same_tensors(ours.state_dict(), {k: v.float() for k, v in model.state_dict().items()})


def test_loading_fills_shard_by_shard_without_a_second_copy(saved, monkeypatch):
    """Each shard's tensors go into the model before the next shard is opened, and the model's
    parameters *are* those tensors (no copy, no full state dict held on the side)."""
    preset, model, root = saved
    captured, read_order, yielded = {}, [], {}
    real_build, real_read = wload.build_empty_dit, source.iter_tensors

    def build(config):
        captured["model"] = real_build(config)
        return captured["model"]

    def read(shard, device):
        skeleton = captured["model"]
        filled = {n for n, t in [*skeleton.named_parameters(), *skeleton.named_buffers()] if not t.is_meta}
        for earlier in read_order:  # everything read so far is already inside the model
            assert set(earlier.tensors) <= filled
        read_order.append(shard)
        for name, tensor in real_read(shard, device):
            yielded[name] = tensor.untyped_storage().data_ptr()
            yield name, tensor

    monkeypatch.setattr(wload, "build_empty_dit", build)
    monkeypatch.setattr(source, "iter_tensors", read)
    loaded = load_dit(root / "official", dtype=None)
    assert loaded is captured["model"] and len(read_order) > 2
    for name, p in loaded.named_parameters():
        assert p.untyped_storage().data_ptr() == yielded[name], name


def test_save_into_existing_folder_removes_stale_shards(tmp_path):
    model = _random_model("tiny")
    save_dit(model, tmp_path / "m", max_shard_size="20KB")
    save_dit(model, tmp_path / "m", max_shard_size="10GB")
    assert [p.name for p in (tmp_path / "m").glob("*.safetensors")] == ["diffusion_pytorch_model.safetensors"]
    assert not (tmp_path / "m" / "diffusion_pytorch_model.safetensors.index.json").exists()
    _assert_same_tensors(load_dit(tmp_path / "m", dtype=None).state_dict(), model.state_dict())


def test_pickle_only_through_weights_only(tmp_path):
    model = _random_model("tiny")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "dit.pt")
    loaded = load_dit(tmp_path / "dit.pt", dtype=None, config=model.config)
    _assert_same_tensors(loaded.state_dict(), model.state_dict())

    torch.save({"weights": model.state_dict(), "obj": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_dit(tmp_path / "evil.pt", config=model.config)


# ------------------------------------------------------------------------------------------------
# bad checkpoints
# ------------------------------------------------------------------------------------------------


class _Payload:
    """An arbitrary object: a weights file holding one must be refused, never unpickled."""


def _copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_shard_is_reported(saved, tmp_path):
    _, _, root = saved
    folder = _copy_folder(root / "official", tmp_path / "trunc")
    shard = sorted(folder.glob("*-of-*.safetensors"))[1]
    size = shard.stat().st_size
    os.truncate(shard, size - 1000)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated shard.*download it again") as err:
        load_dit(folder)
    assert "truncated" in err.value.cause
    os.truncate(shard, 5)  # not even a header length
    with pytest.raises(CheckpointError, match="too short"):
        load_dit(folder)


def test_missing_shard_is_reported(saved, tmp_path):
    _, _, root = saved
    folder = _copy_folder(root / "diffusers", tmp_path / "missing")
    lost = sorted(folder.glob("*-of-*.safetensors"))[-1]
    lost.unlink()
    with pytest.raises(CheckpointError, match=rf"are missing: {lost.name}.*incomplete") as err:
        load_dit(folder)
    assert "missing shard" in err.value.cause
    (folder / "diffusion_pytorch_model.safetensors.index.json").unlink()  # no index: the names tell
    with pytest.raises(CheckpointError, match=r"shards \[\d+\] of \d+ are missing"):
        load_dit(folder)


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_wrong_preset_is_reported(layout, tmp_path):
    model = _random_model("tiny")
    save_dit(model, tmp_path / "m", layout=layout)
    with pytest.raises(CheckpointError) as err:
        load_dit(tmp_path / "m", config=WanAnimateConfig.preset("tiny_b"))
    msg = str(err.value)
    assert "shape mismatches" in msg and "checkpoint (64, 36, 1, 2, 2) vs model (96, 36, 1, 2, 2)" in msg
    assert "Likely cause: wrong preset/config" in msg and "preset('tiny')" in msg
    assert err.value.mismatched and err.value.unexpected  # tiny has 4 layers, tiny_b 3
    assert any(k.startswith("blocks.3.") for k in err.value.unexpected)


def test_community_file_without_config_suggests_the_preset(saved):
    preset, _, root = saved
    with pytest.raises(CheckpointError, match=rf"default '14b' preset.*preset\('{preset}'\)"):
        load_dit(root / "community.safetensors")


def test_foreign_keys_are_reported(tmp_path):
    foreign = {f"encoder.layer.{i}.attention.self.query.weight": torch.randn(8, 8) for i in range(4)}
    foreign["embeddings.word_embeddings.weight"] = torch.randn(30, 8)
    save_file(foreign, str(tmp_path / "bert.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_dit(tmp_path / "bert.safetensors", config=WanAnimateConfig.preset("tiny"))
    msg = str(err.value)
    assert "Likely cause: foreign keys" in msg and "unrecognised layout" in msg
    assert "unexpected keys (5 of 5)" in msg and "missing keys (207 of 213)" in msg


def test_incomplete_checkpoint_is_reported(tmp_path):
    model = _random_model("tiny")
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("face_adapter.")}
    save_file(sd, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match="Likely cause: incomplete checkpoint") as err:
        load_dit(tmp_path / "partial.safetensors", config=model.config)
    assert err.value.missing and all(k.startswith("face_adapter.") for k in err.value.missing)


def test_lora_file_is_recognised(tmp_path):
    lora = {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 64),
            "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(64, 4)}
    save_file(lora, str(tmp_path / "lora.safetensors"))
    with pytest.raises(CheckpointError, match="LoRA file"):
        load_dit(tmp_path / "lora.safetensors", config=WanAnimateConfig.preset("tiny"))


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def test_cli_convert_round_trip_is_bit_identical(tmp_path):
    model = _random_model("tiny_b", torch.bfloat16)
    save_dit(model, tmp_path / "official", max_shard_size="60KB")
    to_diff = _run_cli("convert", str(tmp_path / "official"), str(tmp_path / "diffusers"), "--to", "diffusers",
                       "--max-shard-size", "30KB")
    assert to_diff.returncode == 0, to_diff.stderr
    assert "wrote" in to_diff.stdout and "convert -> diffusers" in to_diff.stderr  # tqdm bar
    # the way back in process (the process's exit and output are checked above)
    assert ckpt.main(["convert", str(tmp_path / "diffusers"), str(tmp_path / "back"), "--to", "official"]) == 0
    _assert_same_tensors(_files_state_dict(tmp_path / "back"), _files_state_dict(tmp_path / "official"))
    assert inspect_checkpoint(tmp_path / "diffusers")["layout"] == "diffusers"
    _assert_same_tensors(load_dit(tmp_path / "diffusers", dtype=None).state_dict(), model.state_dict())



def test_cli_convert_dtype_and_errors(tmp_path, capsys):
    model = _random_model("tiny", torch.bfloat16)
    save_dit(model, tmp_path / "official")
    argv = ["convert", str(tmp_path / "official"), str(tmp_path / "fp32.safetensors"), "--to", "official"]
    assert ckpt.main([*argv, "--dtype", "fp32"]) == 0
    assert {v.dtype for v in load_file(tmp_path / "fp32.safetensors").values()} == {torch.float32}
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "foo.safetensors"))
    # an expected error: one line, exit status 2 (wan_animate.cli)
    assert ckpt.main(["convert", str(tmp_path / "foo.safetensors"), str(tmp_path / "x"), "--to", "diffusers"]) == 2
    assert "Likely cause: foreign keys" in capsys.readouterr().err
    assert ckpt.main(["inspect", str(tmp_path / "official")]) == 0
    out = capsys.readouterr().out
    assert "layout: official" in out and '"dim": 64' in out and "num_tensors: 213" in out


def test_cli_make_tiny_writes_loadable_folders(tmp_path):
    for layout in ("diffusers", "official"):
        assert ckpt.main(["make-tiny", str(tmp_path / layout), "--layout", layout, "--seed", "3"]) == 0
        model = load_dit(tmp_path / layout, dtype=torch.float32)
        assert model.config == WanAnimateConfig.preset("tiny")
        assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if not n.endswith("bias"))


def test_save_dit_unwraps_compiled_models_refuses_lora_and_keeps_metadata(tmp_path):
    from safetensors import safe_open

    model = _random_model("tiny")
    save_dit(torch.compile(model), tmp_path / "m.safetensors", metadata={"step": 12, "note": "x"})
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert (f.metadata()["step"], f.metadata()["note"]) == ("12", "x")
        assert not any(k.startswith("_orig_mod") for k in f.keys())  # noqa: SIM118
    model.blocks[0].self_attn.q.register_module("lora_A", torch.nn.Linear(64, 2))
    with pytest.raises(ValueError, match="LoRA layers"):
        save_dit(model, tmp_path / "lora")


@pytest.mark.parametrize("target", ["folder", "single.safetensors"])
def test_saving_over_the_loaded_files_keeps_the_loaded_model_intact(tmp_path, target):
    """Loaded weights are memory-mapped from the files; saving (new weights) over those very files
    must neither change nor break the model that is still using them."""
    first, second = _random_model("tiny", seed=1), _random_model("tiny", seed=2)
    path = tmp_path / target
    save_dit(first, path, max_shard_size="30KB")
    loaded = load_dit(path, dtype=None)
    save_dit(second, path, max_shard_size="50KB")
    _assert_same_tensors(loaded.state_dict(), first.state_dict())
    _assert_same_tensors(load_dit(path, dtype=None).state_dict(), second.state_dict())
    assert not list(tmp_path.rglob("*.tmp"))


def test_mixed_layouts_and_quantised_files_are_named(tmp_path):
    model = _random_model("tiny")
    sd = model.state_dict()
    mixed = dict(sd)
    for k in [k for k in sd if k.startswith("blocks.0.")]:  # one block exported with diffusers names
        mixed.pop(k)
    mixed.update(official_to_diffusers({k: v for k, v in sd.items() if k.startswith("blocks.0.")}, model.config))
    save_file({k: v.contiguous() for k, v in mixed.items()}, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(CheckpointError, match="Likely cause: mixed layouts: 32 missing tensors are present under their diffusers names"):
        load_dit(tmp_path / "mixed.safetensors", config=model.config)
    quant = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in sd.items()}
    quant.update({k.replace(".weight", ".scale_weight"): torch.ones(1) for k, v in sd.items() if v.ndim == 2})
    save_file({k: v.contiguous() for k, v in quant.items()}, str(tmp_path / "fp8.safetensors"))
    with pytest.raises(CheckpointError, match="Likely cause: a quantised"):
        load_dit(tmp_path / "fp8.safetensors", config=model.config)


def test_save_dit_takes_state_dicts_and_checks_them(tmp_path):
    model = _random_model("tiny_b")
    sd = model.state_dict()
    save_dit(sd, tmp_path / "sd", layout="diffusers", config=model.config)
    _assert_same_tensors(load_dit(tmp_path / "sd", dtype=None).state_dict(), sd)
    with pytest.raises(ValueError, match="config="):
        save_dit(sd, tmp_path / "x")
    broken = {f"net.{k}": v for k, v in sd.items()}  # e.g. a training wrapper's attribute name
    with pytest.raises(CheckpointError, match="extra prefix 'net.'"):
        save_dit(broken, tmp_path / "broken", config=model.config)
    assert not (tmp_path / "broken").exists()


def test_wrapper_prefixes_are_stripped_on_load(tmp_path):
    model = _random_model("tiny")
    save_file({f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "ddp.safetensors"))
    _assert_same_tensors(load_dit(tmp_path / "ddp.safetensors", dtype=None, config=model.config).state_dict(),
                         model.state_dict())


def test_failed_write_leaves_no_partial_model(tmp_path, monkeypatch):
    model = _random_model("tiny")
    calls = {"n": 0}
    real_save = __import__("safetensors.torch", fromlist=["save_file"]).save_file

    def failing_save(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr("safetensors.torch.save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_dit(model, tmp_path / "m", max_shard_size="30KB")
    assert list((tmp_path / "m").iterdir()) == []


def test_bad_config_json_is_reported(tmp_path):
    model = _random_model("tiny")
    save_dit(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "num_heads": 3}))
    with pytest.raises(CheckpointError, match=r"config.json: invalid Wan-Animate config .*num_heads=3"):
        load_dit(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"dim": 64,')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_dit(tmp_path / "m")
    assert load_dit(tmp_path / "m", config=model.config, dtype=None).config == model.config  # config= wins


def _write_header_only_checkpoint(folder: Path, shapes: dict[str, tuple], dtype: str = "BF16",
                                  shard_bytes: float = 5e9) -> None:
    """A release-shaped sharded folder whose shards have real headers and sparse (unwritten) data:
    14B-sized, yet it takes no disk space or memory. Only header-level code paths may read it."""
    groups, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append((name, shape, nbytes))
        size += nbytes
    groups.append(current)
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header, offset = {}, 0
        for name, shape, nbytes in group:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
        os.truncate(folder / fname, 8 + len(raw) + offset)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_release_shaped_14b_folders_pass_the_header_checks(tmp_path):
    """The 14B official release layout (1,441 bf16 tensors in ~5 GB shards + index) and its diffusers
    twin are recognised, configured and fully name/shape-checked from headers alone."""
    config = WanAnimateConfig.preset("14b")
    with torch.device("meta"):
        official = WanAnimateDiT(config).state_dict()
    (tmp_path / "official").mkdir()
    _write_header_only_checkpoint(tmp_path / "official", {k: tuple(v.shape) for k, v in official.items()})
    (tmp_path / "official" / "config.json").write_text(json.dumps(config.to_official_config()))
    (tmp_path / "diffusers").mkdir()
    diffusers = official_to_diffusers(official, config)
    _write_header_only_checkpoint(tmp_path / "diffusers", {k: tuple(v.shape) for k, v in diffusers.items()})
    (tmp_path / "diffusers" / "config.json").write_text(json.dumps(config.to_diffusers_config()))
    for layout, count in (("official", 1441), ("diffusers", 1443)):
        info = inspect_checkpoint(tmp_path / layout)
        assert (info["layout"], info["config"], info["num_tensors"]) == (layout, config, count)
        assert info["num_shards"] == 7
        src = source.open_source(tmp_path / layout)
        found, where = source.identify(src, None)
        check_against_model(source.virtual_official(src, found), official, found, where=layout,
                                  layout=src.layout, config_source=where, optional=set(blur_kernel_keys(found)))
    assert info["total_bytes"] == 2 * 17_274_816_884
    with pytest.raises(CheckpointError, match=r"preset\('14b'\)"):
        load_dit(tmp_path / "official", config=WanAnimateConfig.preset("tiny"))
