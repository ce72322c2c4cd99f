"""Nothing lost, nothing silently wrong: resume with changed settings, damaged checkpoints and
pruning, a rerun that would mix two runs, metrics history under a kill, signals in the final
phase, untrustworthy shard metadata, a full disk. Training runs are in-process (``train.loop.run``)
on the quick-start model; docs/reliability.md maps each fault to its test (``F``)."""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
from pathlib import Path

import pytest
import torch

# the in-process run and its fixtures are the reliability tests' own
from test_train_reliability import QUIET, _fresh_accelerate_state, cache, in_process  # noqa: E402,F401


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- metrics history


def _metrics_file(path: Path, steps: int) -> bytes:
    lines = [json.dumps({"step": s, "time": 1.0, "loss/train": 0.5, "pad": "x" * 200}) + "\n" for s in range(1, steps + 1)]
    path.write_text("".join(lines))
    return path.read_bytes()


@pytest.mark.parametrize("limit", [0, 1, 4096, 60_000])
def test_metrics_history_survives_a_kill_during_the_resume_rewrite(tmp_path, monkeypatch, limit):
    """A resume drops the records after its checkpoint. A process stopped part-way through that
    rewrite (here: the kernel refuses writes past ``limit`` bytes, as a kill or a full disk would
    stop it) must leave the whole history, not a prefix. (Rewriting in place left 0 bytes of a
    67 MB file.)"""
    from train.metrics import MetricsLogger

    monkeypatch.setitem(sys.modules, "wandb", None)  # no wandb files under the limit
    path = tmp_path / "metrics.jsonl"
    before = _metrics_file(path, 400)  # ~90 kB
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        with pytest.raises(OSError):
            MetricsLogger(tmp_path, enabled=True, wandb_on=False, project="p", config={}, resume_step=300)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left
    # the same resume with room to write: steps after 300 dropped, the rest byte-identical
    MetricsLogger(tmp_path, enabled=True, wandb_on=False, project="p", config={}, resume_step=300)
    assert path.read_bytes() == b"".join(before.splitlines(keepends=True)[:300])


def test_torn_metrics_line_is_dropped_at_resume_and_ignored_when_read(tmp_path, monkeypatch):
    from train.metrics import MetricsLogger, read_metrics

    monkeypatch.setitem(sys.modules, "wandb", None)
    path = tmp_path / "metrics.jsonl"
    whole = _metrics_file(path, 5)
    with open(path, "ab") as f:
        f.write(b'{"step": 6, "loss/tr')  # killed mid-append
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    MetricsLogger(tmp_path, enabled=True, wandb_on=False, project="p", config={}, resume_step=10)
    assert path.read_bytes() == whole  # nothing after the torn line is glued to it


# ---------------------------------------------------------------------------- signals in the final phase

FINAL = ["train.max_steps=2", "train.checkpoint_every=0", "train.validation=true", "train.validation_steps=1",
         "train.export=true"]


def _signal_during(monkeypatch, name: str) -> None:
    """``train.loop.<name>`` receives SIGTERM while it runs (the signal arrives mid-phase)."""
    import train.loop as loop

    real = getattr(loop, name)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, name, signalled)


@pytest.fixture
def sigterm_must_not_escape():
    """Where the run's own handlers are gone, SIGTERM would kill the trainer; here it fails the test."""
    def escaped(signum, frame):
        raise AssertionError("SIGTERM reached the process's default handler: the trainer would have died")

    old = signal.signal(signal.SIGTERM, escaped)
    yield
    signal.signal(signal.SIGTERM, old)


@pytest.mark.slow  # two quick-start runs with validation and export (~1-2 min on 2 busy cores)
def test_sigterm_during_final_validation_stops_cleanly_and_the_rerun_exports(tmp_path, cache, monkeypatch,
                                                                              sigterm_must_not_escape, capsys):
    out = tmp_path / "run"
    _signal_during(monkeypatch, "validate")
    summary = in_process(out, cache, *FINAL)
    assert summary["status"] == "preempted (SIGTERM)"
    assert json.loads((out / "summary.json").read_text())["status"] == "preempted (SIGTERM)"
    assert not (out / "export").exists()  # no partial export
    assert "SIGTERM before the final export: skipped" in capsys.readouterr().out
    monkeypatch.undo()
    first_loss = summary["final_loss"]
    summary = in_process(out, cache, *FINAL)  # the rerun resumes at step 2 and only validates / exports
    assert summary["status"] == "finished" and summary["exports"]
    assert summary["final_loss"] == first_loss  # the logged loss of step 2, not NaN
    assert all(Path(p).exists() for p in summary["exports"].values())
    assert f"resumed from {out / 'checkpoints' / 'step-2'} (step 2)" in capsys.readouterr().out
    assert steps_logged(out) == [1, 2]


