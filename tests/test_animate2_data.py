"""Data of the Animate-2 family: shard schema version 2 (driving.mp4), the synthetic triplets,
appearance-changed driving videos of real clips, inspect, and cached driving latents."""

import json

import numpy as np
import pytest
import torch

from data_tools.animate2.appearance import change_appearance, draw_appearance
from data_tools.inspect import check_driving, inspect_dir
from data_tools.shards import ShardWriter, encode_sample
from data_tools.synthetic_data import (animation_state, driving_character, make_synthetic_dataset, render_animation,
                                       synthesize_clip)
from wan_animate.samples import SampleDecodeError, decode_sample, list_shards, read_shard
from wan_animate.video_io import encode_video_bytes, frames_to_tensor, read_video


def _streams(t=5, h=32, w=32, seed=0):
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    meta = {"keypoints": {"body": [[]] * t}, "face_boxes": [[0, 0, 8, 8]] * t, "frame_indices": list(range(t)),
            "keypoints_available": False}
    return dict(target=video, pose=video[::-1].copy(), face=video[:, :16, :16].copy(), ref=video[0].copy(),
                meta=meta, caption="c", fps=30.0, crf=0)


# ---------------------------------------------------------------------------------------------
# schema version 2
# ---------------------------------------------------------------------------------------------
def test_schema_v2_adds_driving_and_v1_samples_still_read():
    s = _streams()
    driving = np.ascontiguousarray(s["target"][:, :, ::-1])
    v2 = encode_sample("a", driving=driving, **s)
    v1 = encode_sample("b", **s)
    assert json.loads(v2["json"])["schema_version"] == 2 and "driving.mp4" in v2
    assert json.loads(v1["json"])["schema_version"] == 1 and "driving.mp4" not in v1  # a v1 reader reads it
    d2, d1 = decode_sample(v2), decode_sample(v1)
    assert "driving" not in d1 and d1["video"].shape == d2["video"].shape
    torch.testing.assert_close(d2["driving"], frames_to_tensor(read_video(v2["driving.mp4"])[0]))
    assert (d2["driving"] - d2["video"]).abs().mean() > 0.3  # the driving stream, not the target
    # the version and the stream must agree, and the driving video must cover the clip frame for frame
    with pytest.raises(SampleDecodeError, match="version 2 needs a driving.mp4"):
        decode_sample({k: v for k, v in v2.items() if k != "driving.mp4"})
    with pytest.raises(SampleDecodeError, match="version 1 has no driving.mp4"):
        decode_sample(dict(v1, **{"driving.mp4": v2["driving.mp4"]}))
    narrow = _streams(w=16)
    other = encode_sample("c", driving=narrow["target"], **narrow)
    with pytest.raises(SampleDecodeError, match="driving.mp4 is .* but mp4 is"):
        decode_sample(dict(v2, **{"driving.mp4": other["driving.mp4"]}))
    with pytest.raises(SampleDecodeError, match="schema_version 3 is not supported"):
        decode_sample(dict(v1, json=json.dumps(dict(json.loads(v1["json"]), schema_version=3)).encode()))
    with pytest.raises(ValueError, match="driving video .* differs from target"):
        encode_sample("d", driving=driving[:4], **s)


# ---------------------------------------------------------------------------------------------
# synthetic triplets
# ---------------------------------------------------------------------------------------------
def test_synthetic_driving_is_the_same_animation_by_another_character(tmp_path):
    out = make_synthetic_dataset(tmp_path / "syn", num_clips=3, clip_len=9, height=32, width=48, face_size=32,
                                 shard_size=2, driving=True)
    samples = [decode_sample(r) for p in list_shards(out) for r in read_shard(p)]
    assert len(samples) == 3 and json.loads((out / "manifest.json").read_text())["driving"] is True
    for i, d in enumerate(samples):
        frames, _, _, _, ch = synthesize_clip(0, i, 9, 32, 48)
        other = driving_character(ch, 0, i)
        # exact: the same joint angles, head turn, blinks and mouth in every frame ...
        for t in range(9):
            assert animation_state(other, t, 9) == animation_state(ch, t, 9)
        # ... performed by a different character (colours, body shape, background)
        assert other.background != ch.background and other.torso_color != ch.torso_color
        want = render_animation(other, 9, 32, 48)
        # the stored stream is exactly that rendering through the set's lossless encode
        torch.testing.assert_close(d["driving"], frames_to_tensor(read_video(encode_video_bytes(want, 30.0, crf=0))[0]))
        assert np.abs(want.astype(float) - frames).mean() > 10  # not the target (both lit by the same light)
        assert d["meta"]["schema_version"] == 2 and d["meta"]["synthetic"]["driving_character"]["arm_freq"] == ch.arm_freq
    # the target clips are unchanged by the option
    plain = make_synthetic_dataset(tmp_path / "plain", num_clips=1, clip_len=9, height=32, width=48, face_size=32)
    d0 = decode_sample(read_shard(list_shards(plain)[0])[0])
    assert d0["meta"]["schema_version"] == 1 and "driving" not in d0
    torch.testing.assert_close(d0["video"], samples[0]["video"])
    rep = inspect_dir(out)
    assert rep.ok and not rep.warnings, (rep.errors, rep.warnings)


