"""Trainable-only training state (issue 10, section 2): in lora / adapters_only modes a checkpoint
holds only the trained tensors and references the frozen base by a content fingerprint; resume from
it is exact; resume on another base is refused; exports are the small files unless the merged model
is asked for (then in bf16). Everything runs in-process on the quick start's tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from train.config import compose
from train.data import resolve_urls
from wan_animate.objective import flow_matching_loss


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Two tiny model folders (same architecture, different weights) + 2 synthetic clips."""
    from data_tools.synthetic_data import make_synthetic_dataset
    from wan_animate.testing import make_tiny_model_folder

    root = tmp_path_factory.mktemp("assets")
    model = make_tiny_model_folder(root / "model", layout="diffusers", seed=0)
    other = make_tiny_model_folder(root / "other", layout="diffusers", seed=1)
    data = make_synthetic_dataset(root / "data", num_clips=2, clip_len=9, height=32, width=32, seed=0,
                                  shard_size=1, face_size=32)
    return model, other, data


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_trainer(assets, tmp_path, *overrides, model=None):
    from train.parallel import make_accelerator
    from train.trainer import Trainer

    base, _, data = assets
    model = model or base
    cfg = compose(["data=shards", f"data.urls=[{data}]", "data.clip_len=9", "data.buckets=[[32,32]]",
                   "data.num_workers=0", "train.micro_batch_size=1", f"train.output_dir={tmp_path}", f"model.path={model}",
                   "train.mode=lora", "lora.rank=4", "optim.lr=5e-3", "optim.warmup_steps=0", "train.max_steps=8",
                   "train.checkpoint_every=0", *overrides])
    return Trainer(cfg, make_accelerator(cfg), Path(model), resolve_urls([str(data)]))


def _losses(trainer, n):
    return [trainer.train_step(trainer.next_micro_batches()).loss for _ in range(n)]


def _trained(trainer):
    return {n: p.detach().clone() for n, p in trainer.trainable}


def test_lora_quickstart_checkpoint_and_export_hold_no_frozen_weight(tmp_path):
    """The quick start with train.mode=lora: the checkpoint's model file is the trained tensors
    only; the export is lora.safetensors + adapters.safetensors, no full model."""
    from train.loop import run
    from train.trainable_state import BASE_FILE, fingerprint_base
    from wan_animate.checkpoint import load_dit

    out = tmp_path / "run"
    result = run(compose([f"train.output_dir={out}", "train.mode=lora", "lora.rank=4", "train.max_steps=2",
                          "train.checkpoint_every=0", "train.progress=false", "train.validation=false"]))
    assert result["status"] == "finished"
    base_dir = out / "cache" / "model-tiny-seed0"
    base = load_dit(base_dir / "transformer", dtype=torch.float32)
    frozen = set(base.state_dict())
    ckpt = out / "checkpoints" / "step-2"
    saved = load_file(str(ckpt / "model.safetensors"))
    assert saved and all(".lora_" in k or k.split(".")[0] in ("pose_patch_embedding", "motion_encoder",
                                                               "face_encoder", "face_adapter") for k in saved)
    assert not frozen.intersection(k.replace(".base_layer.", ".") for k in saved if ".lora_" not in k
                                   and not k.split(".")[0] in ("pose_patch_embedding", "motion_encoder",
                                                               "face_encoder", "face_adapter"))
    trunk = [k for k in frozen if k.startswith("blocks.")]
    assert trunk and not any(k in saved or k.replace(".weight", ".base_layer.weight") in saved for k in trunk)
    assert json.loads((ckpt / BASE_FILE).read_text())["sha256"] == fingerprint_base(base_dir)["sha256"]
    assert sorted(p.name for p in (out / "export").iterdir()) == ["README.txt", "adapters.safetensors",
                                                                  "lora.safetensors"]
    model_bytes = sum(p.stat().st_size for p in (base_dir / "transformer").glob("*.safetensors"))
    assert (ckpt / "model.safetensors").stat().st_size < 0.8 * model_bytes


def test_negative_control_full_mode_checkpoint_holds_every_weight(assets, tmp_path):
    trainer = make_trainer(assets, tmp_path, "train.mode=full")
    assert trainer.trainable_ckpt is None
    _losses(trainer, 1)
    path = trainer.save_checkpoint(tmp_path)
    assert set(load_file(str(path / "model.safetensors"))) == set(trainer.raw_dit.state_dict())
    assert not (path / "base_model.json").exists()


