"""Sequence parallelism (wan_animate.parallel): 2 gloo processes equal one process, exactly.

One spawn runs every distributed case (the DeepSpeed import dominates the cost); each rank also
computes the single-process reference itself, then reports relative errors for the parent to check.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_dit_inputs

from wan_animate.config import WanAnimateConfig
from wan_animate.model import WanAnimateDiT, apply_activation_checkpointing
from wan_animate.model.attention import SelfAttention, attention
from wan_animate.parallel import TokenLayout, check_sequence_parallel_size

TOL = 1e-5

# name: (preset, batch, target latent frames, latent h, latent w, activation checkpointing, negative control)
# tiny: patch (1, 2, 2). "even": 3 frames x 6 tokens = 18 tokens, rank 1 starts mid frame 1.
# "odd": 3 frames x 3 tokens = 9 tokens -> padded to 10; frame 1 spans the boundary; 5 face crops.
CASES = {
    "even": ("tiny", 2, 2, 4, 6, False, False),
    "odd": ("tiny", 1, 2, 2, 6, True, False),
    "odd_tiny_b": ("tiny_b", 1, 2, 2, 6, False, False),
    "odd_unmasked_padding": ("tiny", 1, 2, 2, 6, False, True),
}


def _inputs(cfg: WanAnimateConfig, batch: int, frames: int, h: int, w: int) -> dict[str, torch.Tensor]:
    return make_dit_inputs(cfg, batch, frames, h, w, seed=1, text_tokens=7, image_tokens=5)


def _forward_backward(model: WanAnimateDiT, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = model(**inputs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * weight).sum().backward()  # a generic linear functional: every output element matters
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()


def _run_case(case: str, group: dist.ProcessGroup) -> dict:
    from wan_animate.parallel import apply_sequence_parallel

    preset, batch, frames, h, w, checkpointed, unmasked = CASES[case]
    cfg = WanAnimateConfig.preset(preset)
    torch.manual_seed(0)
    reference = WanAnimateDiT(cfg)
    parallel = WanAnimateDiT(cfg)
    parallel.load_state_dict(reference.state_dict())
    if checkpointed:
        apply_activation_checkpointing(parallel)
    plan = apply_sequence_parallel(parallel, group)
    if unmasked:  # negative control: attend to the padding keys too
        plan._ulysses.local_attn = attention
    errors = compare_to_one_process(reference, parallel, _inputs(cfg, batch, frames, h, w), group)
    return {**errors, "layout": [plan.layout.total, plan.layout.padded, plan.layout.start, plan.layout.tokens_per_frame]}


def compare_to_one_process(reference, parallel, inputs: dict, group: dist.ProcessGroup) -> dict:
    """Relative errors of the sequence-parallel model's output and of every parameter gradient (mean
    over the group) against the plain model on the same inputs (any model family)."""
    ref_out, ref_grads = _forward_backward(reference, inputs)
    out, grads = _forward_backward(parallel, inputs)
    worst_name, worst = "", 0.0
    for name, grad in grads.items():
        dist.all_reduce(grad, group=group)  # data-parallel averaging over the group ...
        err = _rel(grad / dist.get_world_size(group), ref_grads[name])  # ... gives the exact gradient
        if err > worst:
            worst_name, worst = name, err
    return {"out": _rel(out, ref_out), "grad": worst, "grad_name": worst_name,
            "grads_nonzero": all(g.norm() > 0 for g in ref_grads.values())}


def _generate(pipe, recorded: list) -> "np.ndarray":
    """Generate a 7-frame clip (2 segments of 5, 3 x 3 latent tokens per frame: 27, odd) with
    guidance (two DiT calls per step), recording the latents handed to the VAE decoder."""
    import numpy as np

    rng = np.random.default_rng(0)
    decode = pipe.vae.decode
    pipe.vae.decode = lambda latents: recorded.append(latents.clone()) or decode(latents)
    try:
        return pipe.generate(
            ref_image=rng.integers(0, 256, (48, 40, 3), dtype=np.uint8),
            pose_video=rng.integers(0, 256, (7, 48, 48, 3), dtype=np.uint8),
            face_video=rng.integers(0, 256, (7, 40, 40, 3), dtype=np.uint8),
            steps=3, clip_len=5, refert_num=1, guide_scale=2.0, progress=False,
        )
    finally:
        pipe.vae.decode = decode


def _run_generation(model_dir: str, group: dist.ProcessGroup) -> dict:
    """The unchanged pipeline with a sequence-parallel DiT equals the plain one (same process)."""
    from wan_animate.parallel import apply_sequence_parallel
    from wan_animate.pipeline import AnimatePipeline

    pipe = AnimatePipeline.from_pretrained(model_dir, dtype=torch.float32)
    ref_latents, latents = [], []
    ref_video = _generate(pipe, ref_latents)
    plan = apply_sequence_parallel(pipe.dit, group)
    video = _generate(pipe, latents)
    return {
        "latents": max(_rel(a, b) for a, b in zip(latents, ref_latents)),
        "segments": len(latents),
        "max_pixel_diff": int(abs(video.astype(int) - ref_video.astype(int)).max()),
        "tokens": plan.layout.total,
    }


def _same_sample_check(group: dist.ProcessGroup) -> list[str]:
    """check_same_sample passes on equal inputs and names the tensor that differs otherwise."""
    from wan_animate.parallel import check_same_sample

    inputs = _inputs(WanAnimateConfig.preset("tiny"), 1, 2, 2, 6)
    check_same_sample(inputs, group)
    inputs["t"] = inputs["t"] + dist.get_rank(group)  # rank 1 drew another timestep
    try:
        check_same_sample(inputs, group)
    except RuntimeError as e:
        return [str(e)]
    return []


def _worker(rank: int, world: int, port: int, result_dir: str, model_dir: str) -> None:
    torch.set_num_threads(1)  # two processes on a shared CPU: no oversubscription
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from wan_animate.parallel import sequence_parallel_mesh

        mesh = sequence_parallel_mesh(world, "cpu")
        group = mesh["sequence"].get_group()
        results = {case: _run_case(case, group) for case in CASES}
        results["generation"] = _run_generation(model_dir, group)
        results["same_sample_check"] = _same_sample_check(group)
        results["mesh"] = [mesh["data"].size(), mesh["data"].get_local_rank(), mesh["sequence"].get_local_rank()]
        with open(f"{result_dir}/rank{rank}.json", "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ~40 s on 2 cores, most of it importing DeepSpeed and building its CPU comm op in two processes.
@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory, tiny_model):
    result_dir = tmp_path_factory.mktemp("sp")
    model_dir = tiny_model  # diffusers layout, seed 0
    mp.spawn(_worker, args=(2, _free_port(), str(result_dir), str(model_dir)), nprocs=2, join=True)
    return [json.loads((result_dir / f"rank{r}.json").read_text()) for r in range(2)]


# ------------------------------------------------------------------------------------------------
# 2 processes vs 1
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if not CASES[c][-1]])
def test_two_ranks_equal_one_process(two_rank_results, case):
    """Forward and every parameter gradient (group mean) equal one process on the same sample."""
    for rank, results in enumerate(two_rank_results):
        r = results[case]
        assert r["grads_nonzero"], "every parameter must get a gradient, or the check is vacuous"
        assert r["out"] <= TOL, (rank, r)
        assert r["grad"] <= TOL, (rank, r)


@pytest.mark.slow
def test_layouts_cover_boundary_cases(two_rank_results):
    """The cases really have a padded token count and a frame that spans the shard boundary."""
    total, padded, start, hw = two_rank_results[1]["odd"]["layout"]
    assert (total, padded, start, hw) == (9, 10, 5, 3)
    assert start % hw != 0  # rank 1 starts inside frame 1
    total, padded, start, hw = two_rank_results[1]["even"]["layout"]
    assert (total, padded, start, hw) == (18, 18, 9, 6) and start % hw != 0


@pytest.mark.slow
def test_unmasked_padding_is_wrong(two_rank_results):
    """Negative control: attending to the padding keys changes the output (the mask matters)."""
    assert two_rank_results[0]["odd_unmasked_padding"]["out"] > 1e-3


@pytest.mark.slow
def test_generation_two_ranks_equal_one_process(two_rank_results):
    """AnimatePipeline.generate with the DiT split over 2 ranks (guidance on, 2 segments, odd token
    count) gives the 1-process latents (fp32) and video, on both ranks."""
    for results in two_rank_results:
        r = results["generation"]
        assert r["segments"] == 2 and r["tokens"] == 27, r
        assert r["latents"] <= TOL, r
        assert r["max_pixel_diff"] <= 1, r  # uint8 rounding of equal-to-1e-5 floats


@pytest.mark.slow
def test_check_same_sample_names_the_differing_input(two_rank_results):
    for results in two_rank_results:
        (message,) = results["same_sample_check"]
        assert "input 't' differs" in message and "data-parallel rank" in message


@pytest.mark.slow
def test_mesh_groups(two_rank_results):
    """2 processes, sequence_parallel=2: one data-parallel rank (both read sample 0)."""
    assert [r["mesh"] for r in two_rank_results] == [[1, 0, 0], [1, 0, 1]]


# ------------------------------------------------------------------------------------------------
# Single process
# ------------------------------------------------------------------------------------------------


def test_one_rank_equals_plain(tmp_path):
    """N = 1: the sequence-parallel code path gives the plain model's output bit for bit (gradients
    to float rounding: the gathers reorder the motion encoder's backward), and applying it to one
    model leaves the plain path of every other model untouched."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdzv", rank=0, world_size=1)
    try:
        from wan_animate.parallel import apply_sequence_parallel

        cfg = WanAnimateConfig.preset("tiny")
        plain = WanAnimateDiT(cfg)
        parallel = WanAnimateDiT(cfg)
        parallel.load_state_dict(plain.state_dict())
        apply_sequence_parallel(parallel, dist.group.WORLD)
        inputs = _inputs(cfg, 1, 2, 2, 6)
        out, grads = _forward_backward(parallel, inputs)
        ref_out, ref_grads = _forward_backward(plain, inputs)
        assert torch.equal(out, ref_out)
        assert max(_rel(grads[n], ref_grads[n]) for n in grads) <= TOL
        assert WanAnimateDiT.sequence_shard is None and plain.sequence_shard is None
        assert SelfAttention.attention_fn is attention and plain.blocks[0].self_attn.attention_fn is attention
        with pytest.raises(ValueError, match="already applied"):
            apply_sequence_parallel(parallel, dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_heads_must_divide():
    check_sequence_parallel_size(40, 8)
    with pytest.raises(ValueError, match=r"train.sequence_parallel=3.*num_heads.*valid values: \[1, 2, 4, 5, 8, 10, 20, 40\]"):
        check_sequence_parallel_size(40, 3)


@pytest.mark.parametrize(
    "layout, parts",
    [
        (TokenLayout(9, 10, 0, 5, 3), [(0, 3), (3, 5)]),  # whole frame 0, partial frame 1
        (TokenLayout(9, 10, 5, 5, 3), [(5, 6), (6, 9)]),  # partial frame 1, whole frame 2, padding
        (TokenLayout(40, 40, 13, 20, 6), [(13, 18), (18, 30), (30, 33)]),  # partial, 2 whole, partial
        (TokenLayout(4, 8, 6, 2, 2), []),  # only padding
        (TokenLayout(10, 10, 2, 1, 4), [(2, 3)]),  # inside one frame
    ],
)
def test_frame_parts(layout, parts):
    assert layout.frame_parts() == parts


# ------------------------------------------------------------------------------------------------
# python -m eval.generate --sequence-parallel N
# ------------------------------------------------------------------------------------------------


def _cli_inputs(tmp_path, model):
    import numpy as np
    from PIL import Image

    from wan_animate.video_io import write_video

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(tmp_path / "ref.png")
    write_video(tmp_path / "pose.mp4", rng.integers(0, 256, (6, 48, 48, 3), dtype=np.uint8), 24.0)
    write_video(tmp_path / "face.mp4", rng.integers(0, 256, (6, 40, 40, 3), dtype=np.uint8), 24.0)
    return [str(a) for a in ("--model", model, "--ref", tmp_path / "ref.png", "--pose", tmp_path / "pose.mp4",
                             "--face", tmp_path / "face.mp4", "--steps", 2, "--clip-len", 5, "--guide-scale", 2,
                             "--device", "cpu", "--no-progress")]


def test_cli_needs_torchrun_processes(tmp_path, tiny_model, monkeypatch, capsys):
    from eval.generate import main

    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main([*_cli_inputs(tmp_path, tiny_model), "--out", str(tmp_path / "x.mp4"), "--sequence-parallel", "2"]) == 2
    assert "torchrun --nproc_per_node 2" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.slow
def test_cli_two_processes_write_the_one_process_video(tmp_path, tiny_model):
    """torchrun --nproc_per_node 2 -m eval.generate ... --sequence-parallel 2 == 1 process (27 tokens
    per call: padded; guidance on; 2 segments)."""
    import os
    import subprocess
    import sys

    from eval.generate import main
    from wan_animate.video_io import read_video

    args = _cli_inputs(tmp_path, tiny_model)
    assert main([*args, "--out", str(tmp_path / "one.mp4")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "eval.generate", *args, "--out", str(tmp_path / "two.mp4"), "--sequence-parallel", "2"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    one, _ = read_video(tmp_path / "one.mp4")
    two, _ = read_video(tmp_path / "two.mp4")
    assert one.shape == two.shape == (6, 48, 48, 3)
    assert abs(one.astype(int) - two.astype(int)).max() <= 1


def test_first_batch_check_moves_every_sum_to_the_collective_device(monkeypatch):
    """With NCCL the batch lives on the GPU while the noise generator's state is a CPU tensor: the
    check must bring every per-input sum to one device before stacking. A second device kind (meta)
    stands in for the GPU; the gather sees one tensor on that device."""
    from train.sequence import SequenceLayout, check_first_batch

    seen = []

    class Gathered(Exception):
        pass

    def all_gather(out, tensor, group=None):
        seen.append(tensor)
        raise Gathered  # meta tensors hold no values to compare: stop at the collective

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    batch = {"latents": torch.empty(1, 16, 3, 4, 6, device="meta"), "t": torch.empty(1, device="meta"),
             "key": ["sample-0"]}
    layout = SequenceLayout(size=2, data_rank=0, data_world=1, group=object())
    with pytest.raises(Gathered):
        check_first_batch(layout, batch, torch.Generator().manual_seed(0))
    assert len(seen) == 1 and seen[0].device.type == "meta" and seen[0].shape == (3,)


def test_split_keeps_only_this_ranks_rows_alive():
    """Each rank's shard of the residual stream is its own tensor of local size (a view would keep
    the whole padded sequence alive through every block); padding rows are zeros / the identity
    rotation, and gradients flow back to the full stream."""
    from wan_animate.parallel import SequenceParallel

    h = torch.randn(1, 10, 8, requires_grad=True)
    cos, sin = torch.randn(10, 4), torch.randn(10, 4)
    plan = SequenceParallel.__new__(SequenceParallel)  # split() needs only the group's size and rank
    plan.size = 4
    total = torch.zeros(())
    for rank in range(4):
        plan.rank = rank
        hl, cl, sl = plan.split(h * 1.0, cos, sin, (1, 2, 5))
        for t in (hl, cl, sl):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
        start, real = 3 * rank, max(0, min(3, 10 - 3 * rank))
        assert hl.shape == (1, 3, 8) and torch.equal(hl[:, :real], h[:, start:start + real])
        assert (hl[:, real:] == 0).all() and (cl[real:] == 1).all() and (sl[real:] == 0).all()
        assert torch.equal(cl[:real], cos[start:start + real])
        total = total + hl.sum()
    total.backward()
    assert torch.equal(h.grad, torch.ones_like(h))