def test_inspect_warns_when_the_driving_video_is_the_target(tmp_path):
    s = _streams(t=5)
    with ShardWriter(tmp_path, shard_size=4) as w:
        w.write(encode_sample("copy", driving=s["target"], **s))
        w.write(encode_sample("other", driving=255 - s["target"], **s))
    rep = inspect_dir(tmp_path)
    assert rep.ok, rep.errors  # a warning, not an error: the sample decodes
    assert len(rep.warnings) == 2  # the copy + "no manifest.json"
    assert any("copy: driving.mp4 is nearly the target" in w and "teaches copying" in w for w in rep.warnings)
    d = decode_sample(read_shard(list_shards(tmp_path)[0])[1])
    assert check_driving(d) == []


# ---------------------------------------------------------------------------------------------
# appearance-changed driving videos of real clips
# ---------------------------------------------------------------------------------------------
def _moving_figure(t=6, h=64, w=64):
    frames = np.zeros((t, h, w, 3), np.uint8)
    frames[:] = (40, 120, 40)  # green background
    masks = np.zeros((t, h, w), bool)
    for k in range(t):
        masks[k, 16:48, 8 + 4 * k: 24 + 4 * k] = True
    frames[masks] = (200, 60, 60)  # a red figure that walks right
    return frames, masks


def test_appearance_change_keeps_the_motion_and_changes_everything_else():
    frames, masks = _moving_figure()
    p = draw_appearance(np.random.default_rng(3))
    out = change_appearance(frames, masks, p, seed=5)
    assert out.shape == frames.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, change_appearance(frames, masks, p, seed=5))  # reproducible
    inner = np.zeros_like(masks)
    inner[:, 20:44] = masks[:, 20:44]
    inner[:, :, :] &= np.roll(masks, 3, 2) & np.roll(masks, -3, 2)  # away from the feathered edge
    far = ~np.roll(masks, 0, 2)
    for k in range(len(masks)):  # away from the figure on both sides
        cols = np.flatnonzero(masks[k].any(0))
        far[k, :, max(cols[0] - 6, 0): cols[-1] + 7] = False
    # the character's colours change (the red figure is no longer red), the background is new
    assert np.abs(out[inner].astype(float) - frames[inner]).mean() > 40
    assert np.abs(out[far].astype(float) - frames[far]).mean() > 20
    # the background is the same in every frame (one new environment), the character moves as before
    bg_static = far.all(0)
    np.testing.assert_array_equal(out[0][bg_static], out[-1][bg_static])
    # motion: the figure's silhouette (pixels that differ from the static background) follows the mask
    for k in range(len(masks)):
        moved = np.abs(out[k].astype(float) - out[0 if k else -1]).sum(-1) > 30
        # pixels covered now but not in the comparison frame are the figure's
        cover = masks[k] & ~masks[0 if k else -1]
        assert moved[cover].mean() > 0.9
    # a different draw gives a different appearance
    assert np.abs(change_appearance(frames, masks, draw_appearance(np.random.default_rng(4)), seed=5).astype(float)
                  - out).mean() > 10
    with pytest.raises(ValueError, match="masks"):
        change_appearance(frames, masks[:, :32], p)


