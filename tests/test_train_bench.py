"""bench/train_step.py: the code path of the GPU case (bf16 weights + autocast, activation
checkpointing, LoRA) runs on CPU at tiny size and reports sane figures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from wan_animate.config import WanAnimateConfig

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "bench/train_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_case_code_path_on_cpu():
    bench = _bench()
    cfg = WanAnimateConfig.preset("tiny")
    rows = [bench.bench_one(cfg, mode, device=torch.device("cpu"), precision=prec, checkpointing=True,
                            frames=5, height=32, width=32, batch=1, steps=1, warmup=1, lora_rank=4)
            for mode, prec in (("lora", "bf16"), ("full", "fp32"))]
    lora, full = rows
    assert 0 < lora["trainable"] < lora["params"] and full["trainable"] == full["params"]
    for r in rows:
        assert r["step_s"] > 0 and r["samples_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_gib"] > 0


def test_cpu_table(tmp_path):
    out = tmp_path / "t.md"
    assert _bench().main(["--steps", "1", "--warmup", "0", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| full |" in text and "| lora |" in text and "command:" in text
