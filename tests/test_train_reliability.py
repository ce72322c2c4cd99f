"""Nothing run, nothing lost: planted pickles are refused before DeepSpeed unpickles
them, a NaN streak never prunes the last good checkpoint, a damaged newest checkpoint falls back to
the previous one, checkpoint files are group-readable, data faults are skipped and counted, config
values are checked, DeepSpeed never applies a non-finite gradient. Training runs are in-process
(``train.loop.run``) on the quick-start model, DeepSpeed ones in a helper process
(tests/_ds_nonfinite.py); launch-level faults are in tests/test_train_launch.py;
docs/reliability.md maps each fault to its test."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from conftest import quick_start_cache

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["train.progress=false", "train.validation=false", "train.export=false"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_model):
    return quick_start_cache(tmp_path_factory.mktemp("cache"), tiny_model)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(fresh_accelerate_state):
    yield
    import wandb

    if wandb.run is not None:
        wandb.finish()


def in_process(out: Path, cache: Path, *overrides: str):
    from train.config import compose
    from train.loop import run

    return run(compose([f"train.output_dir={out}", f"train.cache_dir={cache}", *QUIET, *overrides]))


class _OneProcess:
    is_main_process = True
    num_processes = 1
    process_index = 0


class _Payload:
    """Unpickling it creates ``marker`` (stands for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _planted_checkpoint(out: Path, marker: Path) -> Path:
    ckpt = out / "checkpoints" / "step-3"
    (ckpt / "pytorch_model").mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}, "payload": _Payload(marker)},
               ckpt / "pytorch_model" / "mp_rank_00_model_states.pt")
    (ckpt / "COMPLETE").write_text('{"step": 3}')
    return ckpt


# ---------------------------------------------------------------------------- 1. unsafe pickles


def test_planted_pickle_is_refused_before_deepspeed_reads_it(tmp_path):
    from train.checkpoint import store as checkpointing
    from train.checkpoint.verify import UnsafeCheckpointError

    marker = tmp_path / "pwned"
    ckpt = _planted_checkpoint(tmp_path / "run", marker)
    with pytest.raises(UnsafeCheckpointError, match="mp_rank_00_model_states.pt is not a tensor-only pickle"):
        checkpointing.resume_point(_OneProcess(), tmp_path / "run")
    assert not marker.exists()

    # negative control: DeepSpeed's own checkpoint engine (what accelerate.load_state calls) runs it
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    TorchCheckpointEngine().load(str(ckpt / "pytorch_model" / "mp_rank_00_model_states.pt"), map_location="cpu")
    assert marker.exists()


