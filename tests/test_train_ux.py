"""A new user's first run: the ``[train]`` header says what will train before any model
loads, bad combinations stop early with the fix, an output folder holds one run (another launch
is refused, config.json records what was loaded and is never replaced), a finished run is a no-op,
every JSON is strict, cached training validates too, and third-party start-up noise is dropped.

Unit tests on the tiny model folder and synthetic shards; one in-process run of 2 steps."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import make_tiny_assets
from train.config import ConfigError, compose


def _strict_load(path: Path):
    """``json.loads`` that refuses NaN / Infinity (what strict JSON parsers do)."""
    def bad(token):
        raise ValueError(f"non-strict JSON constant {token} in {path}")
    return json.loads(Path(path).read_text(), parse_constant=bad)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny model folder + 3 synthetic clips (13 frames, 32x32) in 2 shards, with a manifest."""
    root = tmp_path_factory.mktemp("ux")
    (model,), data = make_tiny_assets(root, num_clips=3, clip_len=13, shard_size=2)
    return SimpleNamespace(root=root, model=model, data=data)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(fresh_accelerate_state):
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:  # a run stopped by an exception leaves it open
        wandb.finish()


def _cfg(assets, out: Path, *overrides: str):
    return compose(["data=shards", f"data.urls=[{assets.data}]", "data.clip_len=9", "data.buckets=[]",
                    "data.num_workers=0", f"model.path={assets.model}", f"train.output_dir={out}",
                    "train.progress=false", *overrides])


def _urls(assets):
    from train.data import resolve_urls

    return resolve_urls([str(assets.data)])


# ---------------------------------------------------------------------------- header + early checks


def test_header_names_resolution_clip_latents_tokens_data_and_effective_batch(assets, tmp_path):
    from train.preflight import model_facts, read_data_facts, run_header

    facts = read_data_facts(_urls(assets))
    assert (facts.kind, facts.shards, facts.samples, facts.num_frames) == ("raw", 2, 3, 13)
    assert facts.sizes == [(32, 32)]
    dit_config, layout = model_facts(assets.model)
    assert layout == "diffusers" and dit_config.patch_size == (1, 2, 2)
    cfg = _cfg(assets, tmp_path, "train.micro_batch_size=2", "train.grad_accum=3", "data.buckets=[[64,64]]")
    text = "\n".join(run_header(cfg, facts, world=4, dit_config=dit_config, data_parallel=4))
    assert "shards=2 samples=3 stored at 32x32, 13 frames" in text
    # clip_len 9 -> 3 latent frames + the reference slot; 64x64 -> 8x8 latents -> 4x4 patches
    assert "resolution: 64x64 clip_len=9 latent=[16, 4, 8, 8] tokens/sample=64" in text
    assert "2 micro x 3 accum x 4 data-parallel = 24 samples/step" in text


def test_bucket_upscale_warning_says_how_much_and_the_override(assets, tmp_path):
    from train.preflight import read_data_facts, upscale_warnings

    facts = read_data_facts(_urls(assets))
    warn = upscale_warnings(_cfg(assets, tmp_path, "data.buckets=[[64,96],[96,64]]"), facts)
    assert len(warn) == 1
    assert "32x32 clips are enlarged 3.00x to the 64x96 bucket (6.0x the pixels" in warn[0], warn
    assert "data.buckets=[[32,32]]" in warn[0]
    # negative controls: the data's own size, or no buckets, warn about nothing
    assert upscale_warnings(_cfg(assets, tmp_path, "data.buckets=[[32,32]]"), facts) == []
    assert upscale_warnings(_cfg(assets, tmp_path), facts) == []


def test_clip_len_longer_than_the_shards_fails_with_the_fix(assets, tmp_path):
    from train.preflight import check_data, read_data_facts

    facts = read_data_facts(_urls(assets))
    with pytest.raises(ConfigError, match=r"data.clip_len=17 is longer than the data .*13-frame clips.*"
                                          r"set data.clip_len=13"):
        check_data(_cfg(assets, tmp_path, "data.clip_len=17"), facts)
    check_data(_cfg(assets, tmp_path, "data.clip_len=13"), facts)  # negative control


