"""Sequence-parallel training (train.sequence_parallel=N, train/sequence.py) on CPU with gloo.

* 2 processes, N = 2 (one group sharing every sample) give the 1-process losses step by step, and
  validation (the DiT is collective) runs on the group without deadlock;
* 4 processes under ZeRO-2 as 2 groups of 2: the ranks of a group train the same samples, the
  groups different ones, every rank ends with the same weights, and after SIGKILL the rerun
  recomputes the steps the killed run had already logged bit for bit;
* config / layout / resume checks and the memory planner's model of one rank (fast).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import quick_start_cache

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.progress=false", "train.export=false", "train.checkpoint_every=0", "train.rank_report=true"]
STEPS = 6


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))


def command(out: Path, cache: Path, *overrides: str, launch: str | None = None, procs: int = 2) -> list[str]:
    head = [sys.executable]
    if launch:
        head += ["-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch/accelerate" / launch),
                 "--num_processes", str(procs), "--main_process_port", str(free_port())]
    return [*head, str(ROOT / "train/main.py"), f"train.output_dir={out}", f"train.cache_dir={cache}", *overrides]


def run(args: list[str], timeout: int = 500) -> subprocess.CompletedProcess:
    p = subprocess.run(args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return p


def metrics(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in (json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines())}


def reports(out: Path, n: int) -> list[dict]:
    return [json.loads((out / "ranks" / f"rank-{r}.json").read_text()) for r in range(n)]


# ------------------------------------------------------------------------------------------------
# 2 processes, one group of 2 == 1 process
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_one_group_equal_one_process(tmp_path, tiny_model):
    """~2.5 min on 2 shared cores (1-process run ~40 s, the 2-process run ~100 s, mostly startup)."""
    cache = quick_start_cache(tmp_path / "cache", tiny_model)
    one, sp = tmp_path / "one", tmp_path / "sp2"
    run(command(one, cache, *FAST, f"train.max_steps={STEPS}", "train.validation=false"))
    p = run(command(sp, cache, *FAST, f"train.max_steps={STEPS}", "train.sequence_parallel=2", "train.validation=true",
                    "train.validation_steps=2", launch="cpu_2proc_ddp.yaml"))
    assert "sequence_parallel=2: 1 group(s) of 2 ranks" in p.stdout

    a, b = metrics(one), metrics(sp)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    rel = [abs(a[s]["loss/train"] - b[s]["loss/train"]) / abs(a[s]["loss/train"]) for s in a]
    assert max(rel) <= 1e-5, rel
    assert len({round(a[s]["loss/train"], 4) for s in a}) > 1  # the losses move: the comparison can fail
    # samples are counted once per group: the same throughput basis as one process
    samples = [b[s]["perf/samples_per_s"] * b[s]["perf/step_time_s"] for s in b]
    assert all(abs(x - 1.0) < 1e-6 for x in samples), samples

    r0, r1 = reports(sp, 2)
    assert r0["keys"] == r1["keys"] == reports(one, 1)[0]["keys"]  # both ranks trained the 1-process samples
    assert r0["param_sha256"] == r1["param_sha256"]
    summary = json.loads((sp / "summary.json").read_text())
    assert summary["sequence_parallel"] == 2 and summary["world_size"] == 2
    assert summary["validation_video"] and Path(summary["validation_video"]).is_file()  # the group rendered it


# ------------------------------------------------------------------------------------------------
# 4 processes, 2 groups of 2, ZeRO-2, SIGKILL and exact resume
# ------------------------------------------------------------------------------------------------


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 480) -> None:
    t0 = time.time()
    while True:
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.time() - t0 < timeout, f"step {step} never logged"
        f = out / "metrics.jsonl"
        if f.is_file() and any(json.loads(l)["step"] >= step for l in f.read_text().splitlines() if l.strip()):
            return
        time.sleep(0.05)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the ranks first, then the launcher: killing only the launcher would let the ranks
    see their parent die and stop gracefully (checkpoint included), which is not what is tested."""
    import psutil

    parent = psutil.Process(proc.pid)
    for p in [*reversed(parent.children(recursive=True)), parent]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.communicate()


