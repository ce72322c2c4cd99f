"""The shared inference path on tiny random model folders (both layouts)."""

import numpy as np
import pytest
import torch

from wan_animate.pipeline import (
    AnimatePipeline,
    InputError,
    check_inputs,
    mirror_indices,
    num_segments,
    padded_length,
)
from wan_animate.testing import make_tiny_model_folder

CLIP, STEPS, SIZE = 9, 2, 32


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "diffusers": make_tiny_model_folder(root / "diffusers", layout="diffusers", seed=0),
        "official": make_tiny_model_folder(root / "official", layout="official", seed=0),
    }


@pytest.fixture(scope="module")
def peer(folders):
    """diffusers' own pipeline on the same tiny diffusers-layout folder."""
    from diffusers import WanAnimatePipeline

    return WanAnimatePipeline.from_pretrained(str(folders["diffusers"]))


@pytest.fixture(scope="module")
def pipe(folders):
    return AnimatePipeline.from_pretrained(folders["diffusers"], dtype=torch.float32)


class Spy(torch.nn.Module):
    """Wraps a DiT and records what every forward call saw."""

    def __init__(self, dit):
        super().__init__()
        self.inner = dit
        self.config = dit.config
        self.calls = []

    @property
    def patch_embedding(self):
        return self.inner.patch_embedding

    def forward(self, x, t, context, clip_fea, y, pose_latents, face):
        self.calls.append(dict(y=y.clone(), face_min=face.min().item(), face_max=face.max().item(),
                               context=context.clone(), t=t.clone()))
        return self.inner(x, t, context, clip_fea, y, pose_latents, face)


def driving(n, seed=0, size=SIZE, face=40):
    rng = np.random.default_rng(seed)
    return dict(
        ref_image=rng.integers(0, 256, (48, 40, 3), dtype=np.uint8),
        pose_video=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        face_video=rng.integers(0, 256, (n, face, face, 3), dtype=np.uint8),
    )


def gen(p, inputs, **kw):
    kw = {"steps": STEPS, "clip_len": CLIP, "refert_num": 1, "progress": False, **kw}
    return p.generate(**inputs, **kw)


# ---------------------------------------------------------------------------------------------
# segment arithmetic (facts section 6)
# ---------------------------------------------------------------------------------------------


def test_segment_arithmetic_by_hand():
    assert mirror_indices(5, 10).tolist() == [0, 1, 2, 3, 4, 3, 2, 1, 0, 1]
    assert mirror_indices(1, 3).tolist() == [0, 0, 0]
    # 77-frame clips overlapping by 1: 76 new frames per later segment
    assert padded_length(77, 77, 1) == 77 and num_segments(77, 77, 1) == 1
    assert padded_length(78, 77, 1) == 153 and num_segments(78, 77, 1) == 2
    assert padded_length(164, 77, 5) == 5 + 3 * 72 and num_segments(164, 77, 5) == 3
    assert padded_length(3, 9, 1) == 9 and num_segments(3, 9, 1) == 1


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_frames,n_seg", [(7, 1), (12, 2), (20, 3)])
def test_output_length_and_segments(pipe, n_frames, n_seg):
    assert num_segments(n_frames, CLIP, 1) == n_seg
    spy = Spy(pipe.dit)
    p = AnimatePipeline(spy, pipe.vae, pipe.text_encoder, pipe.image_encoder)
    out = gen(p, driving(n_frames))
    assert out.shape == (n_frames, SIZE, SIZE, 3) and out.dtype == np.uint8
    assert len(spy.calls) == n_seg * STEPS  # guide_scale 1: no unconditional pass
    # first segment: no temporal reference given; later ones: the carried frame (latent 0) is given
    for s in range(n_seg):
        y = spy.calls[s * STEPS]["y"]
        assert torch.all(y[:, :4, 0] == 1)
        assert torch.all(y[:, :4, 1] == (0 if s == 0 else 1))
        assert torch.all(y[:, :4, 2:] == 0)
        if s > 0:  # carried frames are encoded into the condition latent (zeros would not be)
            assert not torch.allclose(y[:, 4:, 1], spy.calls[0]["y"][:, 4:, 1])


