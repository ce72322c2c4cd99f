"""What a user reads from every tool: one line and exit status 2 for an expected error, the closest
key for a typo, a launch whose devices do not exist refused before anything loads, and no
third-party start-up noise (wan_animate.cli, wan_animate.quiet)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# Lines third-party libraries print at import that a user cannot act on (wan_animate.quiet)
NOISE = ("Failed to load", "register_constant", "Unable to import `torchao` Tensor objects",
         "requires torchvision", "Setting accelerator to CPU", "Detected no triton")


def _run(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env)
    for name in ("HYDRA_FULL_ERROR", "DS_ACCELERATOR"):  # in-process tests may have set them in this process
        full_env.pop(name, None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------ config keys


def test_unknown_key_names_the_closest_key():
    from train.config import Config
    from wan_animate.cli import unknown_key

    groups = ["data", "experiment", "lora", "loss", "model", "optim"]
    assert unknown_key("train.max_step", Config, groups) == "train.max_step is not a configuration key; did you mean train.max_steps?"
    assert unknown_key("trian.max_steps", Config, groups).endswith("did you mean train.max_steps?")
    assert unknown_key("optim.learning_rate", Config, groups).startswith("optim.learning_rate is not a configuration key")
    for key in ("train.max_steps", "optim.lr", "model.path", "experiment", "data", "data.urls", "experiment_name"):
        assert unknown_key(key, Config, groups) is None, key


def test_check_overrides_leaves_hydra_syntax_alone(capsys):
    from train.config import Config
    from wan_animate.cli import check_overrides

    check_overrides("x: ", ["-m", "+extra=1", "~train.seed", "hydra.run.dir=.", "hydra/job_logging=none",
                            "experiment=character_lora", "train.max_steps=2", "--config-name", "config"], Config,
                   ["experiment"])
    with pytest.raises(SystemExit) as e:
        check_overrides("[train] configuration error: ", ["train.max_steps=2", "train.max_step=80"], Config)
    assert e.value.code == 2
    assert capsys.readouterr().err == ("[train] configuration error: train.max_step is not a configuration key; "
                                       "did you mean train.max_steps=80?\n")


def test_train_typo_is_one_line_and_leaves_no_folder(tmp_path):
    out = tmp_path / "out"
    p = _run(["-m", "train.main", "train.max_step=80", f"train.output_dir={out}"], cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr == ("[train] configuration error: train.max_step is not a configuration key; did you mean "
                        "train.max_steps=80?\n") and p.stdout == ""
    assert os.listdir(tmp_path) == []  # no output dir, no hydra/ folder


def test_train_missing_data_path_is_one_line_before_the_run_is_accepted(tmp_path):
    out = tmp_path / "out"
    p = _run(["-m", "train.main", "data=shards", f"data.urls=[{tmp_path}/nope]", f"train.output_dir={out}"],
             cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert p.stderr == (f"[train] configuration error: data.urls: {tmp_path}/nope does not exist (give shard files, "
                        "folders, globs or pipe: URLs).\n")
    assert os.listdir(tmp_path) == []  # no output dir, no hydra/ folder


def test_data_tool_typo_is_one_line(tmp_path):
    p = _run(["-m", "data_tools.synthetic", f"output={tmp_path}/s", "num_clip=2"], cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr == "error: num_clip is not a configuration key; did you mean num_clips=2?\n"


# ------------------------------------------------------------------------------ launch devices


def test_launch_devices_that_do_not_exist_are_refused():
    from train.config import ConfigError
    from train.parallel import check_launch_devices

    eight = {"LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "8"}
    with pytest.raises(ConfigError, match=r"asks for 8 processes on this machine but it has no CUDA device; use "
                                          r"launch/accelerate/1gpu.yaml"):
        check_launch_devices(eight, cuda_devices=0)
    with pytest.raises(ConfigError, match=r"asks for 8 processes on this machine but it has 1 CUDA device\(s\); "
                                          r"use a launch file with num_processes=1"):
        check_launch_devices(eight, cuda_devices=1)
    check_launch_devices(eight, cuda_devices=8)
    check_launch_devices({**eight, "DS_ACCELERATOR": "cpu"}, cuda_devices=0)  # CPU ranks on purpose (tests)
    check_launch_devices({"LOCAL_WORLD_SIZE": "2"}, cuda_devices=0)  # launch/accelerate/cpu_2proc_*.yaml
    check_launch_devices({}, cuda_devices=0)


def test_a_gpu_launch_on_this_cpu_machine_is_one_line(tmp_path):
    """The check runs in each rank before anything loads; the launcher's ranks print it once."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    p = _run([str(ROOT / "train/main.py"), f"train.output_dir={tmp_path}/o"], cwd=tmp_path,
             LOCAL_WORLD_SIZE="8", WORLD_SIZE="8", RANK="0", LOCAL_RANK="0")
    assert p.returncode == 2
    assert p.stderr.splitlines() == [
        "[train] configuration error: the launch asks for 8 processes on this machine but it has no CUDA device; "
        "use launch/accelerate/1gpu.yaml (or python -m train.main) here, or set DS_ACCELERATOR=cpu to start 8 "
        "CPU processes on purpose."]
    q = _run([str(ROOT / "train/main.py"), f"train.output_dir={tmp_path}/o"], cwd=tmp_path,
             LOCAL_WORLD_SIZE="8", WORLD_SIZE="8", RANK="3", LOCAL_RANK="3")
    assert q.returncode == 2 and q.stderr == ""  # the other ranks exit quietly