@pytest.mark.slow
def test_four_ranks_two_groups_zero2_resume_exactly_after_sigkill(tmp_path, tiny_model):
    """~5 min on 2 shared cores (two launches of 4 DeepSpeed processes; each step ~2 s, startup ~2 min).

    Checkpoint at step 3; the first launch is killed once step 5 is logged, the rerun resumes
    from step 3 and recomputes steps 4 and 5: they must equal the killed run's, bit for bit."""
    cache, out = quick_start_cache(tmp_path / "cache", tiny_model), tmp_path / "run"
    args = command(out, cache, "train.progress=false", "train.export=false", "train.validation=false",
                   "train.rank_report=true", "train.max_steps=6", "train.checkpoint_every=3",
                   "train.sequence_parallel=2", "train.debug_step_delay_s=3", launch="cpu_2proc_zero2.yaml",
                   procs=4)
    proc = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(out, 5, proc)
        killed = metrics(out)
    finally:
        kill_tree(proc)  # the 4 ranks and their launcher, mid-run
    assert proc.returncode != 0  # killed (or exited on its killed ranks)
    assert (out / "checkpoints" / "step-3" / "COMPLETE").is_file()
    assert not (out / "checkpoints" / "step-6").exists() and not (out / "summary.json").exists()
    assert json.loads((out / "checkpoints" / "step-3" / "trainer_state.json").read_text())["sequence_parallel"] == 2

    p = run([a for a in args if not a.startswith("train.debug_step_delay_s")], timeout=600)
    assert "resumed from" in p.stdout
    resumed = metrics(out)
    assert sorted(resumed) == list(range(1, 7))
    for step in (4, 5):  # recomputed after the resume == what the killed run logged
        assert resumed[step]["loss/train"] == killed[step]["loss/train"], (step, resumed[step], killed[step])
        assert resumed[step]["optim/grad_norm"] == killed[step]["optim/grad_norm"]
    assert all(resumed[s]["time"] < resumed[4]["time"] for s in (1, 2, 3))  # steps 1-3 were not rerun

    r = reports(out, 4)
    assert [x["world_size"] for x in r] == [4] * 4
    assert len({x["param_sha256"] for x in r}) == 1  # ZeRO-2 over all 4 ranks: one set of weights
    assert r[0]["keys"] == r[1]["keys"] and r[2]["keys"] == r[3]["keys"]  # a group shares its samples
    assert all(k0 != k2 for k0, k2 in zip(r[0]["keys"], r[2]["keys"]))  # the groups read different ones
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sequence_parallel"] == 2 and summary["zero_stage"] == 2
    assert all(abs(m["perf/samples_per_s"] * m["perf/step_time_s"] - 2.0) < 1e-6 for m in resumed.values())


# ------------------------------------------------------------------------------------------------
# Checks (fast)
# ------------------------------------------------------------------------------------------------


def test_config_names_the_key_and_valid_values():
    from train.config import ConfigError, compose

    assert compose(["train.sequence_parallel=2"]).train.sequence_parallel == 2  # tiny: 2 heads
    with pytest.raises(ConfigError, match=r"train.sequence_parallel=0 must be >= 1"):
        compose(["train.sequence_parallel=0"])
    with pytest.raises(ConfigError, match=r"train.sequence_parallel=4.*heads.*valid values: \[1, 2\]"):
        compose(["train.sequence_parallel=4"])


