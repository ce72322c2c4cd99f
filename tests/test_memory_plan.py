"""The memory planner (train/plan/planner.py) on the shipped presets against known sizes: frozen
weights counted from the model itself, checkpointed inputs, the 24 GB presets' budgets, ZeRO-3
sharding, planning with nothing downloaded. Its peak against a real run's is checked in
tests/test_memory_plan_measured.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import model_config_folder
from train.config import ConfigError, compose
from train.plan.planner import plan_memory, with_overrides
from train.plan.report import GIB
from wan_animate.config import WanAnimateConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_checkpointing_lowers_the_planned_activations(tmp_path):
    """Negative control for the accounting: the same step without checkpointing keeps more."""
    folder = model_config_folder(tmp_path, "m", WanAnimateConfig.preset("tiny", num_layers=4, face_adapter_period=2))
    base = ["experiment=quickstart", f"model.path={folder}", "data.source=cached", "data.urls=[unused]",
            "data.buckets=[[128,128]]", f"train.output_dir={tmp_path / 'o'}"]
    off = plan_memory(compose(base + ["model.activation_checkpointing=false"]), write=False)
    on = plan_memory(compose(base + ["model.activation_checkpointing=true"]), write=False)
    assert on["peak_device_gib"] < off["peak_device_gib"]


@pytest.mark.slow
def test_14b_lora_frozen_weights_and_checkpointed_inputs(tmp_path):
    """The plain 14B LoRA preset as shipped (no swap / fp8 / offload), 832x480 x 77: frozen weights =
    the real frozen parameters' bytes (bf16, the fp32-by-design tables fp32), counted from the model
    directly; activations >= the checkpointed block inputs it keeps (one [B, L, dim] tensor per DiT
    block and face block, in model.checkpoint_dtype); the peak meets the preset budget of 64 GiB."""
    import torch

    from train.modes import setup_trainable
    from wan_animate.model import WanAnimateDiT, set_precision

    mcfg = WanAnimateConfig.preset("14b")
    folder = model_config_folder(tmp_path, "m14", mcfg)
    cfg = compose(["experiment=animate14b_lora", f"model.path={folder}", "data.urls=[unused]",
                   "data.buckets=[[480,832]]", f"train.output_dir={tmp_path / 'out'}"])
    assert not (cfg.model.block_swap or cfg.model.checkpoint_offload) and cfg.model.base_dtype == "bf16"
    plan = plan_memory(cfg, write=True)
    with torch.device("meta"):
        dit = WanAnimateDiT(mcfg)
    set_precision(dit, torch.bfloat16)
    setup_trainable(dit, cfg)
    frozen = sum(p.numel() * p.element_size() for p in dit.parameters() if not p.requires_grad)
    frozen += sum(b.numel() * b.element_size() for b in dit.buffers())
    frozen_params = sum(p.numel() for p in dit.parameters() if not p.requires_grad)
    assert 16.0e9 < frozen_params < 16.8e9
    assert plan["by_category"]["frozen_weights"] == pytest.approx(frozen / GIB, rel=0.01)
    tokens = plan["tokens_per_sample"]
    assert tokens == 21 * 30 * 52
    kept_bytes = {"fp32": 4, "bf16": 2}[cfg.model.checkpoint_dtype]
    block_inputs = (mcfg.num_layers + mcfg.num_layers // mcfg.face_adapter_period) * tokens * mcfg.dim * kept_bytes
    assert plan["by_category"]["activations"] >= block_inputs / GIB
    assert plan["peak_device_gib"] <= 64.0, plan["by_category"]
    written = json.loads((Path(cfg.train.output_dir) / "memory_plan.json").read_text())
    for key in ("peak_device_gib", "by_category", "host_pinned_gib", "world_size", "tokens_per_sample"):
        assert key in written


def test_dry_run_config_needs_no_model_folder_and_no_data():
    """Training the 14B preset is refused without model.path or data.urls (each named); planning it is not."""
    with pytest.raises(ConfigError, match="model.path"):
        compose(["experiment=animate14b_lora", "data.urls=[/x]"])
    with pytest.raises(ConfigError, match="data.urls"):
        compose(["experiment=animate14b_lora", "model.path=/x"])
    cfg = compose(["experiment=animate14b_lora", "train.dry_run=memory"])
    assert cfg.model.path is None and cfg.data.urls == [] and cfg.model.preset == "14b"


SMALL = ["data.buckets=[[64,64]]", "data.clip_len=5", "data.refert_nums=[1]"]


@pytest.fixture(scope="module")
def planned_from_preset(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The documented command (README, docs/memory.md) with no model or data, at a small bucket: its
    process and output folder (one 14B plan, shared by the two tests below)."""
    out = tmp_path_factory.mktemp("dry-run")
    proc = subprocess.run([sys.executable, "-m", "train.main", "experiment=animate14b_lora", "train.dry_run=memory",
                           *SMALL, f"train.output_dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          check=False)
    return proc, out


@pytest.mark.slow
def test_dry_run_command_plans_the_preset_alone(planned_from_preset):
    """The documented command with no model or data: exit 0, verdict printed, memory_plan.json written."""
    out, folder = planned_from_preset
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[plan] verdict:" in out.stdout
    plan = json.loads((folder / "memory_plan.json").read_text())
    assert plan["sources"]["model"] == "preset '14b'" and plan["fits"]


@pytest.mark.slow
def test_plan_needs_nothing_downloaded(tmp_path, planned_from_preset):
    """train.dry_run=memory plans the 14B LoRA preset with no model.path and no data.urls, and a model
    folder holding only its config.json plans the same step: same parameters, same bytes per category."""
    proc, out = planned_from_preset
    assert proc.returncode == 0, proc.stderr[-3000:]
    from_preset = json.loads((out / "memory_plan.json").read_text())
    assert from_preset["sources"]["model"] == "preset '14b'"
    assert from_preset["sources"]["text_encoder"] == "umT5-XXL encoder (published sizes)"
    folder = model_config_folder(tmp_path, "m", WanAnimateConfig.preset("14b"))
    from_folder = plan_memory(compose(["experiment=animate14b_lora", "train.dry_run=memory", f"model.path={folder}",
                                       *SMALL, f"train.output_dir={tmp_path / 'o'}"]), write=False)
    assert from_folder["sources"]["model"] == f"{folder}/config.json"
    for key in ("total_params", "trainable_params", "by_category", "peak_device_gib", "tokens_per_sample"):
        assert from_folder[key] == from_preset[key], key


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["animate14b_lora_24gb", "character_lora_24gb"])
def test_24gb_presets_fit_a_64gb_workstation(tmp_path, preset):
    """The 24 GB presets at 832x480 x 77: <= 22 GiB on the device, <= 32 GiB pinned as allocated
    (exactly the swapped blocks' weights + the 48 bf16 checkpointed block inputs: no power-of-two
    rounding) and <= 48 GiB of host RAM including loading."""
    mcfg = WanAnimateConfig.preset("14b")
    folder = model_config_folder(tmp_path, "m14", mcfg)
    cfg = compose([f"experiment={preset}", f"model.path={folder}", "data.urls=[unused]",
                   "data.buckets=[[480,832]]", f"train.output_dir={tmp_path / 'out'}"])
    plan = plan_memory(cfg, write=True)
    inputs = (mcfg.num_layers + mcfg.num_layers // mcfg.face_adapter_period) * plan["tokens_per_sample"] * mcfg.dim * 2
    assert plan["host_pinned_gib"] == pytest.approx(plan["memory_options"]["host_weight_gib"] + inputs / GIB, rel=0.005)
    assert plan["peak_device_gib"] <= 22.0 and plan["host_pinned_gib"] <= 32.0 and plan["host_ram_gib"] <= 48.0, plan


@pytest.mark.slow
def test_zero3_plan_divides_sharded_state(tmp_path):
    """One rank of 8 under ZeRO-3 holds far less than one rank of 1; config keys are validated."""
    folder = model_config_folder(tmp_path, "m", WanAnimateConfig.preset("tiny", dim=1024, ffn_dim=4096, num_heads=8,
                                                                  num_layers=8))
    cfg = compose(["experiment=quickstart", f"model.path={folder}", "data.source=cached", "data.urls=[unused]",
                   "train.distributed=deepspeed", "train.precision=bf16", f"train.output_dir={tmp_path / 'o'}"])
    one = plan_memory(cfg, world_size=1, write=False)
    eight = plan_memory(with_overrides(cfg, {"train.plan_world_size": 8}), write=False)
    assert eight["world_size"] == 8 and eight["zero_stage"] == 3
    weights = lambda p: p["by_category"].get("trainable_weights", 0.0)
    assert weights(eight) == pytest.approx(weights(one) / 8, rel=0.05)
    assert eight["peak_device_gib"] < one["peak_device_gib"]


def test_planner_config_keys_are_validated():
    with pytest.raises(ConfigError, match="train.dry_run"):
        compose(["train.dry_run=speed"])
    with pytest.raises(ConfigError, match="plan_budget_gib"):
        compose(["train.plan_budget_gib=0"])


def test_pinned_copies_count_as_the_caching_host_allocator_holds_them():
    """``pin_memory()`` goes through CUDA's caching host allocator, which rounds every block up to a
    power of two: a 25 MiB fp8 weight holds 32 MiB, a 320 MiB checkpointed input 512 MiB. The
    planner counts pinned bytes as held."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import torch

    from train.plan.track import LiveBytes

    sizes = [5120 * 5120, 13824 * 5120, 32760 * 5120 * 2]
    tracker = LiveBytes()
    with FakeTensorMode(), tracker:
        kept = [torch.ops.aten._pin_memory.default(torch.empty(n, dtype=torch.uint8)) for n in sizes]
    assert tracker.host_pinned_peak == tracker.host_peak == (32 + 128 + 512) * 2**20
    del kept


def test_planner_materialises_encoders_with_their_shared_weights_shared():
    """umT5's token embedding is one tensor under two names; the planner's fake encoders must not
    count it twice (it did for raw shards: +1.05 B parameters, ~2 GiB of host RAM)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import UMT5Config, UMT5EncoderModel

    from train.plan.planner import _to_empty_keeping_ties, fake_module_conversion

    with torch.device("meta"):
        m = UMT5EncoderModel(UMT5Config(vocab_size=1000, d_model=64, d_kv=8, d_ff=128, num_layers=2, num_heads=8))
    before = sum(p.numel() for p in m.parameters())
    with FakeTensorMode(allow_non_fake_inputs=True), fake_module_conversion():
        _to_empty_keeping_ties(m)
    assert m.shared.weight is m.encoder.embed_tokens.weight
    assert sum(p.numel() for p in m.parameters()) == before


def test_a_preset_narrower_than_the_published_text_encoder_is_refused_in_one_line(tmp_path):
    """Animate-2's tiny preset on raw shards without a model folder: its DiT reads 32-wide text,
    the published umT5 gives 4096; refused by name with both fixes (it was a traceback in the step)."""
    proc = subprocess.run([sys.executable, "-m", "train.main", "model=animate2_tiny", "train.dry_run=memory",
                           f"train.output_dir={tmp_path / 'plan'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "32-wide text" in proc.stderr and "model.path" in proc.stderr and "data=cached" in proc.stderr


def _tiny_tracked_step(tracker_cls) -> "LiveBytes":
    """A small fake step (forward, backward, optimizer, a pinned copy, frees between ops) under ``tracker_cls``."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        tracker = tracker_cls()
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
        optimizer = torch.optim.AdamW(model.parameters())
        with tracker:
            tracker.track(list(model.parameters()), "trainable_weights")
            for phase in ("forward", "backward", "optimizer"):
                if phase == "forward":
                    tracker.phase = "encode"
                    batch = torch.ops.aten._pin_memory.default(torch.empty(32, 64))
                    scratch = torch.empty(1 << 20)
                    tracker.phase = "forward"
                    flat = batch.view(-1)  # a new phase's first op adds nothing: the phase's peak is here
                    del scratch, flat
                    loss = model(batch * 2).square().mean()
                    del batch
                elif phase == "backward":
                    tracker.phase = "backward"
                    loss.backward()
                    del loss
                else:
                    tracker.phase = "optimizer"
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
    return tracker


def test_live_bytes_skips_only_observations_that_cannot_change_a_peak():
    """LiveBytes observes the peaks only after bytes were added or in a new phase, and answers device
    queries itself; the plain tracker (every op observed, device queries dispatched) finds the same peaks."""
    from train.plan.track import LiveBytes

    class EveryOp(LiveBytes):
        def _observe(self):
            self._update_peak()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            import torch

            if func is torch.ops.prim.device.default:
                out = func(*args)
                self.ops += 1
                self._observe()
                return out
            return super().__torch_dispatch__(func, types, args, kwargs)

    fast, plain = _tiny_tracked_step(LiveBytes), _tiny_tracked_step(EveryOp)
    assert fast.peak > 0 and set(fast.peak_by_phase) >= {"encode", "forward", "backward", "optimizer"}
    for key in ("peak", "peak_by_category", "peak_phase", "peak_by_phase", "host_peak", "host_pinned_peak",
                "host_peak_by_phase", "ops"):
        assert getattr(fast, key) == getattr(plain, key), key


def test_planner_materialises_modules_as_to_empty_does():
    """The planner's allocation from size and strides gives what ``Module.to_empty`` gives (fake and real)."""
    import contextlib

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from train.plan.planner import _to_empty

    def build():
        with torch.device("meta"):
            m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 4))
        m[2].weight.requires_grad_(False)
        return m

    def described(m):
        return [(n, type(t), t.shape, t.stride(), t.dtype, t.device, t.requires_grad)
                for n, t in [*m.named_parameters(), *m.named_buffers()]]

    for mode in (lambda: FakeTensorMode(allow_non_fake_inputs=True), contextlib.nullcontext):
        ours, reference = build(), build()  # on meta, outside the fake mode (as the planner builds)
        with mode():
            _to_empty(ours)
            reference.to_empty(device="cpu")
        assert described(ours) == described(reference)


def test_fill_sane_writes_every_element_with_finite_weight_like_values():
    """The real-tensor check's weight fill: every element written (NaN before), finite, std 0.02, any size/dtype."""
    import torch

    from train.plan.planner import _FILL_BLOCK, fill_sane

    nan = float("nan")
    tensors = [torch.full((2 * _FILL_BLOCK + 17,), nan), torch.full((5, 7), nan, dtype=torch.bfloat16),
               torch.full((3,), nan)]
    fill_sane(tensors)
    for t in tensors:
        assert torch.isfinite(t).all()
    assert tensors[0].std().item() == pytest.approx(0.02, rel=0.01)
    assert not torch.equal(tensors[0][:1000], tensors[0][1000:2000])  # not a constant or short period