def test_prepare_driving_appearance_on_the_real_clip(tmp_path, wan_example):
    """driving=appearance through prepare: the driving video is the clip recoloured through the
    mediapipe character mask, with the recorded parameters (ready pose/face videos: no pose model)."""
    import cv2

    from data_tools.config import PrepareConfig
    from data_tools.prepare import prepare
    from wan_animate.video_io import read_video, write_video

    src, fps = read_video(wan_example / "video.mp4", max_frames=60)
    small = np.stack([cv2.resize(f, (192, 112), interpolation=cv2.INTER_AREA) for f in src[40:49]])
    inp, ready = tmp_path / "in", tmp_path / "ready"
    inp.mkdir()
    ready.mkdir()
    write_video(inp / "clip.mp4", small, fps)
    write_video(ready / "clip.pose.mp4", np.zeros_like(small), fps)
    write_video(ready / "clip.face.mp4", np.zeros((9, 32, 32, 3), np.uint8), fps)
    with pytest.raises(ValueError, match="driving='copy': choose one of"):
        PrepareConfig(input=str(inp), output=str(tmp_path / "x"), driving="copy")
    cfg = PrepareConfig(input=str(inp), output=str(tmp_path / "out"), workers=0, fps=-1, clip_len=9,
                        target_area=192 * 112, pose_backend="precomputed", pose_options={"videos": str(ready)},
                        face_size=32, reference_policy="first", replace=True, driving="appearance")
    m = prepare(cfg, progress=False)
    assert m["counts"]["clips_written"] == 1, m
    d = decode_sample(read_shard(list_shards(tmp_path / "out")[0])[0])
    assert d["meta"]["schema_version"] == 2 and d["meta"]["driving"]["method"] == "appearance"
    assert 0.02 < d["meta"]["driving"]["mask_coverage"] < 0.9  # a person was segmented
    target = ((d["video"].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    masks = d["mask"][0].bool().numpy()
    params = draw_appearance(np.random.default_rng(d["meta"]["driving"]["seed"]))
    assert params.to_dict() == d["meta"]["driving"]["params"]
    want = change_appearance(target, masks, params, seed=d["meta"]["driving"]["seed"]).astype(float)
    got = ((d["driving"].permute(1, 2, 3, 0) + 1) * 127.5).numpy()
    assert np.abs(got - want).mean() < 6.0  # the same recipe (two lossy encodes apart)
    assert np.abs(got - target.astype(float)).mean() > 25  # and far from the target
    rep = inspect_dir(tmp_path / "out")
    assert rep.ok and not any("teaches copying" in w for w in rep.warnings), rep.errors


# ---------------------------------------------------------------------------------------------
# cached latents cover the driving stream
# ---------------------------------------------------------------------------------------------
def test_cache_latents_cover_the_driving_stream(tmp_path, tiny_model):
    from data_tools.cache_latents import cache_latents, load_encoders, text_key
    from data_tools.config import CacheLatentsConfig
    from data_tools.inspect import inspect_dir as inspect
    from wan_animate.animate2.config import REFERENCE_PROMPT
    from wan_animate.samples import decode_cached_sample, load_text_embeds

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        raw = make_synthetic_dataset(tmp_path / "raw", num_clips=2, clip_len=5, height=32, width=32, face_size=32,
                                     shard_size=2, driving=True)
        out = tmp_path / "cached"
        m = cache_latents(CacheLatentsConfig(input=str(raw), output=str(out), model=str(tiny_model), device="cpu",
                                             dtype="fp32", refert_nums=[0, 1]), progress=False)
        assert m["samples_this_run"] == 2 and not m["skipped_samples"]
        embeds, captions = load_text_embeds(out / "text_embeds.safetensors")
        assert REFERENCE_PROMPT in captions.values()  # stored once, beside the captions
        vae, text_enc, image_enc = load_encoders(tiny_model, device="cpu", compute_dtype=torch.float32)
        d = decode_sample(read_shard(list_shards(raw)[0])[0])
        c = decode_cached_sample(read_shard(list_shards(out)[0])[0], embeds)
        assert c["meta"]["driving_text_key"] == text_key(REFERENCE_PROMPT)
        torch.testing.assert_close(c["driving"], vae.encode(d["driving"][None])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c["clip_driving"], image_enc.encode(d["driving"][None, :, 0])[0], atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(c["text_driving"], text_enc.encode([REFERENCE_PROMPT])[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(c["driving"], c["target"])
        assert inspect(out).ok
        # a cached v2 sample without its driving prompt embedding is refused with the fix
        del embeds[text_key(REFERENCE_PROMPT)]
        with pytest.raises(SampleDecodeError, match="driving_text_key .* re-run cache_latents"):
            decode_cached_sample(read_shard(list_shards(out)[0])[0], embeds)
    finally:
        torch.set_num_threads(n)