def test_same_seed_same_video(pipe):
    inputs = driving(7)
    a = gen(pipe, inputs, seed=3)
    b = gen(pipe, inputs, seed=3)
    c = gen(pipe, inputs, seed=4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_cfg_uses_negative_prompt_and_black_face(pipe):
    spy = Spy(pipe.dit)
    p = AnimatePipeline(spy, pipe.vae, pipe.text_encoder, pipe.image_encoder)
    inputs = driving(7)
    plain = gen(p, inputs)
    assert len(spy.calls) == STEPS
    spy.calls.clear()
    guided = gen(p, inputs, guide_scale=3.0, negative_prompt="blurry")
    assert len(spy.calls) == 2 * STEPS
    cond, uncond = spy.calls[0], spy.calls[1]
    assert uncond["face_min"] == -1 and uncond["face_max"] == -1
    assert cond["face_max"] > -1
    assert not torch.equal(cond["context"], uncond["context"])
    assert torch.equal(cond["y"], uncond["y"])  # reference / pose / condition unchanged
    assert not np.array_equal(plain, guided)


@pytest.mark.parametrize("solver", ["dpm++", "euler"])
def test_other_solvers_run(pipe, solver):
    out = gen(pipe, driving(7), solver=solver)
    assert out.shape == (7, SIZE, SIZE, 3)


def test_replace_mode_refert5(pipe):
    spy = Spy(pipe.dit)
    p = AnimatePipeline(spy, pipe.vae, pipe.text_encoder, pipe.image_encoder)
    n = 12
    inputs = driving(n)
    rng = np.random.default_rng(1)
    bg = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((n, SIZE, SIZE), dtype=np.uint8)
    mask[:, 8:24, 8:24] = 255  # character in the middle (latent rows/cols 1..2)
    out = gen(p, inputs, bg_video=bg, mask_video=mask, refert_num=5)
    assert out.shape == (n, SIZE, SIZE, 3)
    y0 = spy.calls[0]["y"]  # first segment: mask = environment only
    assert torch.all(y0[:, :4, 1:, 1:3, 1:3] == 0) and torch.all(y0[:, :4, 1:, 0] == 1)
    y1 = spy.calls[STEPS]["y"]  # second segment: 5 carried frames -> latent frames 0 and 1 fully given
    assert torch.all(y1[:, :4, 1:3] == 1) and torch.all(y1[:, :4, 3:, 1:3, 1:3] == 0)
    assert not np.array_equal(out, gen(pipe, inputs, refert_num=5))


def test_both_layouts_load_and_agree(folders, pipe):
    official = AnimatePipeline.from_pretrained(folders["official"], dtype=torch.float32)
    inputs = driving(7)
    assert np.array_equal(gen(pipe, inputs), gen(official, inputs))


def test_peer_dit_matches_diffusers_pipeline_transformer(pipe, peer):
    transformer = peer.transformer.eval()
    g = torch.Generator().manual_seed(0)
    cfg = pipe.config
    x = torch.randn(1, 16, 3, 4, 4, generator=g)
    y = torch.randn(1, 20, 3, 4, 4, generator=g)
    pose = torch.randn(1, 16, 2, 4, 4, generator=g)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    clip = torch.randn(1, 257, cfg.image_dim, generator=g)
    face = torch.rand(1, 3, 5, cfg.motion_encoder_size, cfg.motion_encoder_size, generator=g) * 2 - 1
    t = torch.tensor([700.0])
    with torch.no_grad():
        ours = pipe.dit(x, t, ctx, clip, y, pose, face)
        theirs = transformer(hidden_states=torch.cat([x, y], 1), timestep=t, encoder_hidden_states=ctx,
                      encoder_hidden_states_image=clip, pose_hidden_states=pose, face_pixel_values=face,
                      return_dict=False)[0]
    assert ours.shape == theirs.shape == x.shape
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-5)
    assert ours.abs().max() > 1e-3  # not trivially zero


def test_lora_scale(pipe, tmp_path):
    from safetensors.torch import save_file

    dim = pipe.config.dim
    a, b = torch.randn(2, dim), torch.randn(dim, 2)
    path = tmp_path / "lora.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": a,
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": b}, str(path))
    w = pipe.dit.blocks[0].self_attn.q.weight
    before = w.detach().clone()
    try:
        pipe.load_lora(path, scale=0.5)
        torch.testing.assert_close(w.detach(), before + 0.5 * (b @ a))
    finally:
        with torch.no_grad():
            w.copy_(before)


