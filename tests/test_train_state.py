"""Trainable-only training state: in lora / adapters_only modes a checkpoint
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

from conftest import make_tiny_assets
from train.config import compose
from train.data import resolve_urls
from wan_animate.objective import flow_matching_loss


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Two tiny model folders (same architecture, different weights) + 2 synthetic clips."""
    (model, other), data = make_tiny_assets(tmp_path_factory.mktemp("assets"), model_seeds=(0, 1))
    return model, other, data


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(fresh_accelerate_state):
    yield


def make_trainer(assets, tmp_path, *overrides, model=None, data=None):
    from train.parallel import make_accelerator
    from train.trainer import Trainer

    base, _, raw = assets
    model, data = model or base, data or raw
    group = next((o for o in overrides if o.startswith("data=")), "data=shards")  # one data group
    overrides = tuple(o for o in overrides if o != group)
    cfg = compose([group, f"data.urls=[{data}]", "data.clip_len=9", "data.buckets=[[32,32]]",
                   "data.num_workers=0", "train.micro_batch_size=1", f"train.output_dir={tmp_path}",
                   f"model.path={model}", "train.mode=lora", "lora.rank=4", "optim.lr=5e-3", "optim.warmup_steps=0", "train.max_steps=8",
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
    from train.checkpoint.trainable import BASE_FILE, fingerprint_base
    from wan_animate.weights.load import load_dit

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
    from train.checkpoint.trainable import BaseModelChangedError

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
    from train.checkpoint.trainable import fingerprint_base

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
    from train.checkpoint.export import export
    from wan_animate.weights.load import load_dit
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


class _NewHostBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of the CPU storages created inside the block that are still alive (weakly tracked)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = torch.utils.weak.WeakIdKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}  # views / aliases of a storage that existed before
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage() not in self.seen
                    and t.untyped_storage().data_ptr() not in inputs):
                st, n = t.untyped_storage(), t.untyped_storage().nbytes()
                self.seen[st] = weakref.finalize(st, self._free, n)
                self.live += n
                self.peak = max(self.peak, self.live)
        return out

    def _free(self, n):
        self.live -= n


def test_full_export_is_bf16_without_an_fp32_copy_of_the_model(assets, tmp_path):
    """train.mode=full writes the released dtype (bf16, fp32-by-design tensors fp32) from weights held
    in bf16 (what a DeepSpeed bf16 engine gathers) without building an fp32 copy of the model."""
    from train.checkpoint.export import export
    from wan_animate.weights.load import load_dit
    from wan_animate.model import is_fp32_by_design

    trainer = make_trainer(assets, tmp_path, "train.mode=full", "train.export_layouts=[official]")
    trainer.raw_dit.to(torch.bfloat16)  # every tensor bf16, as ZeRO-3 holds (and gathers) them
    bf16_bytes = sum(t.numel() * 2 for t in trainer.raw_dit.state_dict().values())
    fp32_by_design = sum(t.numel() * 4 for n, t in trainer.raw_dit.state_dict().items() if is_fp32_by_design(n))
    with _NewHostBytes() as new:
        written = export(trainer.cfg, trainer.acc, trainer.model, trainer.raw_dit, None)
    assert set(written) == {"official"}
    dtypes = {n: t.dtype for n, t in load_dit(tmp_path / "export" / "official", dtype=None).state_dict().items()}
    assert all(d == (torch.float32 if is_fp32_by_design(n) else torch.bfloat16) for n, d in dtypes.items())
    # new host bytes: the fp32-by-design tensors cast up and transients of the writer, well under one
    # bf16 copy of the model (an fp32 copy of the gathered model is 2x bf16_bytes)
    assert fp32_by_design <= new.peak < 0.5 * bf16_bytes, (new.peak, fp32_by_design, bf16_bytes)