def test_trainable_only_resume_is_exact(assets, tmp_path):
    straight = make_trainer(assets, tmp_path / "a", "optim.ema_decay=0.9")
    want = _losses(straight, 4)
    want_weights = _trained(straight)

    first = make_trainer(assets, tmp_path / "b", "optim.ema_decay=0.9")
    assert _losses(first, 2) == want[:2]
    path = first.save_checkpoint(tmp_path / "b")
    assert len(load_file(str(path / "model.safetensors"))) == len(first.trainable)

    resumed = make_trainer(assets, tmp_path / "c", "optim.ema_decay=0.9")
    at_start = _trained(resumed)
    assert resumed.resume(tmp_path / "b") == path and resumed.state.step == 2
    # negative control: the trained tensors came from the checkpoint (a fresh trainer starts elsewhere)
    assert not all(torch.equal(at_start[n], p) for n, p in _trained(resumed).items())
    assert _losses(resumed, 2) == want[2:]  # bit-identical
    got = _trained(resumed)
    assert all(torch.equal(got[n], want_weights[n]) for n in want_weights)
    ema_a, ema_c = straight.ema.state_dict(), resumed.ema.state_dict()
    assert all(torch.equal(ema_a[k], ema_c[k]) for k in ema_a)


def test_resume_on_another_base_is_refused_a_moved_copy_is_not(assets, tmp_path):
    from train.trainable_state import BaseModelChangedError

    base, other, _ = assets
    first = make_trainer(assets, tmp_path / "run", "train.mode=adapters_only")
    _losses(first, 1)
    first.save_checkpoint(tmp_path / "run")

    with pytest.raises(BaseModelChangedError, match=r"fingerprint .*Set model.path to the original base"):
        make_trainer(assets, tmp_path / "x", "train.mode=adapters_only", model=other).resume(tmp_path / "run")

    moved = tmp_path / "moved"
    shutil.copytree(base, moved)
    again = make_trainer(assets, tmp_path / "y", "train.mode=adapters_only", model=moved)
    assert again.resume(tmp_path / "run") is not None and again.state.step == 1


def test_fingerprint_sees_a_changed_tensor(assets, tmp_path):
    from train.trainable_state import fingerprint_base

    base = assets[0]
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    assert fingerprint_base(copy)["sha256"] == fingerprint_base(base)["sha256"]
    (weights,) = (copy / "transformer").glob("*.safetensors")
    state = load_file(str(weights))
    name = sorted(k for k in state if k.startswith("blocks.1."))[0]
    state[name] = state[name].clone()
    state[name].view(-1)[0] += 1e-3  # one value of one tensor
    save_file(state, str(weights))
    assert fingerprint_base(copy)["sha256"] != fingerprint_base(base)["sha256"]


def _loss(model, batch, cfg) -> float:
    model.eval()
    with torch.no_grad():
        return float(flow_matching_loss(model, batch, cfg.loss, generator=torch.Generator().manual_seed(3)).loss)


def test_small_export_and_merged_export_reproduce_the_trained_model(assets, tmp_path):
    from train.export import export
    from wan_animate.checkpoint import load_dit
    from wan_animate.lora import apply_lora
    from wan_animate.model import is_fp32_by_design

    trainer = make_trainer(assets, tmp_path, "train.export_merged=true", "train.export_layouts=[official]")
    _losses(trainer, 2)
    batch = trainer.next_micro_batches()[0]
    want = _loss(trainer.raw_dit, batch, trainer.cfg)
    written = export(trainer.cfg, trainer.acc, trainer.model, trainer.raw_dit, None)
    assert set(written) == {"lora", "adapters", "official"}
    out = tmp_path / "export"

    small = load_dit(assets[0] / "transformer", dtype=torch.float32)
    small.load_state_dict(load_file(str(out / "adapters.safetensors")), strict=False)
    apply_lora(small, out / "lora.safetensors")
    assert _loss(small, batch, trainer.cfg) == pytest.approx(want, rel=1e-5)

    merged = load_dit(out / "official", dtype=None)
    dtypes = {n: p.dtype for n, p in merged.state_dict().items()}
    assert all(d == (torch.float32 if is_fp32_by_design(n) else torch.bfloat16) for n, d in dtypes.items()
               if d.is_floating_point)
    assert _loss(merged.float(), batch, trainer.cfg) == pytest.approx(want, rel=2e-2)
    # negative control: the base alone (no LoRA, no adapters) is measurably another model
    assert _loss(load_dit(assets[0] / "transformer", dtype=torch.float32), batch, trainer.cfg) != pytest.approx(
        want, rel=1e-3)
