"""What learns: adapters_only leaves every trunk weight bit-identical, LoRA trains only factors +
adapters with per-group LRs, frozen encoders get no gradients and never enter the optimizer; every
experiment preset composes and instantiates; bad configs fail before any model loads.

The trainable-set tests build a ``train.trainer.Trainer`` in-process and call its ``train_step``
(the step the real runs take), so nothing here re-implements the update."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_assets
from train.config import ConfigError, compose
from train.data import StreamSpec, ShardStream
from train.data import resolve_urls
from train.modes import is_adapter, make_optimizer, setup_trainable
from wan_animate.batch import build_dit_inputs
from wan_animate.model import ADAPTER_PREFIXES
from wan_animate.objective import flow_matching_loss

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["quickstart", "adapters_only", "animate14b_full", "animate14b_lora", "character_lora"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny model folder + 2 synthetic clips, the quick start's assets."""
    from wan_animate.pipeline import AnimatePipeline

    (model,), data = make_tiny_assets(tmp_path_factory.mktemp("assets"))
    return model, data, AnimatePipeline


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(fresh_accelerate_state):
    yield


def make_trainer(assets, tmp_path, *overrides):
    """An in-process Trainer on the module's tiny model and 2 synthetic clips (batch of 2)."""
    from train.parallel import make_accelerator
    from train.trainer import Trainer

    model, data, _ = assets
    cfg = compose(["data=shards", f"data.urls=[{data}]", "data.clip_len=9", "data.buckets=[[32,32]]",
                   "data.num_workers=0", "train.micro_batch_size=2", f"train.output_dir={tmp_path / 'run'}",
                   f"model.path={model}", *overrides])
    return Trainer(cfg, make_accelerator(cfg), Path(model), resolve_urls([str(data)]))


def _steps(trainer, n=2):
    return [trainer.train_step(trainer.next_micro_batches()) for _ in range(n)]


def _pipe(assets):
    model, _, AnimatePipeline = assets
    pipe = AnimatePipeline.from_pretrained(model, dtype=torch.float32, device="cpu")
    pipe.dit.train()
    return pipe


def _encoder_params(enc):
    for attr in ("module", "model", "vae"):
        m = getattr(enc, attr, None)
        if isinstance(m, torch.nn.Module):
            return list(m.parameters())
    return [p for v in vars(enc).values() if isinstance(v, torch.nn.Module) for p in v.parameters()]


def test_adapters_only_keeps_trunk_bit_identical_and_encoders_frozen(assets, tmp_path):
    trainer = make_trainer(assets, tmp_path, "experiment=adapters_only")
    pipe = trainer.pipe
    before = {k: v.clone() for k, v in trainer.raw_dit.state_dict().items()}
    enc_before = {id(p): p.detach().clone() for enc in (pipe.vae, pipe.text_encoder, pipe.image_encoder)
                  for p in _encoder_params(enc)}
    results = _steps(trainer)
    assert not any(r.skipped for r in results)
    groups, opt = trainer.groups, trainer.optimizer
    after = trainer.raw_dit.state_dict()
    changed_adapters = 0
    for name, value in after.items():
        if name.split(".", 1)[0] in ADAPTER_PREFIXES:
            changed_adapters += int(not torch.equal(value, before[name]))
        else:
            assert torch.equal(value, before[name]), f"trunk weight {name} moved in adapters_only"
    assert changed_adapters > 0
    assert [g["name"] for g in groups] == ["adapters"]
    # frozen encoders: no grad, untouched, not in the optimizer
    opt_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    for enc in (pipe.vae, pipe.text_encoder, pipe.image_encoder):
        params = list(_encoder_params(enc))
        assert params
        for p in params:
            assert not p.requires_grad and p.grad is None and id(p) not in opt_ids
            assert torch.equal(p, enc_before[id(p)])


def test_negative_control_full_mode_moves_the_trunk(assets, tmp_path):
    trainer = make_trainer(assets, tmp_path, "train.mode=full")
    before = {k: v.clone() for k, v in trainer.raw_dit.state_dict().items() if k.startswith("blocks.")}
    _steps(trainer, n=1)
    after = trainer.raw_dit.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items())