def test_sigterm_during_the_export_completes_it(tmp_path, cache, monkeypatch, sigterm_must_not_escape, capsys):
    out = tmp_path / "run"
    _signal_during(monkeypatch, "export")
    summary = in_process(out, cache, *FINAL, "train.validation=false")
    assert summary["status"] == "finished"
    written = json.loads((out / "summary.json").read_text())
    assert written["status"] == "finished" and all(Path(p).exists() for p in written["exports"].values())
    assert "SIGTERM during the final phase: it completed" in capsys.readouterr().out


# ---------------------------------------------------------------------------- a finished run to resume

RUN = ["train.max_steps=4", "train.checkpoint_every=2", "train.keep_last=2"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache):
    """A quick-start run of 4 steps with checkpoints step-2 and step-4 (copied by each test)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    in_process(out, cache, *RUN)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def _no_model_load(monkeypatch):
    """Fail the test if a model starts loading (refusals must come before)."""
    import train.loop

    def load(*a, **k):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(train.loop, "Trainer", load)


def _tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


# ---------------------------------------------------------------------------- resume with changed settings


def test_resume_applies_changed_optimizer_settings(finished_run, tmp_path, cache, capsys):
    """The restored optimizer / scheduler states carried the old lr, betas, eps and weight_decay:
    a resume with new ones trained on with the old ones while saying they changed."""
    from train.config import compose
    from train.modes import lr_factor_fn

    out = _copy(finished_run, tmp_path)
    new = ["optim.lr=0.01", "optim.weight_decay=0.1", "optim.betas=[0.8,0.9]", "optim.eps=1e-6"]
    in_process(out, cache, *RUN, "train.max_steps=5", *new)
    text = capsys.readouterr().out
    assert "optimizer settings from this launch applied over the checkpoint's: trunk lr 0.001 -> 0.01" in text
    assert "weight_decay 0.0 -> 0.1" in text and "eps 1e-08 -> 1e-06" in text and "betas" in text
    factor = lr_factor_fn(compose([*RUN, "train.max_steps=5"]))
    lr = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]["optim/lr"]
    assert lr == pytest.approx(0.01 * factor(5))
    groups = torch.load(out / "checkpoints" / "step-5" / "optimizer.bin", weights_only=True)["param_groups"]
    assert {(g["initial_lr"], tuple(g["betas"]), g["eps"], g["weight_decay"]) for g in groups} == {(0.01, (0.8, 0.9), 1e-6, 0.1)}
    state = json.loads((out / "checkpoints" / "step-5" / "trainer_state.json").read_text())
    assert state["scheduler"]["base_lrs"] == [0.01] * len(groups)


def test_resume_refuses_what_a_checkpoint_cannot_follow_before_loading(finished_run, tmp_path, cache, monkeypatch):
    from train.config import ConfigError

    out = _copy(finished_run, tmp_path)
    before = _tree(out)
    _no_model_load(monkeypatch)
    with pytest.raises(ConfigError, match=r"train.micro_batch_size \(1 -> 2: the saved data position counts batches"):
        in_process(out, cache, *RUN, "train.max_steps=6", "train.micro_batch_size=2")
    assert _tree(out) == before


@pytest.mark.parametrize("change, refused", [
    (["lora.rank=8"], "lora.rank (16 -> 8"),
    (["lora.alpha=64"], "lora.alpha (None -> 64.0"),
    (["lora.train_adapters=false"], "lora.train_adapters (True -> False"),
    (["lora.targets=[self_attn.q]"], "lora.targets"),
    (["optim.name=adamw8bit"], "optim.name (adamw -> adamw8bit"),
    (["lora.alpha=16"], None),  # alpha null means alpha = rank: the same scale
    (["lora.dropout=0.1", "optim.lr=0.5"], None),  # applied
])
def test_lora_changes_a_resume_cannot_follow(change, refused):
    from train.checkpoint.resume_settings import refusals
    from train.config import compose, config_to_dict

    saved = config_to_dict(compose(["train.mode=lora"]))
    found = refusals(saved, compose(["train.mode=lora", *change]))
    if refused is None:
        assert found == []
    else:
        assert len(found) == 1 and found[0].startswith(refused), found


# ---------------------------------------------------------------------------- damaged checkpoints and pruning


def test_damaged_newest_checkpoint_is_moved_aside_and_never_prunes_good_ones(finished_run, tmp_path, cache, capsys):
    """keep_last=1 with a damaged newest checkpoint: it used to count as the newest, so every new
    checkpoint was pruned as soon as written (a kill then restarted the run from 0)."""
    out = _copy(finished_run, tmp_path)
    (out / "summary.json").unlink()  # as if killed after the step-4 checkpoint
    _truncate(out / "checkpoints" / "step-4" / "optimizer.bin")
    in_process(out, cache, "train.max_steps=3", "train.checkpoint_every=1", "train.keep_last=1")
    text = capsys.readouterr().out
    assert "not resuming from" in text and "moved to damaged-step-4" in text
    assert f"resumed from {out / 'checkpoints' / 'step-2'} (step 2)" in text
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["damaged-step-4", "step-3"]
    from train.checkpoint.store import _choose_resume

    assert _choose_resume(out) == out / "checkpoints" / "step-3"  # the good new one is what a rerun resumes


@pytest.mark.parametrize("manifest", [True, False])
def test_no_usable_checkpoint_is_refused_not_restarted(finished_run, tmp_path, cache, monkeypatch, manifest):
    """Every optimizer.bin truncated: the run used to restart from step 0 and overwrite them."""
    from train.checkpoint.store import NoUsableCheckpointError

    out = _copy(finished_run, tmp_path)
    for ckpt in (out / "checkpoints").iterdir():
        _truncate(ckpt / "optimizer.bin")
        if not manifest:
            (ckpt / "MANIFEST.json").unlink()
    before = _tree(out)
    _no_model_load(monkeypatch)
    with pytest.raises(NoUsableCheckpointError) as e:
        in_process(out, cache, *RUN, "train.max_steps=6")
    text = str(e.value)
    assert "\n" not in text and "step-4: optimizer.bin" in text and "step-2: optimizer.bin" in text
    assert ("truncated or damaged" in text) != manifest and "could run code" not in text
    assert "train.overwrite=true" in text
    assert _tree(out) == before  # nothing changed


def test_no_usable_checkpoint_is_one_line_from_the_command_line(finished_run, tmp_path, cache):
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out = _copy(finished_run, tmp_path)
    for ckpt in (out / "checkpoints").iterdir():
        _truncate(ckpt / "optimizer.bin")
    p = subprocess.run([sys.executable, "-m", "train.main", f"train.output_dir={out}", f"train.cache_dir={cache}",
                        *QUIET, *RUN, "train.max_steps=6"], cwd=root, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=str(root)))
    assert p.returncode == 1, p.stderr[-3000:]
    assert p.stderr.strip().startswith("[train] error: no checkpoint in ") and "\n" not in p.stderr.strip()


@pytest.mark.parametrize("name", ["optimizer.bin", "model.safetensors"])
def test_damaged_file_without_manifest_falls_back_with_one_clear_line(finished_run, tmp_path, name):
    """Checkpoints written before manifests: a truncated optimizer.bin was refused as a pickle
    that 'could run code'; a truncated model.safetensors raised SafetensorError at load."""
    from train.checkpoint.store import _choose_resume

    out = _copy(finished_run, tmp_path)
    for ckpt in (out / "checkpoints").iterdir():
        (ckpt / "MANIFEST.json").unlink()
    _truncate(out / "checkpoints" / "step-4" / name)
    assert _choose_resume(out) == out / "checkpoints" / "step-2"
    assert (out / "checkpoints" / "damaged-step-4" / name).exists()


def test_unsafe_pickle_is_still_refused_when_damage_is_told_apart(tmp_path):
    """Negative control: a pickle of code stays an UnsafeCheckpointError, not 'damaged'."""
    from train.checkpoint.verify import DamagedCheckpointError, UnsafeCheckpointError, check_pickles

    torch.save({"f": Path}, tmp_path / "optimizer.bin")
    with pytest.raises(UnsafeCheckpointError, match="it pickles pathlib"):
        check_pickles(tmp_path)
    torch.save({"x": torch.zeros(3)}, tmp_path / "optimizer.bin")
    _truncate(tmp_path / "optimizer.bin")
    with pytest.raises(DamagedCheckpointError, match="optimizer.bin is truncated or damaged"):
        check_pickles(tmp_path)


# ---------------------------------------------------------------------------- starting over in a used folder


def test_resume_false_in_a_used_folder_is_refused_and_overwrite_moves_the_run_aside(finished_run, tmp_path, cache,
                                                                                   monkeypatch, capsys):
    """train.resume=false wrote a new step-2 next to the old step-4 and truncated metrics.jsonl;
    the next plain rerun then 'resumed' the old run."""
    from train.config import ConfigError

    out = _copy(finished_run, tmp_path)
    before = _tree(out)
    with monkeypatch.context() as m:
        _no_model_load(m)
        with pytest.raises(ConfigError, match="train.resume=false but train.output_dir=.* holds a run .*train.overwrite=true"):
            in_process(out, cache, *RUN, "train.max_steps=2", "train.resume=false")
    assert _tree(out) == before
    summary = in_process(out, cache, "train.max_steps=2", "train.checkpoint_every=2", "train.overwrite=true")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and _tree(aside[0]) == before  # the old run, whole
    assert summary["step"] == 2 and steps_logged(out) == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]


# ---------------------------------------------------------------------------- a full disk during a save


def test_full_disk_during_a_checkpoint_is_one_line_and_the_rerun_resumes(finished_run, tmp_path, cache, monkeypatch):
    """The kernel refuses writes past 4 KiB while the step-5 checkpoint is written (a full disk):
    torch used to raise its C++ traceback. Now one line, no temporary folder, step-4 untouched."""
    from accelerate import Accelerator

    from train.checkpoint.store import CheckpointSaveError

    out = _copy(finished_run, tmp_path)
    (out / "summary.json").unlink()
    real = Accelerator.save_state

    def save_state_on_a_full_disk(self, *args, **kwargs):
        old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, old_limit[1]))
        try:
            return real(self, *args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
            signal.signal(signal.SIGXFSZ, old_handler)

    with monkeypatch.context() as m:
        m.setattr(Accelerator, "save_state", save_state_on_a_full_disk)
        with pytest.raises(CheckpointSaveError) as e:
            in_process(out, cache, *RUN, "train.max_steps=5", "train.checkpoint_every=1")
    text = str(e.value)
    assert text.startswith("checkpoint step-5 could not be written (") and "\n" not in text and "frame #" not in text
    assert "step-4 is untouched" in text and "resume from step 4" in text
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert not list(out.glob(".run.lock*"))
    summary = in_process(out, cache, *RUN, "train.max_steps=5", "train.checkpoint_every=1")
    assert summary["step"] == 5 and steps_logged(out) == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------- shard metadata vs decoded video


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data_tools.synthetic_data import make_synthetic_dataset

    return Path(make_synthetic_dataset(tmp_path_factory.mktemp("syn"), num_clips=3, clip_len=9, height=32, width=32,
                                       seed=0, shard_size=3, face_size=32))


def _stream(urls, **kw):
    from train.config import DataConfig
    from train.data import BatchIterator, StreamSpec

    default_size = kw.pop("default_size", None)
    cfg = DataConfig(source="shards", urls=[str(u) for u in urls], clip_len=5, refert_nums=[1], shuffle_buffer=0,
                     max_skipped_fraction=0.9, **kw)
    return BatchIterator(StreamSpec(urls=[str(u) for u in urls], cfg=cfg, micro_batch_size=1, seed=3, face_size=32,
                                    default_size=default_size))


def test_shard_json_size_that_lies_about_the_video_is_skipped_counted_and_explained(shards, tmp_path):
    """A 32x32 clip whose json said 64x64 trained upscaled (1024x32: as strips), without a word."""
    import io
    import tarfile

    from wan_animate.samples import read_shard

    template = read_shard(sorted(shards.glob("*.tar"))[0])[0]
    meta = json.loads(template["json"])
    bad = tmp_path / "a-lying.tar"
    with tarfile.open(bad, "w") as tar:
        for key, (h, w) in (("says64", (64, 64)), ("says1024", (1024, 32))):
            for field, data in template.items():
                if field.startswith("__"):
                    continue
                if field == "json":
                    data = json.dumps({**meta, "height": h, "width": w}).encode()
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    it = _stream([bad, *sorted(shards.glob("*.tar"))])
    batches = [next(it) for _ in range(4)]
    assert all(ex["video"].shape[-2:] == (32, 32) for b in batches for ex in b)
    assert not any(ex["key"].startswith("says") for b in batches for ex in b)
    assert it.skipped == 2
    text = " | ".join(it.reasons)
    assert "says64: sample 'says64': json says 64x64, mp4 frames are 32x32" in text
    assert "says1024: sample 'says1024': json says 1024x32" in text


def test_quick_start_header_names_the_resolution_it_trains_at(shards):
    """The synthetic quick start with data.buckets=[[16,16]] printed 32x32 and trained 16x16."""
    from train.config import compose
    from train.preflight import read_data_facts, training_sizes

    cfg = compose(["data.buckets=[[16,16]]"])
    assert cfg.data.source == "synthetic"
    printed = training_sizes(cfg, read_data_facts([str(u) for u in sorted(shards.glob("*.tar"))]))
    it = _stream(sorted(shards.glob("*.tar")), buckets=[[16, 16]],
                 default_size=(cfg.data.synthetic_height, cfg.data.synthetic_width))
    trained = {tuple(ex["video"].shape[-2:]) for _ in range(3) for ex in next(it)}
    assert printed == sorted(trained) == [(16, 16)]
    # without buckets the synthetic size is both printed and trained
    assert training_sizes(compose([]), read_data_facts([str(u) for u in sorted(shards.glob("*.tar"))])) == [(32, 32)]