def test_bad_inputs_raise_clear_errors(pipe):
    ok = driving(9)
    with pytest.raises(InputError, match="multiples of 16"):
        check_inputs(np.zeros((9, 40, 64, 3), np.uint8), ok["face_video"], clip_len=CLIP)
    with pytest.raises(InputError, match="must match"):
        check_inputs(ok["pose_video"], ok["face_video"][:5], clip_len=CLIP)
    with pytest.raises(InputError, match="4n\\+1"):
        check_inputs(ok["pose_video"], ok["face_video"], clip_len=8)
    with pytest.raises(InputError, match="both bg_video and mask_video"):
        check_inputs(ok["pose_video"], ok["face_video"], bg_video=ok["pose_video"], clip_len=CLIP)
    with pytest.raises(InputError, match="uint8"):
        check_inputs(ok["pose_video"].astype(np.float32), ok["face_video"], clip_len=CLIP)
    with pytest.raises(InputError, match="solver"):
        gen(pipe, ok, solver="ddim")
    with pytest.raises(FileNotFoundError, match="neither a diffusers layout"):
        AnimatePipeline.detect_layout(pipe_dir_empty := __import__("tempfile").mkdtemp())
    del pipe_dir_empty


# ---------------------------------------------------------------------------------------------
# python -m eval.generate
# ---------------------------------------------------------------------------------------------


def _write_inputs(d, n, size=SIZE, fps=24.0, replace=False, prefix=""):
    from PIL import Image

    from wan_animate.video_io import write_video

    d.mkdir(parents=True, exist_ok=True)
    x = driving(n, size=size)
    Image.fromarray(x["ref_image"]).save(d / f"{prefix}ref.png")
    write_video(d / f"{prefix}pose.mp4", x["pose_video"], fps)
    write_video(d / f"{prefix}face.mp4", x["face_video"], fps)
    if replace:
        write_video(d / f"{prefix}bg.mp4", x["pose_video"][:, ::-1].copy(), fps)
        mask = np.zeros((n, size, size, 3), np.uint8)
        mask[:, 8:24, 8:24] = 255
        write_video(d / f"{prefix}mask.mp4", mask, fps)
    return d


def _run_cli(*args):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "eval.generate", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_cli_end_to_end(folders, tmp_path):
    from wan_animate.video_io import read_video

    src = _write_inputs(tmp_path / "in", 12, fps=24.0)
    out = tmp_path / "out.mp4"
    r = _run_cli("--model", folders["diffusers"], "--ref", src / "ref.png", "--pose", src / "pose.mp4",
                 "--face", src / "face.mp4", "--out", out, "--steps", 2, "--clip-len", 9, "--seed", 1)
    assert r.returncode == 0, r.stderr[-2000:]
    frames, fps = read_video(out)
    assert frames.shape == (12, SIZE, SIZE, 3) and abs(fps - 24.0) < 1e-3
    assert "segments" in r.stderr and "steps" in r.stderr  # progress bars

    pre = _write_inputs(tmp_path / "pre", 7, fps=30.0, replace=True, prefix="src_")
    out2 = tmp_path / "replace.mp4"
    # in-process (saves a second interpreter start-up): official layout, preprocessed folder, replace
    from eval.generate import main

    assert main([str(a) for a in ("--model", folders["official"], "--preprocessed", pre, "--out", out2,
                                  "--steps", 2, "--clip-len", 9, "--refert-num", 5, "--solver", "dpm++",
                                  "--no-progress")]) == 0
    frames, fps = read_video(out2)
    assert frames.shape == (7, SIZE, SIZE, 3) and abs(fps - 30.0) < 1e-3


