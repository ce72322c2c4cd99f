"""Animate-2 generation on a tiny random Animate-2 folder: segments, the extract pass once per
segment, CFG with the block skip, the distilled score modification, eval.generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wan_animate.animate2.pipeline import DISTILLED, Animate2Pipeline, check_driving_video
from wan_animate.pipeline import AnimatePipeline, InputError, num_segments
from wan_animate.testing import make_tiny_model_folder

CLIP, STEPS, SIZE, FRAMES = 5, 2, 32, 9  # 9 frames in 5-frame segments overlapping by 1 -> 2 segments


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``tiny_narrow`` (``tiny`` with 32-wide CLIP: official layout only): at the 1280 width that
    diffusers' class fixes, CLIP and the image embedding are much of a tiny generation step. The
    layouts test below writes ``tiny`` in both layouts."""
    return make_tiny_model_folder(tmp_path_factory.mktemp("a2") / "tiny", layout="official", seed=0,
                                  family="animate2", config_preset="tiny_narrow")


@pytest.fixture(scope="module")
def pipe(folder):
    return Animate2Pipeline.from_pretrained(folder, dtype=torch.float32)


def _video(frames=FRAMES, size=SIZE, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)


class Spy:
    """Records the extract and generate calls of an Animate-2 DiT."""

    def __init__(self, dit):
        self.dit, self.extracts, self.generates = dit, [], []
        self._extract, self._generate = dit.extract, dit.generate

        def extract(*a, **k):
            self.extracts.append(a[0].shape)
            return self._extract(*a, **k)

        def generate(x, t, context, clip_fea, y, cache, **k):
            self.generates.append(dict(context=context.clone(), y=y.clone(), skip=tuple(k.get("skip_blocks", ())),
                                       log_scale=k.get("log_scale")))
            return self._generate(x, t, context, clip_fea, y, cache, **k)

        dit.extract, dit.generate = extract, generate

    def undo(self):
        del self.dit.extract, self.dit.generate