def test_deepspeed_optimizer_globals_are_allowed(tmp_path):
    """The allow-list covers the plain classes DeepSpeed's ZeRO files pickle (and nothing runs)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from train.checkpoint.verify import UnsafeCheckpointError, check_pickles

    folder = tmp_path / "step-1" / "pytorch_model"
    folder.mkdir(parents=True)
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                                         "state": {0: torch.ones(3)}}}, folder / "zero_pp_rank_0_optim_states.pt")
    assert check_pickles(tmp_path / "step-1") == 1
    # a class outside the list is refused even when harmless
    torch.save({"x": _OneProcess()}, folder / "other.pt")
    with pytest.raises(UnsafeCheckpointError, match="_OneProcess"):
        check_pickles(tmp_path / "step-1")


# ---------------------------------------------------------------------------- 2. NaN streak


@pytest.mark.slow  # two quick-start runs (~30-60 s on 2 cores)
def test_nan_streak_never_prunes_the_last_good_checkpoint(tmp_path, cache):
    from train.state import NonFiniteLossError

    out = tmp_path / "nan"
    # lr 1e30: step 1 is finite and its update blows the weights up; every later step is NaN
    with pytest.raises(NonFiniteLossError) as info:
        in_process(out, cache, "train.max_steps=10", "train.checkpoint_every=1", "train.keep_last=1",
                   "optim.lr=1e30", "optim.grad_clip=0", "optim.warmup_steps=0", "train.max_consecutive_nonfinite=3")
    good = out / "checkpoints" / "step-1"
    assert f"Last good checkpoint: {good} (step 1)" in str(info.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # step 4 ends the streak of 3 (it raises before it is logged)

    # negative control: without a checkpoint the message says so
    with pytest.raises(NonFiniteLossError, match="No checkpoint was written before the streak"):
        in_process(tmp_path / "nan0", cache, "train.max_steps=10", "train.checkpoint_every=0", "optim.lr=1e30",
                   "optim.grad_clip=0", "optim.warmup_steps=0", "train.max_consecutive_nonfinite=2")


def test_prune_counts_only_checkpoints_after_a_finite_step(tmp_path):
    from train.checkpoint import store as ck

    root = tmp_path / "checkpoints"
    for step, streak in ((2, 0), (4, 0), (5, 1), (6, 2)):
        (root / f"step-{step}").mkdir(parents=True)
        (root / f"step-{step}" / ck.COMPLETE).write_text(json.dumps({"step": step, "nonfinite_streak": streak}))
    ck.prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-4", "step-5", "step-6"]
    assert ck.last_good(tmp_path)[0] == 4
    assert ck._choose_resume(tmp_path) == root / "step-4"  # the streak's checkpoints are never resumed


# ---------------------------------------------------------------------------- 4. damaged checkpoint


def test_manifest_names_truncated_and_rewritten_files(tmp_path):
    from train.checkpoint.verify import manifest_problem, write_manifest

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "sub" / "b.json").write_text("{}")
    write_manifest(tmp_path)
    assert manifest_problem(tmp_path) is None
    (tmp_path / "a.bin").write_bytes(b"y" * 1000)
    assert "a.bin changed" in manifest_problem(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"x" * 999)
    assert "a.bin has 999 bytes, 1,000 when saved" in manifest_problem(tmp_path)
    (tmp_path / "a.bin").unlink()
    assert "a.bin is missing" in manifest_problem(tmp_path)


@pytest.mark.slow  # two quick-start runs (~30-60 s on 2 cores)
def test_truncated_newest_checkpoint_falls_back_to_previous(tmp_path, cache, capsys):
    out = tmp_path / "run"
    in_process(out, cache, "train.max_steps=4", "train.checkpoint_every=2", "train.keep_last=3")
    newest = out / "checkpoints" / "step-4"
    weights = sorted(newest.glob("*.safetensors"), key=lambda p: p.stat().st_size)[-1]
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    capsys.readouterr()
    summary = in_process(out, cache, "train.max_steps=5", "train.checkpoint_every=2", "train.keep_last=3")
    text = capsys.readouterr().out
    assert f"not resuming from {newest}: {weights.name} has" in text
    assert f"resumed from {out / 'checkpoints' / 'step-2'} (step 2)" in text
    assert summary["step"] == 5

    # every file of a checkpoint is group-readable (safetensors itself writes 0600)
    for path in (out / "checkpoints" / "step-5").rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & stat.S_IRGRP, path


def test_safetensors_writer_alone_is_not_group_readable(tmp_path):
    """Negative control of the permission check above."""
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    finally:
        os.umask(old)
    assert not (tmp_path / "x.safetensors").stat().st_mode & stat.S_IRGRP


# ---------------------------------------------------------------------------- 3. data faults


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data_tools.synthetic_data import make_synthetic_dataset

    out = tmp_path_factory.mktemp("syn")
    return make_synthetic_dataset(out, num_clips=6, clip_len=9, height=32, width=32, seed=0, shard_size=3,
                                  face_size=32)


def _write_tar(path: Path, samples: list[dict]) -> Path:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for field, data in sample.items():
                if field.startswith("__"):
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def faulty_shards(folder: Path, good: Path) -> list[Path]:
    """A zero-byte tar, a truncated tar, and samples whose json is missing / invalid / a list /
    mistyped (every other field valid), in front of the good shards."""
    from wan_animate.samples import read_shard

    folder.mkdir(parents=True, exist_ok=True)
    good_tars = sorted(Path(good).glob("*.tar"))
    template = read_shard(good_tars[0])[0]
    empty = folder / "a-empty.tar"
    empty.write_bytes(b"")
    truncated = folder / "b-truncated.tar"
    data = good_tars[1].read_bytes()
    truncated.write_bytes(data[: len(data) // 2 + 100])
    bad = []
    for key, js in (("nojson", None), ("invalid", b"{not json"), ("list", b"[1, 2]"),
                    ("mistyped", json.dumps({**json.loads(template["json"]), "height": "tall"}).encode())):
        sample = {k: v for k, v in template.items() if k != "json"}
        sample["__key__"] = key
        if js is not None:
            sample["json"] = js
        bad.append(sample)
    badjson = _write_tar(folder / "c-badjson.tar", bad)
    return [empty, truncated, badjson, *good_tars]


def _spec(urls, **kw):
    from train.config import DataConfig
    from train.data import StreamSpec

    cfg = DataConfig(source="shards", urls=[str(u) for u in urls], clip_len=5, refert_nums=[1], shuffle_buffer=0,
                     max_skipped_fraction=0.9, **kw)
    return StreamSpec(urls=[str(u) for u in urls], cfg=cfg, micro_batch_size=1, seed=3, face_size=32)


def test_data_faults_are_skipped_counted_and_explained(shards, tmp_path, capsys):
    from train.data import BatchIterator

    urls = faulty_shards(tmp_path / "bad", shards)
    it = BatchIterator(_spec(urls))
    keys = [next(it)[0]["key"] for _ in range(8)]  # more than one pass over the 4-6 good clips
    assert not any(k in ("nojson", "invalid", "list", "mistyped") for k in keys)
    text = " | ".join(it.reasons)
    for expected in ("a-empty.tar", "b-truncated.tar", "nojson", "invalid: sample 'invalid': json field is not "
                     "valid JSON", "list: sample 'list': json field is a list", "mistyped: sample 'mistyped': json "
                     "'height' is 'tall'"):
        assert expected in text, (expected, text)
    assert it.skipped >= 6 and it.state_dict()["skipped"] == it.skipped
    printed = capsys.readouterr().out
    assert printed.count("[train] data (rank 0): skipped") == BatchIterator.PRINTED
    assert "further faults are counted in data/skipped" in printed

    # resume: the counts at the same position equal the uninterrupted stream's
    straight = BatchIterator(_spec(urls))
    for _ in range(3):
        next(straight)
    state = straight.state_dict()
    resumed = BatchIterator(_spec(urls), start_batch=state["position"], skipped=state["skipped"], seen=state["seen"])
    for _ in range(5):
        next(straight), next(resumed)
    assert resumed.state_dict() == straight.state_dict()


def test_data_faults_negative_control(shards):
    """The same good shards alone: nothing skipped; the json faults alone used to crash the stream."""
    from train.data import BatchIterator

    it = BatchIterator(_spec(sorted(Path(shards).glob("*.tar"))))
    for _ in range(8):
        next(it)
    assert it.skipped == 0 and it.reasons == []


def test_only_bad_data_stops_with_the_reasons(tmp_path, shards):
    from train.data import BatchIterator

    empty, _, badjson = faulty_shards(tmp_path / "bad", shards)[:3]  # no readable sample at all
    urls = [empty, badjson]
    with pytest.raises(RuntimeError, match="gave no batch.*json field is a list"):
        next(BatchIterator(_spec(urls)))


# ---------------------------------------------------------------------------- 7. config checks


@pytest.mark.parametrize("override, message", [
    ("optim.lr=nan", "optim.lr=nan must be finite"),
    ("optim.lr=-1", "optim.lr=-1.0 must be >= 0"),
    ("optim.eps=0", "optim.eps=0.0 must be > 0"),
    ("optim.weight_decay=inf", "optim.weight_decay=inf must be finite"),
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0"),
    ("optim.grad_clip=nan", "optim.grad_clip=nan must be finite"),
    ("loss.shift=inf", "loss.shift=inf must be finite"),
    ("loss.shift=0", "loss.shift=0.0 must be > 0"),
    ("data.face_size=-8", "data.face_size=-8 must be 0"),
    ("optim.betas=[0.9,nan]", "optim.betas=[0.9, nan] must be finite"),
])
def test_config_values_are_one_line_errors(override, message):
    from train.config import ConfigError, compose

    with pytest.raises(ConfigError) as info:
        compose([override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_config_negative_control_and_model_path(tmp_path):
    from train.config import ConfigError, check_paths, compose

    cfg = compose(["optim.lr=3e-4", "optim.eps=1e-6", "loss.shift=3", "data.face_size=32"])  # in range: accepted
    check_paths(cfg)
    with pytest.raises(ConfigError, match=f"model.path={tmp_path / 'nope'} does not exist"):
        check_paths(compose([f"model.path={tmp_path / 'nope'}"]))
    with pytest.raises(ConfigError, match="model.preset=14b without model.path"):
        compose(["experiment=animate14b_lora", "data.urls=[/data/x]"])


@pytest.mark.slow  # one quick-start run on shards with validation and export (~40-80 s on 2 cores)
def test_undecodable_validation_sample_skips_validation_not_the_export(tmp_path, cache, shards, capsys):
    empty, truncated, badjson, *good = faulty_shards(tmp_path / "bad", shards)
    urls = ",".join(str(u) for u in (badjson, empty, truncated, *good))  # validation renders urls[0]: bad json
    out = tmp_path / "run"
    summary = in_process(out, cache, "data.source=shards", f"data.urls=[{urls}]", "data.shuffle_buffer=0",
                         "train.max_steps=2", "train.checkpoint_every=0", "train.validation=true",
                         "train.validation_steps=1", "train.export=true", "data.max_skipped_fraction=0.9")
    text = capsys.readouterr().out
    assert "[train] validation at step 2 skipped: its sample does not load (SampleDecodeError" in text
    assert summary["status"] == "finished" and summary["exports"]
    assert (out / "export").is_dir() and summary["validation_video"] is None
    exported = list((out / "export").rglob("*.safetensors"))
    assert exported and all(p.stat().st_mode & stat.S_IRGRP for p in exported)  # exports group-readable too
    assert summary["data_skipped"] >= 1 and summary["data_skip_reasons"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["data_skipped"] == summary["data_skipped"]


def _fake_ds_accelerator(ds_config: dict):
    from types import SimpleNamespace

    plugin = SimpleNamespace(deepspeed_config=ds_config)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=1)


def test_deepspeed_json_cannot_switch_off_the_nonfinite_check():
    from train.config import ConfigError, compose
    from train.parallel import _fill_deepspeed_config

    cfg = compose(["train.precision=bf16"])
    for bad, message in (({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}, "compute_grad_norm=false"),
                         ({"bf16": {"enabled": "auto", "check_grad_overflow": False}}, "check_grad_overflow=false")):
        with pytest.raises(ConfigError, match=message):
            _fill_deepspeed_config(_fake_ds_accelerator(bad), cfg)
    ds = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}  # negative control: accepted, check on
    _fill_deepspeed_config(_fake_ds_accelerator(ds), cfg)
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True}


def _ds_phases(cache: Path, precision: str, **outs: Path) -> dict[str, dict]:
    """Run the helper's phases (``phase=output folder``) in one process, in order; their records by phase."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(ROOT / "tests/_ds_nonfinite.py"), str(cache), precision, str(port),
                        *(f"{phase}={out}" for phase, out in outs.items())],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    records = [json.loads(l[len("RESULT "):]) for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert [r["phase"] for r in records] == list(outs), p.stdout[-3000:]
    return {r["phase"]: r for r in records}


@pytest.mark.slow  # DeepSpeed ZeRO-2 on CPU: fp32 two helper processes (straight, resume), bf16 one
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deepspeed_skips_nonfinite_gradients_and_resumes_exactly(tmp_path, cache, precision):
    out = tmp_path / "ds"
    # bf16: the negative control runs after the straight run, in the same helper process
    runs = _ds_phases(cache, precision, straight=out, **({"unchecked": tmp_path / "unchecked"} if precision == "bf16" else {}))
    straight = runs["straight"]
    assert straight["skipped"] == [False, True, False, False, False]  # step 2's gradient is inf/NaN
    assert straight["changed"] == [True, False, True, True, True]  # ... and its update never happened
    assert all(straight["finite_weights"]) and straight["total_nonfinite"] == 1
    assert all(l == l for l in straight["loss"])  # the loss itself stayed finite: only the gradient path skipped
    if precision == "bf16":
        assert "torch.bfloat16" in straight["weight_dtypes"]  # DeepSpeed's bf16 engine trained bf16 weights
        # negative control: with DeepSpeed's check off (refused by the trainer) step 2 reaches the weights
        unchecked = runs["unchecked"]
        assert unchecked["changed"][1] and not all(unchecked["finite_weights"])
        return
    resumed = _ds_phases(cache, precision, resume=out)["resume"]  # a fresh process; passes the pickle check on a real DeepSpeed checkpoint
    assert resumed["resumed_from"] == str(out / "checkpoints" / "step-3")
    assert resumed["loss"] == straight["loss"][3:]  # bit-exact after a skipped step