def test_cli_bad_inputs_fail_before_loading(folders, tmp_path, monkeypatch, capsys):
    from eval import generate as cli
    from wan_animate import pipeline as pl
    from wan_animate.video_io import write_video

    def no_load(*a, **k):
        raise AssertionError("a model was loaded despite bad input")

    monkeypatch.setattr(pl.AnimatePipeline, "from_pretrained", no_load)
    src = _write_inputs(tmp_path / "ok", 9)
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    write_video(tmp_path / "short_face.mp4", driving(5)["face_video"], 24)
    write_video(tmp_path / "pose40.mp4", np.zeros((9, 40, 32, 3), np.uint8), 24)
    base = ["--model", folders["diffusers"], "--ref", src / "ref.png", "--out", tmp_path / "o.mp4",
            "--clip-len", 9]
    cases = {
        "does not exist": ["--pose", tmp_path / "missing.mp4", "--face", src / "face.mp4"],
        "not a decodable video": ["--pose", tmp_path / "broken.mp4", "--face", src / "face.mp4"],
        "they must match": ["--pose", src / "pose.mp4", "--face", tmp_path / "short_face.mp4"],
        "multiples of 16": ["--pose", tmp_path / "pose40.mp4", "--face", src / "face.mp4"],
        "both --bg and --mask": ["--pose", src / "pose.mp4", "--face", src / "face.mp4", "--bg", src / "pose.mp4"],
    }
    for message, extra in cases.items():
        assert cli.main([str(a) for a in base + extra]) == 2, message
        assert message in capsys.readouterr().err, message
    assert cli.main(["--model", str(tmp_path), "--preprocessed", str(src), "--out", "x.mp4"]) == 2
    assert "neither a diffusers layout" in capsys.readouterr().err
    assert cli.main([str(a) for a in base + ["--pose", src / "pose.mp4", "--face", src / "face.mp4",
                                             "--preprocessed", src]]) == 2
    assert "exactly one input source" in capsys.readouterr().err

    assert cli.main([str(a) for a in base + ["--driving", tmp_path / "broken.mp4"]]) == 2
    assert "not a decodable video" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["unipc", "dpm++", "euler"])
def test_schedules_follow_official_shift_and_recover_x0(solver):
    from wan_animate.sampling import make_scheduler, sample, set_schedule

    steps, shift = 6, 5.0
    s = make_scheduler(solver, shift=shift)
    set_schedule(s, steps)
    # the official grids (wan/utils/fm_solvers_unipc.py: linspace(sigma_max=float32(0.999), 0)[:-1];
    # fm_solvers.get_sampling_sigmas: linspace(1, 0)[:steps]), shifted, stored as float32, exactly
    start = float(np.float32(0.999)) if solver == "unipc" else 1.0
    grid = np.linspace(start, 0, steps + 1)[:-1]
    official = shift * grid / (1 + (shift - 1) * grid)
    if solver == "euler":  # not an official sampler; diffusers shifts it in float32
        np.testing.assert_allclose(np.asarray(s.sigmas[:steps]), official, rtol=0, atol=1e-6)
    else:
        np.testing.assert_array_equal(np.asarray(s.sigmas[:steps]), official.astype(np.float32))
    assert float(s.sigmas[steps]) == 0.0
    if solver != "euler":  # the DiT gets int(1000 * sigma): 999 first for UniPC, 1000 for DPM++
        np.testing.assert_array_equal(s.timesteps.numpy(), (official * 1000).astype(np.int64))
        assert int(s.timesteps[0]) == (999 if solver == "unipc" else 1000)
        # negative control: diffusers' own grid for the same solver is not the official one
        default = make_scheduler(solver, shift=shift)
        default.set_timesteps(steps)
        assert not np.array_equal(np.asarray(default.sigmas[:steps]), official.astype(np.float32))

    # the exact flow velocity (noise - x0) must lead every solver to x0
    x0 = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    out = sample(lambda x, t, uncond: (x - x0) / (t.view(-1, 1, 1, 1, 1) / 1000.0), noise,
                 steps=steps, shift=shift, solver=solver)
    torch.testing.assert_close(out, x0, atol=2e-2, rtol=0)
    assert (noise - x0).abs().mean() > 0.5  # the test is not trivial


@pytest.mark.parametrize("mode,refert,start", [("animate", 1, 0), ("animate", 5, 8), ("replace", 1, 0),
                                               ("replace", 5, 8)])