# ------------------------------------------------------------------------------ argparse tools


def test_expected_error_is_one_line_and_debug_shows_the_traceback(capsys):
    from wan_animate.cli import run_tool
    from wan_animate.lora import LoraError

    def boom(argv):
        raise LoraError("lora.safetensors was made for another model: 'blocks.0.self_attn.q' is 64x16, the DiT's "
                        "layer is 32x32; use a LoRA trained on this model")

    assert run_tool(boom, []) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: lora.safetensors was made for another model: 'blocks.0.self_attn.q' is 64x16, the DiT's layer is "
        "32x32; use a LoRA trained on this model"]
    with pytest.raises(LoraError):
        run_tool(boom, ["--debug"])
    os.environ.pop("HYDRA_FULL_ERROR", None)

    def bug(argv):
        raise KeyError("internal")

    with pytest.raises(KeyError):  # not an expected error: its traceback stays
        run_tool(bug, [])


def test_generate_with_a_lora_for_another_model_size_is_one_line(tmp_path, monkeypatch, capsys):
    """The real LoraError of apply_lora, through eval.generate's entry point (pipeline loading faked)."""
    import wan_animate.pipeline as pl
    from eval import generate as cli
    from wan_animate.config import WanAnimateConfig
    from wan_animate.lora import add_lora, apply_lora, save_lora
    from wan_animate.model import WanAnimateDiT
    from wan_animate.video_io import write_video

    torch.manual_seed(0)
    other = WanAnimateDiT(WanAnimateConfig.preset("tiny_b"))
    add_lora(other, rank=4)
    save_lora(other, tmp_path / "other.safetensors")
    dit = WanAnimateDiT(WanAnimateConfig.preset("tiny"))

    class FakePipeline:
        def load_lora(self, path, scale=1.0):
            return apply_lora(dit, path, scale=scale)

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    monkeypatch.setattr(pl.AnimatePipeline, "detect_layout", staticmethod(lambda path: "official"))
    monkeypatch.setattr(pl.AnimatePipeline, "from_pretrained", lambda *a, **k: FakePipeline())
    monkeypatch.setattr(cli, "_model_family", lambda model: "animate")
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "ref.png")
    for name in ("pose", "face"):
        write_video(tmp_path / f"{name}.mp4", rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8), 24)
    args = ["--model", str(model_dir), "--ref", str(tmp_path / "ref.png"), "--pose", str(tmp_path / "pose.mp4"),
            "--face", str(tmp_path / "face.mp4"), "--out", str(tmp_path / "o.mp4"), "--clip-len", "9",
            "--no-progress", "--lora", str(tmp_path / "other.safetensors")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "other.safetensors" in err[0], err


def test_make_tiny_prints_one_line_and_no_library_noise(tmp_path):
    p = _run(["-m", "wan_animate.checkpoint", "make-tiny", str(tmp_path / "tiny")], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    lines = (p.stdout + p.stderr).splitlines()
    assert lines == [f"wrote a tiny animate diffusers model folder to {tmp_path / 'tiny'}"], lines
    bad = _run(["-m", "wan_animate.checkpoint", "inspect", str(tmp_path / "nope")], cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and bad.stderr.startswith("error: "), bad.stderr
    assert not any(n in bad.stderr for n in NOISE)


def test_generate_and_eval_print_no_library_noise(tmp_path):
    """eval.generate imports the pipeline (diffusers, transformers, torchao) before its input checks;
    eval/main.py imports the runner: neither prints the libraries' start-up lines."""
    gen = _run(["-m", "eval.generate", "--model", str(tmp_path), "--ref", "nope.png", "--pose", "p.mp4", "--face",
                "f.mp4", "--out", "o.mp4"], cwd=tmp_path)
    assert gen.returncode == 2 and len(gen.stderr.splitlines()) == 1 and gen.stderr.startswith("error: "), gen.stderr
    ev = _run([str(ROOT / "eval/main.py"), "model_dir=m", "eval_set=e", f"out_dir={tmp_path}/ev", "seeed=1"],
              cwd=tmp_path)
    assert ev.returncode == 2 and ev.stderr == "error: seeed is not a configuration key; did you mean seed=1?\n"
    for p in (gen, ev):
        assert not any(n in p.stdout + p.stderr for n in NOISE), p.stdout + p.stderr
