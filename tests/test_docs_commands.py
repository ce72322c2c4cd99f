"""Every command of README.md and docs/*.md either runs here at CPU size or is listed with the reason
it cannot (a GPU, a real model, real videos, the network).

A command block is a fenced ``bash``/``sh`` block, or an unlabelled one whose first line is a command.
Lines joined at ``\\``, comments dropped. Each command is looked up in ``COMMANDS`` by its exact text:
a new or edited command fails ``test_every_doc_command_is_classified`` until it is classified here
(a ``Run`` or a reason), and an entry no doc holds any more fails ``test_no_stale_entries``.

A ``Run`` executes the command as written, in a scratch folder, with only the changes it lists:
placeholder paths mapped to CPU-sized stand-ins made by the test (a tiny random model, synthetic
shards, small input videos) and step counts (training, validation) cut to a few steps.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND_WORDS = ("python", "python3", "accelerate", "bash", "pip", "torchrun", "sbatch", "srun", "export")


@dataclass(frozen=True)
class Run:
    """Run at CPU size: ``subs`` replace text in the command (placeholders -> stand-ins under the
    scratch folder ``{tmp}``), ``append`` adds overrides; ``needs`` names the stand-ins to build."""

    subs: tuple[tuple[str, str], ...] = ()
    append: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    expect_out: tuple[str, ...] = field(default=())  # files the command must have written (under {tmp})


REAL_MODEL = "needs the real Wan2.2-Animate-14B weights (tens of GB) or a GPU"
REAL_A2 = "needs the real Wan-Animate-2 weights (A2_DIR / wan_animate_2_bf16.safetensors)"
MULTI_GPU = "a multi-GPU launch file (8 processes); on a machine without them it is refused in one line (tests/test_cli_errors.py)"
RAW_VIDEOS = "needs a folder of real videos of people (VIDEOS); tests/test_data_prepare.py runs prepare on the sample clip"
NETWORK = "creates a fresh virtual environment and installs from PyPI (network, minutes); CI runs it (.ci/run)"
SENSITIVITY_EXAMPLE = ("the measured sensitivity sweep (200 training steps + 3 cells: minutes on 2 cores); "
                       "tests/test_teach.py trains the same set-up, tests/test_eval_sweep.py sweeps the metric")
TINY = ("--model", "{tmp}/tiny")

COMMANDS: dict[str, Run | str] = {
    # README.md: set-up
    'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[pose]" && '
    "accelerate launch -q --config_file launch/accelerate/1gpu.yaml train/main.py": NETWORK,
    "python3 -m venv .venv && . .venv/bin/activate && bash scripts/test.sh": NETWORK,
    # the tiny model and generation with it
    "python -m wan_animate.checkpoint make-tiny /tmp/tiny --layout diffusers":
        Run(subs=(("/tmp/tiny", "{tmp}/made-tiny"),), expect_out=("made-tiny/model_index.json",)),
    "python -m eval.generate --model /tmp/tiny --ref ref.png --pose pose.mp4 --face face.mp4 --out out.mp4 "
    "--steps 4 --clip-len 17": Run(subs=(("/tmp/tiny", "{tmp}/tiny"),), needs=("tiny", "inputs"),
                                   expect_out=("out.mp4",)),
    "python -m eval.generate --model Wan2.2-Animate-14B --preprocessed SRC_DIR --out out.mp4": REAL_MODEL,
    "python -m eval.generate --model DIR --ref ref.png --driving dance.mp4 --out out.mp4 [--retarget] [--replace]":
        "a template ([--retarget] [--replace]); the runnable tiny form is in docs/inference.md",
    "python -m eval.generate --model DIR --ref ref.png --driving dance.mp4 --out out.mp4 [--replace] [--retarget]":
        "a template ([--replace] [--retarget]); the runnable tiny form follows it in docs/inference.md",
    "python -m eval.generate --model /tmp/tiny --ref ref.png --driving dance.mp4 --out out.mp4 --max-frames 33 "
    "--target-area 65536 --steps 4 --clip-len 17 --device cpu":
        "needs a driving video of a real person and the [pose] extra (mediapipe pose on every frame, minutes on "
        "2 cores); tests/test_eval_generate.py covers --driving",
    "python -m eval.generate --model A2_DIR --ref ref.png --driving-video dance.mp4 --out out.mp4 [--distilled]": REAL_A2,
    "python -m eval.generate --model A2_DIR --ref ref.png --driving-video dance.mp4 --out out.mp4 [--distilled] "
    "[--target-area 409600] [--max-frames N] [--steps --guide-scale --solver --clip-len] [--lora F]": REAL_A2,
    "python -m eval.generate --model Wan2.2-Animate-14B --driving raw.mp4 --ref ref.png --replace --relight "
    "--out out.mp4": REAL_MODEL + " (and its relighting LoRA)",
    "python -m eval.generate ... --bg bg.mp4 --mask mask.mp4 --relight path/to/relighting_lora.ckpt":
        "a fragment (...) of the command above",
    # data
    "python -m data_tools.prepare input=VIDEOS output=SHARDS": RAW_VIDEOS,
    "python -m data_tools.inspect SHARDS": Run(subs=(("SHARDS", "{tmp}/synthetic"),), needs=("synthetic",),
                                               expect_out=("synthetic/contact_sheet.png",)),
    "python -m data_tools.cache_latents input=SHARDS output=CACHED model=MODEL_DIR":
        Run(subs=(("SHARDS", "{tmp}/synthetic"), ("CACHED", "{tmp}/cached"), ("MODEL_DIR", "{tmp}/tiny")),
            needs=("synthetic", "tiny"), expect_out=("cached/manifest.json",)),
    "python -m data_tools.synthetic output=DIR": Run(subs=(("DIR", "{tmp}/synth-out"),),
                                                     expect_out=("synth-out/manifest.json",)),
    "python -m data_tools.preprocess_driving --video V --ref IMAGE --out DIR [--retarget] [--replace]":
        "a template; needs a driving video of a real person and the [pose] extra (tests/test_data_driving.py)",
    "python -m data_tools.prepare input=videos/ output=shards/ clip_len=77 fps=30 target_area=921600 "
    "pose_backend=mediapipe reference_policy=outside replace=true shard_size=32 workers=2": RAW_VIDEOS,
    "python -m data_tools.cache_latents input=shards/ output=cached/ model=Wan2.2-Animate-14B device=cuda dtype=bf16":
        REAL_MODEL,
    "python -m data_tools.prepare input=videos/ output=shards/ replace=true segmenter=sam2 "
    "sam2_path=/models/sam2.1-hiera-large '+segmenter_options={device: cuda, prompt: both}'":
        RAW_VIDEOS + "; and SAM2 weights on a GPU",
    "python -m data_tools.preprocess_driving --video V --ref IMG --out DIR --replace --segmenter sam2 "
    "--sam2-path /models/sam2.1-hiera-large": "needs SAM2 weights (/models/sam2.1-hiera-large) and a real video",
    "python bench/video_decode.py --repeats 5": "a benchmark (minutes); its measured table is in bench/results/",
    # train
    "accelerate launch -q --config_file launch/accelerate/1gpu.yaml train/main.py":
        Run(subs=(("launch/", f"{ROOT}/launch/"), ("train/main.py", f"{ROOT}/train/main.py")),
            append=("train.max_steps=2", "train.output_dir={tmp}/qs"), expect_out=("qs/export",)),
    "python -m train.main train.max_steps=200 optim.lr=3e-4 train.output_dir=outputs/mine":
        Run(subs=(("train.max_steps=200", "train.max_steps=2"), ("outputs/mine", "{tmp}/mine")),
            expect_out=("mine/export",)),
    "accelerate launch --config_file launch/accelerate/8gpu_zero3.yaml train/main.py experiment=animate14b_full "
    "model.path=/models/Wan2.2-Animate-14B data.urls=[/data/shards]": MULTI_GPU,
    "accelerate launch --config_file launch/accelerate/1gpu.yaml train/main.py experiment=animate14b_lora "
    "model.path=/models/Wan2.2-Animate-14B data.urls=[/data/cached]": REAL_MODEL,
    "accelerate launch --config_file launch/accelerate/1gpu.yaml train/main.py experiment=character_lora_24gb "
    "model.path=/models/Wan2.2-Animate-14B data.urls=[/data/my_character]": REAL_MODEL + " (a 24 GB card)",
    "accelerate launch --config_file launch/accelerate/8gpu_zero3_sp.yaml train/main.py experiment=animate14b_full "
    "train.sequence_parallel=8 data.buckets=[[720,1280]] model.path=... data.urls=[/data/cached_720p]": MULTI_GPU,
    "python -m train.main experiment=animate14b_lora train.dry_run=memory":
        "runs on this CPU but traces a 14B step on fake tensors for minutes; tests/test_memory_plan.py plans this "
        "preset",
    "python -m train.main experiment=animate14b_lora train.dry_run=memory data.buckets=[[720,1280]] data.clip_len=81":
        "the same planner as the command before it, at 75,600 tokens (a few minutes of fake-tensor tracing on 2 cores)",
    "python -m train.main experiment=animate14b_lora_24gb train.dry_run=memory model.path=/models/only-config":
        "needs a folder holding a model's config.json (/models/only-config); the preset alone is planned above",
    "accelerate launch -q --config_file launch/accelerate/1gpu.yaml train/main.py experiment=character_lora "
    "model.path=/tmp/tiny data.urls=[/data/my_character] train.output_dir=outputs/my_character_cpu "
    "data.buckets=[[144,256]] data.clip_len=17 train.precision=fp32 model.activation_checkpointing=false "
    "model.checkpoint_dtype=fp32 optim.warmup_steps=10 data.num_workers=0 train.grad_accum=1 train.max_steps=200 "
    "train.checkpoint_every=50 train.validate_every=100 train.validation_steps=4":
        Run(subs=(("launch/", f"{ROOT}/launch/"), ("train/main.py", f"{ROOT}/train/main.py"),
                  ("/tmp/tiny", "{tmp}/tiny"), ("/data/my_character", "{tmp}/synthetic-144x256"),
                  ("outputs/my_character_cpu", "{tmp}/char"), ("train.max_steps=200", "train.max_steps=1"),
                  ("train.validation_steps=4", "train.validation_steps=1")),
            needs=("tiny", "synthetic-144x256"), expect_out=("char/export/lora.safetensors",)),
    # eval
    "python eval/main.py model_dir=MODEL eval_set=VAL_SHARDS out_dir=runs/eval-base": REAL_MODEL,
    "python eval/main.py -m model_dir=MODEL eval_set=VAL_SHARDS out_dir=runs/sweep "
    "checkpoint=null,runs/ft/checkpoints/step-1000 guide_scale=1,2 seed=0,1": REAL_MODEL + " and a fine-tuned run",
    "python eval/main.py -m model_dir=MODEL eval_set=data/val_shards out_dir=runs/sensitivity "
    "checkpoint=null,runs/ft/checkpoints/step-1000,runs/ft/checkpoints/step-2000 metrics.names=[heldout,sensitivity] "
    "metrics.heldout_timesteps=[300,600,900] max_samples=8":
        REAL_MODEL + " and a fine-tuned run (tests/test_eval_sweep.py sweeps the metric on the tiny model)",
    # docs/eval.md: the measured sensitivity sweep on tiny checkpoints (each step reads the one before)
    "python -m wan_animate.checkpoint make-tiny runs/tiny --layout diffusers": SENSITIVITY_EXAMPLE,
    "python -m data_tools.synthetic output=data/train num_clips=24 clip_len=9 seed=0 shard_size=8 face_size=32":
        SENSITIVITY_EXAMPLE,
    "python -m data_tools.synthetic output=data/held num_clips=8 clip_len=9 seed=1 shard_size=8 face_size=32":
        SENSITIVITY_EXAMPLE,
    'python -m data_tools.cache_latents input=data/train output=data/train_cached model=runs/tiny device=cpu '
    'dtype=fp32 "refert_nums=[0]"': SENSITIVITY_EXAMPLE,
    'python -m train.main model.path=runs/tiny data=cached "data.urls=[data/train_cached]" data.clip_len=9 '
    "train.micro_batch_size=4 optim.lr=1e-3 train.max_steps=200 train.checkpoint_every=100 "
    "train.output_dir=runs/ft": SENSITIVITY_EXAMPLE,
    "python eval/main.py -m model_dir=runs/tiny eval_set=data/held out_dir=runs/sensitivity preset=cpu "
    "checkpoint=null,runs/ft/checkpoints/step-100,runs/ft/checkpoints/step-200 "
    '"metrics.names=[heldout,sensitivity]" "metrics.heldout_timesteps=[300,600,900]" max_samples=8':
        SENSITIVITY_EXAMPLE,
    "python -m eval.report runs/sweep": "reads the sweep the command before it writes (tests/test_eval_report.py)",
    "python eval/main.py model_dir=Wan2.2-Animate-14B eval_set=data/val_shards out_dir=runs/eval-base": REAL_MODEL,
    "python eval/main.py -m model_dir=Wan2.2-Animate-14B eval_set=data/val_shards out_dir=runs/sweep "
    "checkpoint=null,runs/ft/checkpoints/step-1000,runs/ft/export guide_scale=1,2 seed=0,1 max_samples=16 "
    "max_frames=77": REAL_MODEL + " and a fine-tuned run",
    "python eval/main.py -m ... lora_path=runs/ft/export/lora.safetensors lora_scale=0.5,1.0":
        "a fragment (...) of the sweep above",
    "python eval/main.py model_dir=Wan2.2-Animate-14B eval_set=my_pairs out_dir=runs/xid "
    '"preprocess={target_area:409600,retarget:true}" metrics.driving_keypoints=stored':
        REAL_MODEL + " and (image, video) pairs of real people",
    "python -m eval.report runs/sweep [--wandb]": "a template; reads a sweep folder (tests/test_eval_report.py)",
    "python eval/main.py ... out_dir=runs/loras lora_path=runs/a/export/lora.safetensors name=styleA":
        "a fragment (...) of the sweep above",
    "python eval/main.py ... out_dir=runs/loras lora_path=runs/b/export/lora.safetensors name=styleB":
        "a fragment (...) of the sweep above",
    "python eval/main.py preset=cpu model_dir=MODEL eval_set=SHARDS out_dir=runs/eval-cpu":
        Run(subs=(("eval/main.py", f"{ROOT}/eval/main.py"), ("MODEL", "{tmp}/tiny"), ("SHARDS", "{tmp}/synthetic"),
                  ("runs/eval-cpu", "{tmp}/eval-cpu")),
            append=("max_samples=1", "steps=2"), needs=("tiny", "synthetic"), expect_out=("eval-cpu/report.md",)),
    # checkpoints
    "python -m wan_animate.checkpoint convert Wan2.2-Animate-14B out/diffusers --to diffusers "
    "[--dtype bf16|fp32|keep] [--max-shard-size 5GB]": REAL_MODEL,
    "python -m wan_animate.checkpoint convert out/diffusers out/official --to official":
        Run(subs=(("out/diffusers", "{tmp}/tiny/transformer"), ("out/official", "{tmp}/official")), needs=("tiny",),
            expect_out=("official/config.json",)),
    "python -m wan_animate.checkpoint inspect Wan2.2-Animate-14B": REAL_MODEL,
    "python -m wan_animate.checkpoint make-tiny /tmp/tiny --layout diffusers|official [--seed N]":
        "a template (diffusers|official, [--seed N]); the runnable form is in README.md",
    "python -m wan_animate.checkpoint inspect wan_animate_2_bf16.safetensors": REAL_A2,
    "python -m wan_animate.checkpoint convert wan_animate_2_bf16.safetensors OUT --to diffusers": REAL_A2,
    "python -m wan_animate.checkpoint convert Wan2.2-Animate-2-14B-Diffusers OUT.safetensors --to official": REAL_A2,
    "python -m wan_animate.checkpoint make-tiny /tmp/a2 --family animate2 [--layout official]":
        Run(subs=(("/tmp/a2", "{tmp}/a2"), (" [--layout official]", "")), expect_out=("a2",)),
    # GPU machine
    "bash scripts/gpu_wheelhouse.sh": "downloads wheels from PyPI (network)",
    "bash bench/gpu_check.sh 2>&1 | tee gpu_check.log": "the GPU checks (docs/gpu.md): needs a CUDA device",
    "python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/wan-animate-site .whl/*.whl":
        "installs the wheels scripts/gpu_wheelhouse.sh downloads (on the GPU machine)",
    "export PYTHONPATH=/tmp/wan-animate-site:$PWD": "an environment setting on the GPU machine (docs/gpu.md)",
}


def _strip_comment(line: str) -> str:
    """Drop a trailing ``# comment`` outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def doc_commands() -> list[tuple[str, str]]:
    """(file, command) for every command in the docs' command blocks, in order."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
            lang, body = m.group(1), m.group(2)
            lines = [l for l in body.splitlines() if l.strip() and not l.lstrip().startswith("#")]
            if not lines:
                continue
            if lang not in ("bash", "sh", "shell") and not (lang == "" and lines[0].split()[0] in COMMAND_WORDS):
                continue
            joined, cur = [], ""
            for line in lines:
                line = _strip_comment(line)
                if line.endswith("\\"):
                    cur += line[:-1].strip() + " "
                    continue
                joined.append((cur + line.strip()).strip())
                cur = ""
            out.extend((path.relative_to(ROOT).as_posix(), " ".join(c.split())) for c in joined if c)
    return out


def test_every_doc_command_is_classified():
    missing = [f"{f}: {c}" for f, c in doc_commands() if c not in COMMANDS]
    assert not missing, ("commands in the docs that tests/test_docs_commands.py does not know (add each to COMMANDS "
                         "as a Run or with the reason it cannot run here):\n" + "\n".join(missing))


def test_no_stale_entries():
    present = {c for _, c in doc_commands()}
    stale = [c for c in COMMANDS if c not in present]
    assert not stale, "COMMANDS entries no doc holds any more (remove them):\n" + "\n".join(stale)


def test_every_reason_names_why():
    for command, how in COMMANDS.items():
        assert isinstance(how, Run) or len(how) > 20, command


# ------------------------------------------------------------------------------ running them


def _build(name: str, tmp: Path) -> None:
    from wan_animate.video_io import write_video

    if (tmp / name).exists():
        return
    if name == "tiny":
        from wan_animate.testing import make_tiny_model_folder

        make_tiny_model_folder(tmp / "tiny", layout="diffusers", seed=0)
    elif name == "synthetic":
        from data_tools.synthetic_data import make_synthetic_dataset

        make_synthetic_dataset(tmp / "synthetic", num_clips=2, clip_len=9, height=32, width=32, seed=0,
                               shard_size=1, face_size=32)
    elif name == "synthetic-144x256":
        from data_tools.synthetic_data import make_synthetic_dataset

        make_synthetic_dataset(tmp / name, num_clips=1, clip_len=17, height=144, width=256, seed=0, shard_size=1,
                               face_size=64)
    elif name == "inputs":  # ref.png, pose.mp4, face.mp4 in the scratch folder (the command's relative names)
        from PIL import Image

        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp / "ref.png")
        write_video(tmp / "pose.mp4", rng.integers(0, 256, (17, 64, 64, 3), dtype=np.uint8), 16)
        write_video(tmp / "face.mp4", rng.integers(0, 256, (17, 64, 64, 3), dtype=np.uint8), 16)
        (tmp / name).mkdir()
    else:
        raise KeyError(name)


def _runs() -> list[str]:
    seen = {c for _, c in doc_commands()}
    return [c for c, how in COMMANDS.items() if isinstance(how, Run) and c in seen]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("docs")


@pytest.mark.slow  # each command is a real run at CPU size (5 s to ~2 min on 2 cores)
@pytest.mark.parametrize("command", _runs())
def test_doc_command_runs_at_cpu_size(command, scratch):
    how = COMMANDS[command]
    for name in how.needs:
        _build(name, scratch)
    text = command
    for old, new in how.subs:
        text = text.replace(old, new.format(tmp=scratch))
    args = shlex.split(text) + [a.format(tmp=scratch) for a in how.append]
    if args[0] in ("python", "python3"):
        args[0] = sys.executable
    elif args[0] == "accelerate":
        args = [sys.executable, "-m", "accelerate.commands.launch", *args[2:]]
    # threads as the worker's (tests/conftest.py: one per core in all); more would wait on each other
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline")
    p = subprocess.run(args, cwd=scratch, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{text}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    for rel in how.expect_out:
        assert (scratch / rel).exists(), f"{text} did not write {rel}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