def test_generates_a_video_with_segments_extract_once_and_cfg_block_skip(pipe):
    ref = _video(1, seed=2)[0]
    spy = Spy(pipe.dit)
    try:
        out = pipe.generate(ref, _video(), steps=STEPS, clip_len=CLIP, guide_scale=3.0, progress=False)
    finally:
        spy.undo()
    assert out.shape == (FRAMES, SIZE, SIZE, 3) and out.dtype == np.uint8
    n_seg = num_segments(FRAMES, CLIP, 1)
    assert n_seg == 2
    assert len(spy.extracts) == n_seg  # the extract pass once per segment, not per step
    assert spy.extracts[0] == (1, 16, 2, SIZE // 8, SIZE // 8)
    assert len(spy.generates) == n_seg * STEPS * 2  # conditional + unconditional
    cond, uncond = spy.generates[0], spy.generates[1]
    assert cond["skip"] == () and uncond["skip"] == pipe.config.uncond_skip_blocks == (1,)
    assert not torch.equal(cond["context"], uncond["context"])  # the negative prompt
    # the first segment's video slots carry no given frame; the second's first latent frame does
    first, second = spy.generates[0]["y"], spy.generates[-1]["y"]
    assert first[:, :4, 1:].abs().sum() == 0 and second[:, :4, 1].min() == 1
    # the same seed gives the same video; another seed another one
    again = pipe.generate(ref, _video(), steps=STEPS, clip_len=CLIP, guide_scale=3.0, progress=False)
    np.testing.assert_array_equal(out, again)


@pytest.mark.slow  # ~13 CPU s of sampling on 2 cores
def test_distilled_settings_change_the_score_and_skip_cfg(pipe):
    ref = _video(1, seed=2)[0]
    spy = Spy(pipe.dit)
    try:
        distilled = pipe.generate(ref, _video(), steps=STEPS, clip_len=CLIP, guide_scale=DISTILLED.guide_scale,
                                  log_scale=DISTILLED.log_scale, progress=False)
    finally:
        spy.undo()
    assert len(spy.generates) == num_segments(FRAMES, CLIP, 1) * STEPS  # no unconditional branch
    assert {g["log_scale"] for g in spy.generates} == {-1.3}
    base = pipe.generate(ref, _video(), steps=STEPS, clip_len=CLIP, guide_scale=1.0, progress=False)
    assert not np.array_equal(distilled, base)


def test_driving_video_matters_and_inputs_are_checked(pipe):
    ref = _video(1, seed=2)[0]
    a = pipe.generate(ref, _video(seed=1), steps=1, clip_len=CLIP, guide_scale=1.0, progress=False)
    b = pipe.generate(ref, _video(seed=3), steps=1, clip_len=CLIP, guide_scale=1.0, progress=False)
    assert not np.array_equal(a, b)
    with pytest.raises(InputError, match="multiples of 16"):
        check_driving_video(_video(size=36), clip_len=CLIP, refert_num=1)
    with pytest.raises(InputError, match="4n\\+1"):
        check_driving_video(_video(), clip_len=6, refert_num=1)
    with pytest.raises(TypeError, match="Animate2Config"):
        AnimatePipeline(pipe.dit, pipe.vae, pipe.text_encoder, pipe.image_encoder)


@pytest.mark.slow  # ~13 CPU s of sampling on 2 cores
def test_eval_generate_detects_the_family(folder, tmp_path):
    from PIL import Image

    from eval.generate import main
    from wan_animate.video_io import read_video, write_video

    Image.fromarray(_video(1, size=40, seed=2)[0]).save(tmp_path / "ref.png")
    write_video(tmp_path / "driving.mp4", _video(frames=FRAMES, size=48), 16.0)
    args = ["--model", str(folder), "--ref", str(tmp_path / "ref.png"), "--driving-video",
            str(tmp_path / "driving.mp4"), "--out", str(tmp_path / "out.mp4"), "--steps", "1", "--clip-len",
            str(CLIP), "--target-area", str(32 * 32), "--no-progress"]
    assert main(args) == 0
    frames, fps = read_video(tmp_path / "out.mp4")
    assert frames.shape == (FRAMES, 32, 32, 3) and fps == 16.0
    # a LoRA in the community layout (official module names) is merged and changes the video
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({"diffusion_model.blocks.0.block.self_attn.q.lora_A.weight": torch.randn(4, 64, generator=g),
               "diffusion_model.blocks.0.block.self_attn.q.lora_B.weight": torch.randn(64, 4, generator=g)},
              str(tmp_path / "lora.safetensors"))
    lora_args = [*args, "--lora", str(tmp_path / "lora.safetensors")]
    lora_args[lora_args.index("--out") + 1] = str(tmp_path / "lora.mp4")
    assert main(lora_args) == 0
    assert not np.array_equal(read_video(tmp_path / "lora.mp4")[0], frames)
    # v1 inputs with an Animate-2 model, and the raw-video flag with a v1 model: one clear line each
    assert main([*args[:4], "--pose", str(tmp_path / "driving.mp4"), "--face", str(tmp_path / "driving.mp4"),
                 "--out", str(tmp_path / "x.mp4")]) == 2
    v1 = make_tiny_model_folder(tmp_path / "v1", layout="diffusers")
    assert main(["--model", str(v1), *args[2:]]) == 2


def test_eval_cell_and_report_with_an_animate2_model(folder, tmp_path):
    """An eval cell on schema-v2 synthetic shards (driving.mp4: the same motion by another character):
    generated from the driving stream, scored against the target; the held-out loss and condition
    sensitivity (driving video, reference) through the family's batches and forward; conditions the
    family lacks are reported as not computed with the reason; the report reads the cells.
    Version-1 shards fail the cell with the fix."""
    import dataclasses

    from data_tools.synthetic_data import make_synthetic_dataset
    from eval.config import EvalConfig, MetricsConfig
    from eval.report import build_report
    from eval.runner import run_cell

    data = make_synthetic_dataset(tmp_path / "v2", num_clips=2, clip_len=CLIP, height=SIZE, width=SIZE,
                                  driving=True)
    cfg = EvalConfig(model_dir=str(folder), eval_set=str(data), dtype="float32", device="cpu", steps=1,
                     clip_len=CLIP, max_samples=1, skip_finished=False,
                     metrics=MetricsConfig(names=["psnr", "ssim", "flicker", "heldout"]))
    sweep = tmp_path / "sweep"
    record = run_cell(cfg, sweep / "cell")
    assert record["status"] == "ok", record.get("traceback")
    m = record["metrics"]
    assert {"psnr", "ssim", "flicker"} <= set(m)
    assert m["heldout_samples"] == 1 and m["heldout_loss"] > 0 and {f"heldout_loss@t{t}" for t in (100, 900)} <= set(m)
    loss_only = dataclasses.replace(cfg, max_samples=2, metrics=MetricsConfig(names=["sensitivity"]))
    m = run_cell(loss_only, sweep / "sensitivity")["metrics"]
    assert m["sensitivity_samples"] == 2 and {"sensitivity_driving", "sensitivity_ref"} <= set(m)
    assert not any(k.startswith(("sensitivity_pose", "sensitivity_face")) for k in m)
    wrong = dataclasses.replace(loss_only, metrics=MetricsConfig(names=["sensitivity"], sensitivity_conditions=["pose"]))
    assert "model.family=animate2" in run_cell(wrong, sweep / "pose")["not_computed"]["sensitivity"]
    summary = build_report(sweep)
    assert (summary["cells"], summary["ok"]) == (3, 3) and "sensitivity_driving" in (sweep / "report.md").read_text()
    v1_data = make_synthetic_dataset(tmp_path / "v1", num_clips=1, clip_len=CLIP, height=SIZE, width=SIZE)
    failed = run_cell(dataclasses.replace(cfg, eval_set=str(v1_data)), tmp_path / "v1cell")
    assert failed["status"] == "failed" and "driving.mp4" in failed["error"]


@pytest.mark.slow
def test_official_and_diffusers_layouts_generate_the_same_video(tmp_path):
    diffusers = make_tiny_model_folder(tmp_path / "diffusers", layout="diffusers", seed=0, family="animate2")
    official = make_tiny_model_folder(tmp_path / "official", layout="official", seed=0, family="animate2")
    pipe = Animate2Pipeline.from_pretrained(diffusers, dtype=torch.float32)
    other = Animate2Pipeline.from_pretrained(official, dtype=torch.float32)
    ref = _video(1, seed=2)[0]
    kw = dict(steps=1, clip_len=CLIP, guide_scale=1.0, progress=False)
    np.testing.assert_array_equal(other.generate(ref, _video(), **kw), pipe.generate(ref, _video(), **kw))