def test_lora_mode_trains_factors_and_adapters_with_their_own_lr(assets, tmp_path):
    from wan_animate.weights.load import load_dit

    # warmup 0 + constant schedule: the groups' LRs stay the configured ones
    trainer = make_trainer(assets, tmp_path, "train.mode=lora", "lora.rank=4", "optim.lr=1e-3",
                           "optim.adapter_lr=5e-4", "optim.warmup_steps=0")
    base = load_dit(Path(assets[0]) / "transformer", dtype=torch.float32).state_dict()
    _steps(trainer)
    groups, summary, dit = trainer.groups, trainer.summary, trainer.raw_dit
    assert {g["name"]: g["lr"] for g in groups} == {"lora": 1e-3, "adapters": 5e-4}
    assert summary["lora_targets"] == 12 * dit.config.num_layers
    for name, p in dit.named_parameters():
        trainable = ".lora_" in name or is_adapter(name)
        assert p.requires_grad == trainable, name
        if not trainable:
            assert torch.equal(p, base[name.replace(".base_layer.", ".")]), name
    lora_b = [p for n, p in dit.named_parameters() if ".lora_B." in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # B left its zero init


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_instantiates(preset, assets):
    from wan_animate.config import WanAnimateConfig
    from wan_animate.model import WanAnimateDiT

    _, data, _ = assets
    overrides = [f"experiment={preset}"]
    if preset.startswith(("animate14b", "character")):
        overrides += ["model.preset=tiny", "data=shards", f"data.urls=[{data}]", "data.clip_len=9",
                      "data.buckets=[[32,32]]", "data.num_workers=0"]
    cfg = compose(overrides)
    assert cfg.experiment_name == preset
    dit = WanAnimateDiT(WanAnimateConfig.preset(cfg.model.preset))
    groups, summary = setup_trainable(dit, cfg)
    assert summary["trainable_params"] > 0
    make_optimizer(groups, cfg.optim)
    full = compose([f"experiment={preset}", "model.path=/models/x", "data.urls=[/data/x]"]
                   if preset != "quickstart" and preset != "adapters_only" else [f"experiment={preset}"])
    if preset.startswith("animate14b") or preset == "character_lora":
        assert full.model.preset == "14b" and full.train.precision == "bf16" and full.model.activation_checkpointing
    if preset == "animate14b_full":
        assert full.train.mode == "full" and full.train.distributed == "deepspeed"
    if preset in ("animate14b_lora", "character_lora"):
        assert full.train.mode == "lora"


@pytest.mark.parametrize("override, fix", [
    ("train.max_steps=0", "train.max_steps"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("optim.lr=-1", "optim.lr"),
    ("data.clip_len=8", "4n+1"),
    ("train.mode=partial", "train.mode"),
])
def test_invalid_values_are_rejected_with_the_fix(override, fix):
    with pytest.raises(ConfigError, match=re.escape(fix)):
        compose([override])


def test_impossible_combinations_are_rejected():
    with pytest.raises(ConfigError, match="model.path"):
        compose(["experiment=animate14b_full", "data.urls=[/x]"])
    with pytest.raises(ConfigError, match="data.urls"):
        compose(["data=shards"])
    with pytest.raises(ConfigError, match="train.mode=lora"):
        compose(["lora.init_from=/x.safetensors"])


def test_main_rejects_bad_config_before_loading_a_model(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, str(ROOT / "train/main.py"), f"train.output_dir={tmp_path}/o",
                        "train.grad_accum=0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "train.grad_accum=0 must be >= 1" in p.stderr
    assert not (tmp_path / "o" / "cache").exists()  # nothing was built or loaded


def test_replace_mode_and_temporal_reference_reach_the_condition(assets, tmp_path):
    """Samples with bg+mask become replace-mode conditions; given frames set the mask channels."""
    from data_tools.synthetic_data import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "repl", num_clips=1, clip_len=9, height=32, width=32, seed=1,
                                  shard_size=1, face_size=32, replace=True)
    pipe = _pipe(assets)
    ys = {}
    for name, extra in (("animate0", ["data.replace_prob=0", "data.temporal_ref_prob=0"]),
                        ("animate1", ["data.replace_prob=0", "data.temporal_ref_prob=1", "data.refert_nums=[1]"]),
                        ("replace0", ["data.replace_prob=1", "data.temporal_ref_prob=0"])):
        cfg = compose(["data=shards", f"data.urls=[{data}]", "data.clip_len=9", "data.buckets=[]",
                       "data.num_workers=0", *extra])
        spec = StreamSpec(urls=resolve_urls(cfg.data.urls), cfg=cfg.data, micro_batch_size=1, seed=0, face_size=32)
        ex = next(iter(ShardStream(spec)))["examples"]
        assert ex[0]["mode"] == ("replace" if name.startswith("replace") else "animate")
        ys[name] = build_dit_inputs(ex, pipe, torch.device("cpu"), torch.float32, 9)["y"]
    mask = {k: v[:, :4, 1:] for k, v in ys.items()}  # target-slot mask channels
    assert mask["animate0"].sum() == 0
    assert mask["animate1"][:, :, 0].min() == 1 and mask["animate1"][:, :, 1:].sum() == 0  # frame 0 given
    assert 0 < mask["replace0"].mean() < 1  # environment given, character not
    assert not torch.equal(ys["animate0"][:, 4:], ys["replace0"][:, 4:])  # background latent present


def test_cached_shards_give_the_same_inputs_as_raw_encoding(assets, tmp_path):
    """data.source=cached (data_tools.cache_latents output) feeds the DiT the latents the raw path
    would compute on the fly, without running any encoder."""
    from data_tools.cache_latents import cache_latents
    from data_tools.config import CacheLatentsConfig

    model, data, _ = assets
    pipe = _pipe(assets)
    cache_latents(CacheLatentsConfig(input=str(data), output=str(tmp_path / "cached"), model=str(model),
                                     device="cpu", dtype="fp32", refert_nums=[0, 1]),
                  progress=False, encoders=(pipe.vae, pipe.text_encoder, pipe.image_encoder))
    common = ["data.clip_len=9", "data.buckets=[]", "data.num_workers=0", "data.temporal_ref_prob=1",
              "data.refert_nums=[1]", "data.text_dropout=0", "data.face_dropout=0"]
    raw_cfg = compose(["data=shards", f"data.urls=[{data}]", *common])
    cached_cfg = compose(["data=cached", f"data.urls=[{tmp_path / 'cached'}]", *common])
    batches = {}
    for name, cfg in (("raw", raw_cfg), ("cached", cached_cfg)):
        spec = StreamSpec(urls=resolve_urls(cfg.data.urls), cfg=cfg.data, micro_batch_size=1, seed=0,
                          face_size=32, default_size=(32, 32))
        ex = next(iter(ShardStream(spec)))["examples"]
        batches[name] = build_dit_inputs(ex, None if name == "cached" else pipe, torch.device("cpu"),
                                         torch.float32, 9)
    raw, cached = batches["raw"], batches["cached"]
    assert raw["keys"] == cached["keys"]  # same sample, same seeded choices
    for k in ("latents", "y", "pose_latents", "context", "clip_fea", "face_pixel_values", "face_region"):
        assert raw[k].shape == cached[k].shape, k
        assert torch.allclose(raw[k], cached[k], atol=1e-4), k
    assert cached["face_region"].sum() > 0  # face up-weighting also works on cached data
    out = flow_matching_loss(pipe.dit, cached, compose([]).loss, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)


# ---------------------------------------------------------------------------- Trainer in-process


def test_train_step_in_process_updates_and_reports(assets, tmp_path):
    trainer = make_trainer(assets, tmp_path, "train.mode=full", "optim.warmup_steps=0", "train.grad_accum=2")
    before = {n: p.detach().clone() for n, p in trainer.trainable}
    batches = trainer.next_micro_batches()
    assert len(batches) == 2 and all(b["latents"].shape[0] == 2 for b in batches)
    result = trainer.train_step(batches)
    assert result.step == trainer.state.step == 1 and not result.skipped
    assert result.loss == result.loss and result.loss > 0 and result.grad_norm > 0
    assert result.samples == 4 and len(result.keys) == 4 and result.lr == pytest.approx(1e-3)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.trainable)
    assert all(p.grad is None for _, p in trainer.trainable)  # zeroed after the update
    assert trainer.data.position == 2  # two micro-batches consumed
    with pytest.raises(ValueError, match="train.grad_accum=2"):
        trainer.train_step(batches[:1])


def test_nonfinite_gradient_skips_the_update_and_counts(assets, tmp_path):
    trainer = make_trainer(assets, tmp_path, "train.mode=adapters_only", "optim.warmup_steps=0",
                           "train.max_consecutive_nonfinite=2", "optim.ema_decay=0.5")
    batches = trainer.next_micro_batches()
    with torch.no_grad():  # a NaN weight makes the loss and every gradient NaN
        next(p for _, p in trainer.trainable).view(-1)[0] = float("nan")
    weights = {n: p.detach().clone() for n, p in trainer.trainable}
    ema = trainer.ema.state_dict()
    result = trainer.train_step(batches)
    assert result.skipped and result.loss != result.loss and trainer.state.total_nonfinite == 1
    assert trainer.scheduler.last_epoch == 0  # the schedule does not advance on a skipped step
    assert all(torch.equal(p.nan_to_num(), weights[n].nan_to_num()) for n, p in trainer.trainable)
    assert all(torch.equal(v, ema[k]) for k, v in trainer.ema.state_dict().items())
    from train.state import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="2 optimizer steps in a row"):
        trainer.train_step(trainer.next_micro_batches())