def test_cached_clip_len_must_match_the_cached_length(tmp_path):
    from train.preflight import DataFacts, check_data

    facts = DataFacts(shards=1, kind="cached", first_shard="c.tar", num_frames=9, latent_frames=3)
    cfg = compose(["data=cached", "data.urls=[x]", "data.clip_len=77", f"train.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"cached shards were encoded at 9 frames.*set data.clip_len=9"):
        check_data(cfg, facts)
    check_data(compose(["data=cached", "data.urls=[x]", "data.clip_len=9", f"train.output_dir={tmp_path}"]), facts)


def test_a_short_run_keeps_the_presets_cadence_and_says_so():
    """train.max_steps=2 against checkpoint_every=30 / validate_every / warm-up: the user's choice runs,
    the run header says what happens."""
    from train.preflight import schedule_notes

    cfg = compose(["train.max_steps=2", "train.validate_every=250", "optim.warmup_steps=5"])
    notes = schedule_notes(cfg)
    assert notes == [
        "note: train.checkpoint_every=30 > train.max_steps=2: one checkpoint, at the end",
        "note: train.validate_every=250 > train.max_steps=2: validation at the end only",
        f"WARNING: optim.warmup_steps=5 >= train.max_steps=2: the run ends before the learning rate reaches "
        f"optim.lr={cfg.optim.lr:g}; lower optim.warmup_steps",
    ]
    assert schedule_notes(compose(["train.max_steps=100", "train.checkpoint_every=50", "train.validate_every=50"])) == []
    assert schedule_notes(compose(["train.max_steps=2", "train.checkpoint_every=0", "train.validate_every=0",
                                   "optim.warmup_steps=0"])) == []


# ---------------------------------------------------------------------------- one run per folder


def _fake_run(out: Path, launch: dict | None, ranks: int = 1, deepspeed: bool = False) -> None:
    ck = out / "checkpoints" / "step-3"
    ck.mkdir(parents=True)
    (ck / "COMPLETE").write_text("{}")
    for r in range(ranks):
        (ck / f"rank{r}.json").write_text("{}")
    if deepspeed:
        (ck / "pytorch_model").mkdir()
    else:
        (ck / "model.safetensors").write_bytes(b"")
    cfg = {"train": {"mode": "full"}, "model": {"path": None}}
    if launch is not None:
        cfg["launch"] = launch
    (out / "config.json").write_text(json.dumps(cfg))


def test_another_launch_on_a_run_folder_is_refused_naming_the_difference(assets, tmp_path):
    from train.checkpoint.run_dir import check_output_dir, launch_identity

    cfg = compose([f"train.output_dir={tmp_path / 'a'}"])
    here = launch_identity(cfg, world_size=1, deepspeed=False, zero_stage=0)
    _fake_run(tmp_path / "a", {**here, "world_size": 2, "deepspeed": True, "zero_stage": 2})
    with pytest.raises(ConfigError) as e:
        check_output_dir(cfg, here)
    msg = str(e.value)
    assert "world size 2, DeepSpeed ZeRO-2" in msg and "world_size: 2 -> 1" in msg and "deepspeed: True -> False" in msg
    assert "new train.output_dir" in msg and "original launch" in msg
    # a run written before config.json had ``launch``: world size and DeepSpeed come from its checkpoint
    cfg_b = compose([f"train.output_dir={tmp_path / 'b'}"])
    _fake_run(tmp_path / "b", None, ranks=2, deepspeed=True)
    with pytest.raises(ConfigError, match=r"world_size: 2 -> 1; deepspeed: True -> False"):
        check_output_dir(cfg_b, launch_identity(cfg_b, 1, False, 0))
    # negative controls: the same launch, and an empty folder, pass
    cfg_c = compose([f"train.output_dir={tmp_path / 'c'}"])
    _fake_run(tmp_path / "c", launch_identity(cfg_c, 1, False, 0))
    check_output_dir(cfg_c, launch_identity(cfg_c, 1, False, 0))
    check_output_dir(compose([f"train.output_dir={tmp_path / 'd'}"]), here)


def test_a_moved_copy_of_the_model_resumes_another_model_is_refused(assets, tmp_path):
    from train.checkpoint.run_dir import check_output_dir, launch_identity

    cfg = _cfg(assets, tmp_path / "a")
    here = launch_identity(cfg, 1, False, 0)
    assert here["model"] == str(assets.model.resolve()) and here["model_config"]
    _fake_run(tmp_path / "a", {**here, "model": "/old/place/of/the/model"})  # same DiT config, other path
    check_output_dir(cfg, here)
    cfg_b = _cfg(assets, tmp_path / "b")
    _fake_run(tmp_path / "b", {**here, "model": "/another/model", "model_config": "0123456789abcdef"})
    with pytest.raises(ConfigError, match=r"model: /another/model -> " + str(assets.model.resolve())):
        check_output_dir(cfg_b, here)


def test_config_json_records_the_loaded_model_folder_not_a_preset(assets, tmp_path):
    from train.preflight import model_facts
    from train.checkpoint.run_dir import launch_identity, loaded_model_record, write_config

    cfg = _cfg(assets, tmp_path / "run", "model=14b")  # the preset group of the real model, path set
    dit_config, layout = model_facts(assets.model)
    rec = loaded_model_record(cfg, assets.model, dit_config, layout)
    assert rec["preset"] is None and rec["path"] == str(assets.model)
    assert rec["loaded"]["path"] == str(assets.model.resolve()) and rec["loaded"]["layout"] == "diffusers"
    assert rec["loaded"]["dit_config"]["dim"] == dit_config.dim != 5120  # the tiny folder's, not 14b's
    launch = launch_identity(cfg, 1, False, 0)
    (tmp_path / "run").mkdir()
    write_config(cfg, launch, rec)
    saved = _strict_load(tmp_path / "run" / "config.json")
    assert saved["launch"] == launch and saved["model"]["loaded"]["dit_config"]["dim"] == dit_config.dim
    # quick start: the preset the model was built from is recorded
    quick = compose([f"train.output_dir={tmp_path / 'q'}"])
    assert loaded_model_record(quick, tmp_path, None, None)["loaded"]["built_from_preset"] == "tiny"


def test_summary_is_strict_json_with_a_nan_loss(tmp_path):
    from train.checkpoint.run_dir import write_summary

    write_summary(tmp_path, {"status": "finished", "final_loss": float("nan"), "step": 3})
    assert _strict_load(tmp_path / "summary.json")["final_loss"] is None
    assert "NaN" not in (tmp_path / "summary.json").read_text()


def test_run_then_rerun_is_a_noop_and_another_mode_is_refused_before_loading(assets, tmp_path, capsys, monkeypatch):
    import train.loop as loop

    out = tmp_path / "run"
    overrides = ("train.max_steps=2", "train.checkpoint_every=0", "train.validation=false",
                 "train.export_layouts=[official]", "data.buckets=[[48,48]]")
    result = loop.run(_cfg(assets, out, *overrides))
    log = capsys.readouterr().out
    assert result["status"] == "finished" and result["step"] == 2
    header = log[: log.index("[train] loading")]
    assert "samples=3" in header and "48x48 clip_len=9" in header and "tokens/sample=" in header
    assert "1 micro x 1 accum x 1 data-parallel = 1 samples/step" in header
    assert "WARNING: data.buckets upscales the data: 32x32 clips are enlarged 1.50x" in header
    assert "validation off (train.validation=false)" in header
    assert log.index("[train] loading") < log.index("[train] mode=")
    summary = _strict_load(out / "summary.json")
    config = _strict_load(out / "config.json")
    assert config["model"]["preset"] is None and config["launch"]["world_size"] == 1
    assert (out / "export" / "official").is_dir()

    # exports missing: the rerun only re-exports (no step, no validation, no wandb run)
    import shutil

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    shutil.rmtree(out / "export")
    metrics = (out / "metrics.jsonl").read_text()
    wandb_runs = sorted((out / "wandb").glob("offline-run-*"))
    loop.run(_cfg(assets, out, *overrides))
    assert "its exports are missing (official): re-exporting only" in capsys.readouterr().out
    assert (out / "export" / "official").is_dir() and (out / "export" / "README.txt").is_file()
    assert (out / "metrics.jsonl").read_text() == metrics
    assert sorted((out / "wandb").glob("offline-run-*")) == wandb_runs
    summary = _strict_load(out / "summary.json")
    assert summary["step"] == 2 and summary["exports"]["official"] == str(out / "export" / "official")

    # rerun of the finished run: nothing loads, nothing is rewritten, no wandb run starts
    def no_model(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(loop, "Trainer", no_model)
    before = {p: p.stat().st_mtime_ns for p in (out / "summary.json", out / "config.json", out / "metrics.jsonl")}
    wandb_runs = sorted((out / "wandb").glob("offline-run-*"))
    again = loop.run(_cfg(assets, out, *overrides))
    assert "already finished at step 2" in capsys.readouterr().out
    assert again == summary
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert sorted((out / "wandb").glob("offline-run-*")) == wandb_runs

    # another mode on the same folder: refused before any model loads, config.json kept
    with pytest.raises(ConfigError, match=r"mode: full -> lora.*new train.output_dir"):
        loop.run(_cfg(assets, out, *overrides, "train.mode=lora"))
    assert _strict_load(out / "config.json") == config

    # negative control: more steps asked for -> it trains on (the Trainer is wanted)
    with pytest.raises(AssertionError, match="a model was loaded"):
        loop.run(_cfg(assets, out, *overrides[1:], "train.max_steps=3"))


# ---------------------------------------------------------------------------- validation


def test_cached_training_validates_from_its_latents(assets, tmp_path, capsys):
    from data_tools.cache_latents import cache_latents
    from data_tools.config import CacheLatentsConfig
    from train.validation import validate
    from wan_animate.pipeline import AnimatePipeline
    from wan_animate.video_io import read_video

    pipe = AnimatePipeline.from_pretrained(assets.model, dtype=torch.float32, device="cpu")
    cached = tmp_path / "cached"
    cache_latents(CacheLatentsConfig(input=str(assets.data), output=str(cached), model=str(assets.model),
                                     device="cpu", dtype="fp32", refert_nums=[0, 1]),
                  progress=False, encoders=(pipe.vae, pipe.text_encoder, pipe.image_encoder))
    from train.data import resolve_urls

    from train.preflight import read_data_facts

    urls = resolve_urls([str(cached)])
    facts = read_data_facts(urls)
    assert (facts.kind, facts.num_frames, facts.sizes, facts.samples) == ("cached", 13, [(32, 32)], 3)
    cfg = compose(["data=cached", f"data.urls=[{cached}]", "data.clip_len=13", "data.refert_nums=[1]",
                   f"train.output_dir={tmp_path / 'run'}", "train.validation_steps=1"])
    acc = SimpleNamespace(is_main_process=True, process_index=0, device=torch.device("cpu"),
                          wait_for_everyone=lambda: None)
    video = validate(cfg, acc, pipe, pipe.dit, urls, step=1, stage=0)
    assert video is not None and video.is_file()
    frames, _ = read_video(video)
    assert frames.shape[0] == 13 and frames.shape[2] == 3 * 32  # ground truth | pose | generated, 13 frames
    # negative control: ZeRO-3 renders nothing and says why
    assert validate(cfg, acc, pipe, pipe.dit, urls, step=2, stage=3) is None
    assert "validation skipped under ZeRO-3" in capsys.readouterr().out


# ---------------------------------------------------------------------------- noise


def test_quiet_drops_only_the_named_third_party_lines(caplog):
    from wan_animate.quiet import quiet_third_party

    quiet_third_party()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("transformers.utils.import_utils").warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
        logging.getLogger("torchao").warning("Failed to load /x/_C_mxfp8.so: Could not load this library")
        logging.getLogger("transformers.utils.import_utils").warning("something a user must read")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["something a user must read"]
    if not torch.cuda.is_available():
        import os

        assert os.environ.get("DS_ACCELERATOR") == "cpu"


# ---------------------------------------------------------------------------- exports


def test_export_readme_lists_only_what_was_written(tmp_path):
    from train.checkpoint.export import readme_text

    out = tmp_path / "export"
    (out / "official").mkdir(parents=True)
    (out / "ema").mkdir()
    for f in ("lora.safetensors", "ema/lora.safetensors"):
        (out / f).write_bytes(b"")
    text = readme_text(out, {"lora": str(out / "lora.safetensors"), "ema/lora": str(out / "ema" / "lora.safetensors")})
    assert text.splitlines() == [
        "ema/lora.safetensors : EMA of the trained weights (optim.ema_decay): community LoRA layout "
        "(diffusers load_lora_weights, ComfyUI, eval.generate --lora)",
        "lora.safetensors : community LoRA layout (diffusers load_lora_weights, ComfyUI, eval.generate --lora)"]
    assert "official" not in text and "diffusers/" not in text and "adapters" not in text  # not written
    full = readme_text(out, {"official": str(out / "official")})
    assert full.startswith("official/ : DiT in the Wan-AI/Wan2.2-Animate-14B layout")


def test_validation_urls_pick_the_raw_validation_set(assets, tmp_path):
    from train.validation import validation_inputs

    cfg = compose(["data=cached", "data.urls=[/nonexistent]", "data.clip_len=9", f"train.output_dir={tmp_path}",
                   f"train.validation_urls=[{assets.data}]"])
    x = validation_inputs(cfg, pipe=None, urls=["/nonexistent/shard-000000.tar"])  # no VAE needed: raw pixels
    assert x["pose"].shape == (9, 32, 32, 3) and x["truth"].shape == (9, 32, 32, 3) and x["ref"].shape == (32, 32, 3)
    # negative control: without validation_urls a cached run reads its own (here missing) cached shards
    with pytest.raises(FileNotFoundError, match="text_embeds.safetensors not found"):
        validation_inputs(compose(["data=cached", "data.urls=[/nonexistent]", f"train.output_dir={tmp_path}"]),
                          pipe=SimpleNamespace(vae=None), urls=["/nonexistent/shard-000000.tar"])


# ---------------------------------------------------------------------------- planner verdict


def test_the_plan_verdict_judges_the_presets_target_machine():
    """A 24 GB preset is judged against its card and host RAM, not the 80 GiB default."""
    from train.plan.report import verdict_line

    cfg = compose(["experiment=character_lora_24gb", "train.dry_run=memory"])
    assert (cfg.train.plan_budget_gib, cfg.train.plan_host_gib) == (22, 64)
    assert compose(["experiment=character_lora", "train.dry_run=memory"]).train.plan_host_gib is None
    plan = {"peak_device_gib": 19.3, "budget_gib": 22, "host_ram_gib": 73.0, "host_budget_gib": 64,
            "fits_device": True, "fits_host": False, "fits": False}
    assert verdict_line(plan) == ("[plan] verdict: does NOT fit: device 19.3 GiB fits in train.plan_budget_gib=22; "
                                  "host RAM 73.0 GiB does NOT fit in train.plan_host_gib=64")
    plan.update(host_ram_gib=46.7, host_budget_gib=None, fits_host=None, fits=True, peak_device_gib=60.8, budget_gib=80)
    assert verdict_line(plan) == ("[plan] verdict: fits: device 60.8 GiB fits in train.plan_budget_gib=80; host RAM "
                                  "46.7 GiB not judged (set train.plan_host_gib to the machine's RAM)")
