"""The model-family seam (``wan_animate.family``): Wan-Animate-14B is the default family and is
recognised from its checkpoints; a second family (``tests/_fake_family.py``: a toy denoiser driven
by the pose stream alone, with its own config, checkpoint layout, encoders, batch building and
forward) trains through the unchanged ``train.trainer.Trainer`` and is planned by the memory
planner from its preset, with nothing in ``train/`` knowing it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from train.config import ConfigError, compose

FAKE = "_fake_family:FAMILY"


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(fresh_accelerate_state):
    yield


@pytest.fixture(scope="module")
def toy_assets(tmp_path_factory):
    from _fake_family import write_model_folder
    from data_tools.synthetic_data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("toy")
    data = make_synthetic_dataset(root / "data", num_clips=2, clip_len=9, height=32, width=32, seed=0,
                                  shard_size=1, face_size=32)
    return write_model_folder(root / "model"), Path(data)


def _toy_trainer(toy_assets, tmp_path, *overrides):
    from train.data import resolve_urls
    from train.parallel import make_accelerator
    from train.trainer import Trainer

    model, data = toy_assets
    cfg = compose([f"model.family={FAKE}", f"model.path={model}", "data=shards", f"data.urls=[{data}]",
                   "data.clip_len=9", "data.buckets=[[32,32]]", "data.num_workers=0", "train.micro_batch_size=2",
                   "optim.lr=1e-2", "optim.adapter_lr=1e-3", f"train.output_dir={tmp_path / 'run'}", *overrides])
    return Trainer(cfg, make_accelerator(cfg), model, resolve_urls([str(data)]))


def test_wan_animate_is_the_default_family_and_is_recognised_from_its_checkpoints(tmp_path):
    from wan_animate.family import ModelFamily, family_of, get_family
    from wan_animate.testing import make_tiny_model_folder

    assert compose([]).model.family == "animate"
    family = get_family("animate")
    assert isinstance(family, ModelFamily)
    for layout in ("diffusers", "official"):
        folder = make_tiny_model_folder(tmp_path / layout, layout=layout)
        assert family_of(folder) is family
        dit = family.load(family.dit_path(folder), dtype=torch.float32, device="cpu")
        assert family_of(dit) is family
    with pytest.raises(ConfigError, match="model.family='nope'"):
        compose(["model.family=nope"])
    with pytest.raises(ValueError, match="no model family"):
        family_of(__import__("_fake_family").FAMILY.build(__import__("_fake_family").ToyConfig()))


def test_a_second_family_trains_through_the_unchanged_trainer(toy_assets, tmp_path):
    """Full fine-tuning of the toy family: its adapter group gets optim.adapter_lr, the data recipe
    gives it the pose stream only (no face crops), its own forward makes the loss, and every
    parameter moves."""
    trainer = _toy_trainer(toy_assets, tmp_path, "train.mode=full")
    assert type(trainer.raw_dit).__name__ == "ToyDenoiser"
    assert {g["name"]: g["initial_lr"] for g in trainer.optimizer.param_groups} == {"trunk": 1e-2, "adapters": 1e-3}
    before = {n: p.detach().clone() for n, p in trainer.raw_dit.named_parameters()}
    batches = trainer.next_micro_batches()
    assert set(batches[0]) == {"latents", "pose_latents", "noise_seeds", "keys"}
    results = [trainer.train_step(batches)] + [trainer.train_step(trainer.next_micro_batches()) for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(r.loss)) and not r.skipped for r in results)
    assert trainer.state.step == 3
    moved = {n for n, p in trainer.raw_dit.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved == set(before)
    # the data recipe read the family's streams: pose cropped to the bucket, no face crop made
    example = next(trainer.data)[0]
    assert example["pose"].shape[-2:] == (32, 32) and "face" not in example


def test_a_second_family_gets_its_own_lora_targets_and_adapters(toy_assets, tmp_path):
    trainer = _toy_trainer(toy_assets, tmp_path, "train.mode=lora", "lora.rank=2")
    trained = {n for n, p in trainer.raw_dit.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n or n.startswith("pose_in.") for n in trained)
    assert {n.split(".lora_")[0] for n in trained if ".lora_" in n} == {"blocks.0.proj", "blocks.1.proj"}
    assert trainer.summary["lora_targets"] == 2
    result = trainer.train_step(trainer.next_micro_batches())
    assert not result.skipped and torch.isfinite(torch.tensor(result.loss))


def test_the_planner_plans_a_second_family_from_its_preset(tmp_path):
    from train.plan.planner import plan_memory

    cfg = compose([f"model.family={FAKE}", "model.preset=toy", "data=cached", "data.clip_len=9",
                   "data.buckets=[[64,64]]", "train.dry_run=memory", f"train.output_dir={tmp_path}"])
    plan = plan_memory(cfg, write=False)
    params = sum(p.numel() for p in __import__("_fake_family").FAMILY.build(
        __import__("_fake_family").ToyConfig()).parameters())
    assert plan["sources"]["model"] == "preset 'toy'"
    assert plan["trainable_params"] == params
    assert plan["tokens_per_sample"] == (1 + 3) * 8 * 8  # reference slot + 3 latent frames, patch 1x1x1
    assert plan["peak_by_phase_gib"].keys() >= {"forward", "backward", "optimizer"}  # the step ran


def test_preflight_reads_a_second_family_model_folder(toy_assets):
    """The run header and config.json's model record come from the family's config and layout."""
    from _fake_family import ToyConfig

    from train.preflight import latent_geometry, model_facts

    model, _ = toy_assets
    config, layout = model_facts(model, FAKE)
    assert isinstance(config, ToyConfig) and config.num_layers == ToyConfig().num_layers and layout == "toy"
    assert latent_geometry(9, (32, 32), config) == ((16, 4, 4, 4), 4 * 4 * 4)
    assert model_facts(model) == (None, None)  # not a registered family: nothing recognises its names