def _export_wait_rank(rank: int, port: int, out: str, wait: str) -> None:
    """One of 2 gloo ranks whose collective timeout (2 s) is shorter than rank 0's write (4 s)."""
    import datetime
    import time
    from types import SimpleNamespace

    import torch.distributed as dist

    from train.checkpoint.export import on_rank0

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=2))
    acc = SimpleNamespace(num_processes=2, is_main_process=rank == 0)

    def write():
        time.sleep(4)
        return {"official": "written"}

    try:
        if wait == "store":
            got = on_rank0(acc, write, timeout_s=60)
        else:  # the barrier every rank used to wait in
            got = write() if rank == 0 else {}
            dist.barrier()
        dist.barrier()  # together again after the export
        Path(out, f"{rank}.json").write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wait", ["store", "barrier"])
def test_other_ranks_wait_for_the_export_beyond_the_collective_timeout(tmp_path, wait):
    import multiprocessing
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_export_wait_rank, args=(r, port, str(tmp_path), wait)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    done = sorted(p.name for p in tmp_path.glob("*.json"))
    if wait == "store":
        assert done == ["0.json", "1.json"]
        assert json.loads((tmp_path / "1.json").read_text()) == {}  # rank 0 alone reports what it wrote
    else:  # negative control: a barrier under the collective timeout fails on the waiting rank
        assert "1.json" not in done


# ---------------------------------------------------------------------------- frozen encoders placement


class _EncoderSpy:
    """Counts encoder constructions and tracks which encoders are inside their device context."""

    def __init__(self, monkeypatch):
        import contextlib

        from wan_animate import encoders

        self.built, self.active, self.entered = 0, 0, 0
        self.active_during_dit: list[int] = []
        init, on_device = encoders._FrozenEncoder.__init__, encoders._FrozenEncoder._on_device
        spy = self

        def counting_init(enc, *a, **kw):
            spy.built += 1
            init(enc, *a, **kw)

        @contextlib.contextmanager
        def tracked(enc):
            with on_device(enc) as module:
                spy.active += 1
                spy.entered += 1
                try:
                    yield module
                finally:
                    spy.active -= 1

        monkeypatch.setattr(encoders._FrozenEncoder, "__init__", counting_init)
        monkeypatch.setattr(encoders._FrozenEncoder, "_on_device", tracked)

    def watch(self, dit):
        dit.register_forward_pre_hook(lambda *_: self.active_during_dit.append(self.active))


def test_cached_training_builds_no_encoder_until_validation_asks(assets, tmp_path, monkeypatch):
    from data_tools.cache_latents import cache_latents
    from data_tools.config import CacheLatentsConfig
    from wan_animate.pipeline import AnimatePipeline

    model, _, data = assets
    pipe = AnimatePipeline.from_pretrained(model, dtype=torch.float32, device="cpu")
    cache_latents(CacheLatentsConfig(input=str(data), output=str(tmp_path / "cached"), model=str(model),
                                     device="cpu", dtype="fp32", refert_nums=[0, 1]),
                  progress=False, encoders=(pipe.vae, pipe.text_encoder, pipe.image_encoder))
    spy = _EncoderSpy(monkeypatch)
    trainer = make_trainer(assets, tmp_path / "run", "data=cached", "data.buckets=[]", data=tmp_path / "cached")
    _losses(trainer, 1)
    assert spy.built == 0  # no VAE / umT5 / CLIP for the training steps
    assert trainer.raw_dit.training
    val = trainer.pipe  # what validation asks for: loaded now, parked on the host
    assert spy.built == 3 and trainer.raw_dit.training
    assert all(e.offload for e in (val.vae, val.text_encoder, val.image_encoder))


def test_raw_shards_encode_on_the_device_only_between_dit_steps(assets, tmp_path, monkeypatch):
    from train.frozen_encoders import placement

    spy = _EncoderSpy(monkeypatch)
    trainer = make_trainer(assets, tmp_path / "run")
    encs = (trainer.pipe.vae, trainer.pipe.text_encoder, trainer.pipe.image_encoder)
    assert spy.built == 3
    assert all(e.offload and e.device == trainer.device for e in encs)  # model.encoders_device=device
    spy.watch(trainer.raw_dit)
    _losses(trainer, 1)
    assert spy.entered >= 3 and spy.active == 0  # every encoder ran and went back to the host
    assert spy.active_during_dit and set(spy.active_during_dit) == {0}  # none on the device in the DiT step
    assert all(p.device.type == "cpu" for e in encs for p in e.module.parameters())
    # model.encoders_device=cpu: encoders compute on the host and never move
    host = compose(["model.encoders_device=cpu"])
    assert placement(host, torch.device("cuda")) == (torch.device("cpu"), False)
    assert placement(compose([]), torch.device("cuda")) == (torch.device("cuda"), True)
    # negative control: a DiT forward inside an encoder's device context is seen by the spy
    batch = trainer.next_micro_batches()[0]
    spy.active_during_dit.clear()
    with trainer.pipe.vae._on_device():
        _loss(trainer.raw_dit, batch, trainer.cfg)
    assert spy.active_during_dit == [1]