def test_state_dict_restores_the_lr_scheduler_without_replay(assets, tmp_path):
    overrides = ("train.mode=adapters_only", "optim.scheduler=cosine", "optim.warmup_steps=2",
                 "train.max_steps=8", "train.checkpoint_every=0", "optim.min_lr_ratio=0.1", "optim.ema_decay=0.9")
    a = make_trainer(assets, tmp_path / "a", *overrides)
    _steps(a, n=3)
    a.state.step += 1  # as if one more step had been skipped: 4 steps taken, 3 scheduler steps
    state = a.state_dict()
    assert state["scheduler"]["last_epoch"] == 3 and state["train"]["step"] == 4

    b = make_trainer(assets, tmp_path / "b", *overrides)
    b.load_state_dict(state)
    assert b.state.step == 4
    assert b.scheduler.state_dict() == a.scheduler.state_dict()
    saved_lrs = [g["lr"] for g in a.optimizer.param_groups]
    assert [g["lr"] for g in b.optimizer.param_groups] == saved_lrs
    a.scheduler.step()
    b.scheduler.step()
    assert b.scheduler.get_last_lr() == a.scheduler.get_last_lr()
    assert b.data.position == a.data.position == 3
    assert all(torch.equal(v, a.ema.state_dict()[k]) for k, v in b.ema.state_dict().items())
    assert torch.equal(b.generator.get_state(), a.generator.get_state())
    # negative control: replaying the schedule from the step count (the old resume) lands elsewhere
    c = make_trainer(assets, tmp_path / "c", *overrides)
    c.load_state_dict({**state, "scheduler": None})
    assert c.scheduler.last_epoch == 4 and c.optimizer.param_groups[0]["lr"] != saved_lrs[0]


