"""The memory planner's peak (train/plan/planner.py: fake tensors, live-storage accounting) against
the peak resident-set growth of the same step on real CPU tensors in a fresh process
(``train.plan.measure``: /proc VmHWM after clear_refs, glibc returning every freed block
>= 64 KiB), which shares no counting code with the planner. Checks of the planner on the shipped
presets and known sizes are in tests/test_memory_plan.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import model_config_folder
from train.config import compose
from train.plan.planner import plan_memory
from wan_animate.config import WanAnimateConfig

ROOT = Path(__file__).resolve().parents[1]


def _measure(overrides: list[str]) -> dict:
    # threads as the worker's (tests/conftest.py: one per core in all); more would wait on each other
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-m", "train.plan.measure", *overrides], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800, check=False)  # minutes on a loaded 2-core box
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _agree(overrides: list[str]) -> tuple[float, float]:
    plan = plan_memory(compose(overrides), write=False)
    real = _measure(overrides)
    return plan["peak_device_gib"], real["peak_rss_delta_gib"]


@pytest.mark.slow
def test_planner_peak_matches_real_run_at_full_width(tmp_path):
    """2 DiT blocks at the real width (dim 5120, ffn 13824, 40 heads) + a face block, LoRA r64,
    frozen weights + trainables + Adam + activations of one step; within 10% of the real run."""
    folder = model_config_folder(tmp_path, "m", WanAnimateConfig.preset("14b", num_layers=2, face_adapter_period=2,
                                                                        text_len=32))
    overrides = ["experiment=animate14b_lora", f"model.path={folder}", "data.urls=[unused]", "data.clip_len=5", "data.refert_nums=[1]",
                 "data.buckets=[[64,64]]", "train.precision=fp32", "train.grad_accum=1", "lora.train_adapters=false",
                 # the plain path (the preset's 8-bit AdamW states are computed, not run, by the planner)
                 "optim.name=adamw", "model.checkpoint_dtype=fp32", "model.motion_encoder_chunk=0",
                 f"train.output_dir={tmp_path / 'out'}"]
    planned, measured = _agree(overrides)
    assert planned > 3.0  # weights of two full-width blocks in fp32 at least
    assert abs(planned - measured) <= 0.10 * measured, (planned, measured)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_planner_peak_matches_real_run_when_activations_dominate(tmp_path, checkpointing):
    """A narrow model over many tokens (bf16 autocast, full fine-tuning): the peak is mostly
    activations (with and without activation checkpointing); within 10% of the real run."""
    folder = model_config_folder(tmp_path, "m", WanAnimateConfig.preset(
        "tiny", dim=256, ffn_dim=1024, num_heads=4, num_layers=2, face_adapter_period=2, text_len=16))
    overrides = ["experiment=quickstart", f"model.path={folder}", "data.source=cached", "data.urls=[unused]",
                 # 17 frames (1,536 tokens); with checkpointing only the block inputs stay, so 2x the tokens
                 # (33 frames) keep the activations above half the peak (17 leave weights + AdamW half of it)
                 f"data.clip_len={33 if checkpointing else 17}", "data.buckets=[[256,256]]", "train.precision=fp32",
                 f"model.activation_checkpointing={str(checkpointing).lower()}", f"train.output_dir={tmp_path / 'o'}"]
    plan = plan_memory(compose(overrides), write=False)
    act = sum(v for k, v in plan["by_category"].items() if k in ("activations", "temporaries"))
    assert act > 0.5 * plan["peak_device_gib"]  # the case this test is for
    measured = _measure(overrides)["peak_rss_delta_gib"]
    assert abs(plan["peak_device_gib"] - measured) <= 0.10 * measured, (plan["peak_device_gib"], measured)