# ---------------------------------------------------------------------------- DeepSpeed

ROOT = Path(__file__).resolve().parents[1]

_DS_SCRIPT = r'''
import os, sys, torch
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
import deepspeed
from deepspeed.utils import safe_get_full_fp32_param
from train.deepspeed_precision import Fp32ByDesign
from wan_animate.config import WanAnimateConfig
from wan_animate.lora import add_lora
from wan_animate.model import WanAnimateDiT, is_fp32_by_design
from wan_animate.parallel import skip_deepspeed_shm_op

restore = sys.argv[2] == "restore"
skip_deepspeed_shm_op()
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
cfg = WanAnimateConfig.preset("tiny")
dit = WanAnimateDiT(cfg)
with torch.no_grad():
    for n, p in dit.named_parameters():
        if is_fp32_by_design(n):
            p.add_(1e-4 * torch.randn_like(p))  # values bf16 cannot hold
add_lora(dit, rank=4)
for n, p in dit.named_parameters():
    p.requires_grad_(".lora_" in n or n.startswith("face_adapter"))  # lora mode + trained adapters
keep = Fp32ByDesign(dit)
opt = torch.optim.AdamW([p for p in dit.parameters() if p.requires_grad], lr=1e-3)
ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
      "zero_optimization": {"stage": 2}, "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9}
eng, opt, _, _ = deepspeed.initialize(model=dit, optimizer=opt, config=ds)
if restore:
    keep.restore(eng.module, 2)
frozen = trained = 0
for n, p in eng.module.named_parameters():
    if n not in keep.saved:
        continue
    if p.requires_grad:
        trained += torch.equal(safe_get_full_fp32_param(p).cpu(), keep.saved[n])
    else:
        frozen += p.dtype == torch.float32 and torch.equal(p, keep.saved[n])
g, b, f, s = torch.Generator().manual_seed(1), torch.bfloat16, 2, cfg.motion_encoder_size
x = [torch.randn(1, cfg.out_dim, f + 1, 4, 4, generator=g), torch.tensor([611.0]),
     torch.randn(1, 512, cfg.text_dim, generator=g), torch.randn(1, 257, cfg.image_dim, generator=g),
     torch.randn(1, cfg.in_dim - cfg.out_dim, f + 1, 4, 4, generator=g),
     torch.randn(1, cfg.out_dim, f, 4, 4, generator=g), torch.rand(1, 3, 4 * f - 3, s, s, generator=g) * 2 - 1]
loss = eng(*[t if i == 1 else t.to(b) for i, t in enumerate(x)]).float().pow(2).mean()
eng.backward(loss)
eng.step()
print("RESULT", len(keep.saved), frozen, trained, float(loss))
'''


def _ds_run(mode: str) -> list[float]:
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _DS_SCRIPT, str(port), mode], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    return [float(v) for v in line.split()[1:]]


@pytest.mark.slow
def test_deepspeed_bf16_keeps_the_fp32_by_design_tensors():
    """A DeepSpeed ZeRO-2 bf16 engine (1 CPU process, in a subprocess): after ``Fp32ByDesign.restore``
    the frozen tables are fp32 with their exact values, the trained ones' fp32 masters hold the exact
    values, and a step runs; without it (negative control) DeepSpeed has cast them all to bf16."""
    total, frozen, trained, loss = _ds_run("restore")
    assert total > 10 and frozen + trained == total and trained >= 1 and loss == loss
    total, frozen, trained, _ = _ds_run("plain")
    assert frozen == 0 and trained < total