def _previous_factor(step, scheduler, warmup, total, floor):
    """The hand-written LR factor this project used before diffusers' schedules (reference)."""
    import math

    if warmup and step < warmup:
        return (step + 1) / warmup
    if scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if scheduler == "cosine" else 1.0 - progress
    return floor + (1 - floor) * shape


@pytest.mark.parametrize("scheduler", ["constant", "cosine", "linear"])
def test_lr_schedule_keeps_the_previous_values(scheduler):
    from train.config import Config, OptimConfig, TrainSettings
    from train.modes import lr_factor_fn

    for warmup in (0, 1, 3, 10):
        for total in (1, 3, 10, 25):
            for floor in (0.0, 0.1):
                cfg = Config(optim=OptimConfig(scheduler=scheduler, warmup_steps=warmup, min_lr_ratio=floor),
                             train=TrainSettings(max_steps=total, checkpoint_every=0))
                factor = lr_factor_fn(cfg)
                got = [factor(s) for s in range(total + 1)]
                want = [_previous_factor(s, scheduler, warmup, total, floor) for s in range(total + 1)]
                assert got == pytest.approx(want, rel=1e-12, abs=1e-15), (warmup, total, floor)
    # negative control: diffusers' own warmup starts at lr 0, the previous (kept) one at lr / warmup
    from diffusers.optimization import get_scheduler

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    assert get_scheduler(scheduler, opt, num_warmup_steps=3, num_training_steps=10).lr_lambdas[0](0) != \
        _previous_factor(0, scheduler, 3, 10, 0.0) or scheduler == "constant"


def test_entry_points_run_without_path_edits(tmp_path):
    """`python train/main.py` and `python -m train.main` from another folder, without PYTHONPATH
    (the package is installed), reach config validation."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    for argv in ([str(ROOT / "train/main.py")], ["-m", "train.main"]):
        p = subprocess.run([sys.executable, *argv, f"train.output_dir={tmp_path}/o", "train.grad_accum=0"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stderr[-2000:]
        assert "train.grad_accum=0 must be >= 1" in p.stderr