def test_condition_matches_diffusers_pipeline(pipe, peer, mode, refert, start):
    """Peer check of the conditioning against diffusers' WanAnimatePipeline helpers (same VAE)."""
    from wan_animate.conditioning import encode_condition

    g = torch.Generator().manual_seed(0)
    hh = ww = SIZE
    ref = torch.rand(1, 3, hh, ww, generator=g) * 2 - 1
    prev = torch.rand(1, 3, refert, hh, ww, generator=g) * 2 - 1 if start > 0 else None
    bg = torch.rand(1, 3, CLIP, hh, ww, generator=g) * 2 - 1 if mode == "replace" else None
    char = (torch.rand(1, 1, CLIP, hh, ww, generator=g) > 0.5).float() if mode == "replace" else None
    with torch.no_grad():
        theirs = torch.cat([
            peer.prepare_reference_image_latents(ref, 1, device="cpu", dtype=torch.float32),
            peer.prepare_prev_segment_cond_latents(
                prev, background_video=bg, mask_video=char, batch_size=1, segment_frame_length=CLIP,
                start_frame=start, height=hh, width=ww, prev_segment_cond_frames=refert, task=mode,
                device="cpu", dtype=torch.float32),
        ], dim=2)
    ours = encode_condition(pipe.vae, ref, clip_len=CLIP, mode=mode, prev_frames=prev, bg_video=bg,
                            character_mask=char)
    assert ours.shape == theirs.shape == (1, 20, 4, hh // 8, ww // 8)
    torch.testing.assert_close(ours[:, :4], theirs[:, :4], rtol=0, atol=0)  # masks exactly
    torch.testing.assert_close(ours[:, 4:], theirs[:, 4:], rtol=1e-4, atol=1e-4)


def test_micro_batch_conditions_in_one_encode_equal_the_per_sample_path(pipe):
    """``encode_conditions`` (the batch builders' one VAE call) against ``encode_condition`` per
    sample, on a batch mixing first segments, carried frames and replace mode."""
    from wan_animate.conditioning import encode_condition, encode_conditions

    g = torch.Generator().manual_seed(1)
    hh = ww = SIZE
    ref = torch.rand(3, 3, hh, ww, generator=g) * 2 - 1
    samples = [dict(mode="animate"), dict(mode="animate", prev_frames=torch.rand(1, 3, 1, hh, ww, generator=g) * 2 - 1),
               dict(mode="replace", prev_frames=torch.rand(1, 3, 5, hh, ww, generator=g) * 2 - 1,
                    bg_video=torch.rand(1, 3, CLIP, hh, ww, generator=g) * 2 - 1,
                    character_mask=(torch.rand(1, 1, CLIP, hh, ww, generator=g) > 0.5).float())]
    with torch.no_grad():
        ref_latent = pipe.vae.encode(ref.unsqueeze(2))
        plain = torch.cat([encode_condition(pipe.vae, ref[i: i + 1], clip_len=CLIP, ref_latent=ref_latent[i: i + 1], **s)
                           for i, s in enumerate(samples)])
        batched = encode_conditions(pipe.vae, ref_latent, samples, clip_len=CLIP, height=hh, width=ww)
    assert batched.shape == (3, 20, 4, hh // 8, ww // 8)
    torch.testing.assert_close(batched, plain, rtol=1e-5, atol=1e-5)
    assert not torch.equal(batched[0], batched[1]) and not torch.equal(batched[1], batched[2])


# refert 5 uses clip_len 13: with clip_len - refert_num < refert_num diffusers 0.42 counts one segment
# too many (target // step instead of (target - refert) // step) and trips its own assert.
@pytest.mark.parametrize("mode,n,clip,refert,guide", [("animate", 12, 9, 1, 1.0), ("animate", 7, 9, 1, 2.0),
                                                      ("replace", 16, 13, 5, 1.0)])
def test_generate_matches_diffusers_pipeline_end_to_end(pipe, peer, monkeypatch, mode, n, clip, refert, guide):
    """Whole generation vs diffusers' WanAnimatePipeline.__call__ on the same folder, with the text and
    CLIP embeddings shared (diffusers' CLIPImageProcessor centre-crops where the official code squashes)
    and inputs already at the model sizes (no resampling differences)."""
    from PIL import Image

    from wan_animate.pipeline import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT

    face_size = pipe.config.motion_encoder_size
    x = driving(n, face=face_size)
    x["ref_image"] = np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    extra, peer_extra = {}, {}
    if mode == "replace":
        bg = x["pose_video"][:, ::-1].copy()
        mask = np.zeros((n, SIZE, SIZE), np.uint8)
        mask[:, 8:24, 8:24] = 255
        extra = dict(bg_video=bg, mask_video=mask)
        peer_extra = dict(background_video=[Image.fromarray(f) for f in bg],
                          mask_video=[Image.fromarray(m).convert("RGB") for m in mask])
    assert num_segments(n, clip, refert) == 2 if guide == 1.0 else 1
    ours = gen(pipe, x, clip_len=clip, refert_num=refert, guide_scale=guide, seed=7, **extra)

    ref_pixels = torch.from_numpy(x["ref_image"]).permute(2, 0, 1)[None].float() / 127.5 - 1
    clip_tokens = pipe.image_encoder.encode(ref_pixels)
    # diffusers refuses image + image_embeds together, so its CLIP call is pointed at our tokens
    monkeypatch.setattr(peer, "encode_image", lambda image, device=None: clip_tokens)
    theirs = peer(
        image=Image.fromarray(x["ref_image"]), pose_video=[Image.fromarray(f) for f in x["pose_video"]],
        face_video=[Image.fromarray(f) for f in x["face_video"]], height=SIZE, width=SIZE, mode=mode,
        segment_frame_length=clip, num_inference_steps=STEPS, prev_segment_conditioning_frames=refert,
        guidance_scale=guide, generator=torch.Generator().manual_seed(7),
        prompt_embeds=pipe.text_encoder.encode([DEFAULT_PROMPT]),
        negative_prompt_embeds=pipe.text_encoder.encode([DEFAULT_NEGATIVE_PROMPT]),
        output_type="np", **peer_extra,
    ).frames[0]
    assert theirs.shape == ours.shape[:1] + (SIZE, SIZE, 3)
    diff = np.abs(ours.astype(np.float64) / 255.0 - theirs)
    assert diff.max() <= 2.0 / 255, diff.max() * 255


def test_cli_driving_video_runs_preprocessing(folders, tmp_path, wan_example):
    """--driving: raw video -> data_tools.preprocess_driving -> generate (6 real frames, tiny area)."""
    import cv2

    from eval.generate import main
    from wan_animate.video_io import read_video, write_video

    frames, fps = read_video(wan_example / "video.mp4", max_frames=6)
    write_video(tmp_path / "drive.mp4", np.stack([cv2.resize(f, (256, 144), interpolation=cv2.INTER_AREA)
                                                  for f in frames]), fps)
    ref = cv2.imread(str(wan_example / "image.jpeg"))
    cv2.imwrite(str(tmp_path / "ref.png"), cv2.resize(ref, (ref.shape[1] // 8, ref.shape[0] // 8)))
    out = tmp_path / "out.mp4"
    assert main([str(a) for a in ("--model", folders["diffusers"], "--ref", tmp_path / "ref.png", "--driving",
                                  tmp_path / "drive.mp4", "--out", out, "--steps", 1, "--clip-len", 5,
                                  "--target-area", 9216, "--driving-fps", -1, "--work-dir", tmp_path / "src",
                                  "--no-progress")]) == 0
    video, out_fps = read_video(out)
    assert video.shape[0] == 6 and abs(out_fps - fps) < 1e-3  # --driving-fps -1 keeps the source timing
    assert video.shape[1] % 16 == 0 and video.shape[2] % 16 == 0 and video.shape[1] * video.shape[2] <= 9216
    assert (tmp_path / "src" / "src_pose.mp4").exists()


# ---------------------------------------------------------------------------------------------
# prompt cleaning (official umT5 wrapper: ftfy, HTML-unescape twice, whitespace)
# ---------------------------------------------------------------------------------------------


def test_prompt_cleaning_matches_the_official_tokenizer_wrapper():
    import re

    from wan_animate.encoders import TextEncoder, clean_prompt

    cases = {
        "\u201cA woman\u201d  dances \u2018slowly\u2019": "\"A woman\" dances 'slowly'",  # curly quotes
        "\uff28\uff49\uff01\u3000a\uff0cb\uff1f": "Hi! a,b?",  # full-width letters, punctuation, space
        "rock &amp;amp; roll": "rock & roll",  # HTML-escaped twice
        "  tabs\tand\n\nnewlines  ": "tabs and newlines",
        "\u89c6\u9891\u4e2d\u7684\u4eba  \u5728\u505a\u52a8\u4f5c": "\u89c6\u9891\u4e2d\u7684\u4eba \u5728\u505a\u52a8\u4f5c",
    }
    for raw, want in cases.items():
        assert clean_prompt(raw) == want, raw
    # negative control: whitespace collapsing alone (the old cleaning) leaves the first three different
    for raw, want in list(cases.items())[:3]:
        assert re.sub(r"\s+", " ", raw).strip() != want

    class Recorder:  # the encoder must hand the cleaned text to the tokenizer
        def __call__(self, texts, **kw):
            self.seen = list(texts)
            raise StopIteration

    model = torch.nn.Linear(1, 1)
    model.config = type("Config", (), {"d_model": 1})
    enc = TextEncoder(model, Recorder(), text_len=8)
    with pytest.raises(StopIteration):
        enc.encode(list(cases))
    assert enc.tokenizer.seen == list(cases.values())