def _launch_zero2(out: Path, cache: Path) -> None:
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "launch/accelerate/cpu_2proc_zero2.yaml"), "--num_processes", "1", "--main_process_port",
           str(port), str(ROOT / "train/main.py"), f"train.output_dir={out}", f"train.cache_dir={cache}",
           "train.mode=lora", "lora.rank=4", "train.max_steps=4", "train.checkpoint_every=2", "train.progress=false",
           "train.validation=false", "data.num_workers=0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.slow
def test_deepspeed_zero2_trainable_only_checkpoint_resumes_exactly(tmp_path):
    """`accelerate launch` + DeepSpeed ZeRO-2 (1 CPU process), train.mode=lora: the engine's module
    file holds the trained tensors only (exclude_frozen_parameters), and a rerun from step 2 gives
    the straight run's losses bit for bit."""
    from train.checkpoint.trainable import BASE_FILE

    cache, straight, resumed = tmp_path / "cache", tmp_path / "a", tmp_path / "b"
    _launch_zero2(straight, cache)
    module_file = straight / "checkpoints" / "step-2" / "pytorch_model" / "mp_rank_00_model_states.pt"
    full = sum(p.stat().st_size for p in (cache / "model-tiny-seed0" / "transformer").glob("*.safetensors"))
    assert module_file.stat().st_size < 0.5 * full  # fp32 trainables (~30% of the tiny DiT), no frozen weight
    assert (straight / "checkpoints" / "step-2" / BASE_FILE).is_file()
    # a run killed after its step-2 checkpoint: same folder without what came later
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-4")
    for later in ("summary.json", "export"):
        shutil.rmtree(resumed / later, ignore_errors=True) if (resumed / later).is_dir() else (
            resumed / later).unlink(missing_ok=True)
    lines = (straight / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    _launch_zero2(resumed, cache)
    steps = [json.loads(l) for l in (resumed / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(l) for l in lines]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["loss/train"] for r in steps] == [r["loss/train"] for r in want]
    assert all(r["time"] > want[1]["time"] for r in steps[2:])  # steps 3-4 really ran again


@pytest.mark.parametrize("world", [3, 4, 7])
def test_zero3_fp32_master_restore_when_the_size_does_not_divide_the_world(world):
    """ZeRO-3 pads each parameter to ceil(numel / world) per rank. Restoring the fp32-by-design
    master values must fill every rank's partition, the last ones too (DeepSpeed's own setter
    narrows past the end of the unpadded value there). DeepSpeed's ZeRO-3 setter runs on stand-in
    partitions, one rank at a time."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    from train.deepspeed_precision import Fp32ByDesign

    value = torch.randn(10)
    part = -(-value.numel() // world)
    partitions = []
    for rank in range(world):
        class Opt:  # the partition bookkeeping of a ZeRO-3 optimizer, for one rank
            set_full_hp_param = DeepSpeedZeroOptimizer_Stage3.set_full_hp_param

            def __init__(self):
                self.partition = torch.full((part,), -1.0)

            def _get_fp32_opt_state_partition(self, param, release_swap_buffers, optim_state_key=None):
                return self.partition, 0

            def _get_param_partition_rank(self, param, rank=rank):
                return rank

            def _swappable_optimizer_subgroup(self, group):
                return False

        head = torch.nn.Module()
        head.modulation = torch.nn.Parameter(value.clone())
        model = torch.nn.Module()
        model.head = head
        keep = Fp32ByDesign(model)
        head.modulation.data = head.modulation.data.to(torch.bfloat16)  # the engine's cast
        head.modulation.ds_id, head.modulation.ds_numel, head.modulation._z3_optimizer = 0, value.numel(), Opt()
        assert keep.restore(model, stage=3)["master_fp32"] == 1
        partitions.append(head.modulation._z3_optimizer.partition)
    full = torch.cat(partitions)
    assert torch.equal(full[: value.numel()], value)
    assert (full[value.numel():] == -1).all()  # padding untouched