def test_layout_needs_n_to_divide_the_processes():
    from train.config import ConfigError, compose
    from train.sequence import sequence_layout

    cfg = compose(["train.sequence_parallel=2"])
    with pytest.raises(ConfigError, match=r"sequence_parallel=2 must divide the number of processes \(3\).*\[1, 3\]"):
        sequence_layout(cfg, SimpleNamespace(num_processes=3, process_index=0))
    plain = sequence_layout(compose([]), SimpleNamespace(num_processes=3, process_index=2))
    assert (plain.size, plain.data_rank, plain.data_world, plain.enabled) == (1, 2, 3, False)


def test_resume_with_another_n_is_refused():
    from train.config import ConfigError
    from train.sequence import SequenceLayout, check_resume, record

    two = SequenceLayout(2, 0, 1)
    check_resume(two, {"step": 3, **record(two)})  # same N: fine
    check_resume(SequenceLayout(1, 0, 2), {"step": 3})  # written before N was recorded: N = 1
    with pytest.raises(ConfigError, match=r"sequence_parallel=2, this run has train.sequence_parallel=1"):
        check_resume(SequenceLayout(1, 0, 2), {"step": 3, **record(two)})
    with pytest.raises(ConfigError, match=r"sequence_parallel=1, this run has train.sequence_parallel=2"):
        check_resume(two, {"step": 3})


def test_planned_rank_runs_the_shard_sizes(monkeypatch):
    """The planner's one-process stand-in for one rank of N = 2: the model's output keeps its full
    shape (the gathered head output), the blocks see ceil(L / N) tokens, the attention kernel
    full-length q/k/v with H / N heads (padding keys dropped), the motion encoder ceil(F / N) face
    frames; backward reaches every parameter."""
    import torch

    import train.plan.sequence as planned
    from train.config import compose
    from wan_animate.config import WanAnimateConfig
    from wan_animate.model import WanAnimateDiT

    cfg = WanAnimateConfig.preset("tiny")
    dit = WanAnimateDiT(cfg)
    planned.install_planned(dit, compose(["train.sequence_parallel=2"]), world=8)
    seen: dict = {"kernel": []}

    def record(name, value):
        seen.setdefault(name, value)  # returns None: a pre-hook's non-None result would replace the inputs

    dit.blocks[0].register_forward_pre_hook(lambda m, args: record("block", tuple(args[0].shape)))
    seen["faces"] = 0  # frames through the motion encoder's first conv (it runs them in chunks)
    dit.motion_encoder.enc.net_app.convs[0].register_forward_pre_hook(
        lambda m, args: seen.update(faces=seen["faces"] + args[0].shape[0]))
    kernel = planned.attention
    monkeypatch.setattr(planned, "attention",
                        lambda q, k, v: seen["kernel"].append((tuple(q.shape), tuple(k.shape))) or kernel(q, k, v))
    frames, h, w, s = 2, 2, 6, cfg.motion_encoder_size  # 3 x 1 x 3 = 9 tokens: padded to 10, 5 per rank
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        x=torch.randn(1, cfg.out_dim, frames + 1, h, w, generator=g), t=torch.tensor([500.0]),
        context=torch.randn(1, 7, cfg.text_dim, generator=g), clip_fea=torch.randn(1, 5, cfg.image_dim, generator=g),
        y=torch.randn(1, cfg.in_dim - cfg.out_dim, frames + 1, h, w, generator=g),
        pose_latents=torch.randn(1, cfg.latent_channels, frames, h, w, generator=g),
        face_pixel_values=torch.rand(1, 3, 4 * frames - 3, s, s, generator=g) * 2 - 1)
    out = dit(**inputs)
    out.float().pow(2).mean().backward()
    assert out.shape == inputs["x"].shape
    assert seen["block"][1] == 5
    head_dim = cfg.dim // cfg.num_heads
    assert seen["kernel"][0] == ((1, 10, cfg.num_heads // 2, head_dim), (1, 9, cfg.num_heads // 2, head_dim))
    assert seen["faces"] == 3  # ceil(5 / 2) of the 5 face frames
    assert all(p.grad is not None for p in dit.parameters() if p.requires_grad)
