"""prepare on the real sample clip (mediapipe), bad inputs, kill + resume, inspect."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_tools.config import PrepareConfig
from wan_animate.samples import decode_sample
from data_tools.inspect import inspect_dir
from data_tools.pose.face import crop_boxes
from data_tools.prepare import prepare
from wan_animate.samples import list_shards, read_shard, shard_keys
from wan_animate.geometry import ResizePlan, area_bucket, choose_bucket
from wan_animate.video_io import read_video, resample_indices, write_video

ROOT = Path(__file__).resolve().parents[1]


def _cfg(inp, out, **kw):
    base = dict(input=str(inp), output=str(out), workers=0, pose_options={"max_side": 384})
    base.update(kw)
    return PrepareConfig(**base)


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------
def test_bucket_and_resample_rules():
    assert area_bucket(720, 1280, 1280 * 720) == (720, 1280)
    assert area_bucket(1080, 1920, 832 * 480) == (464, 832)  # sqrt(399360/1.777)=473.9 -> 464
    assert choose_bucket(720, 1280, 0, [[512, 512], [480, 832], [832, 480]]) == (480, 832)
    idx = resample_indices(164, 24.0, 30.0)
    assert idx[0] == 0 and idx[-1] <= 163 and idx[5] == round(5 / 30 * 24)
    assert len(idx) == int((163) / 24 * 30) + 1
    np.testing.assert_array_equal(resample_indices(10, 24.0, -1), np.arange(10))
    plan = ResizePlan(720, 1280, 176, 320, "crop")
    frame = np.zeros((720, 1280, 3), np.uint8)
    frame[360, 640] = 255
    out = plan.apply(frame)
    assert out.shape == (176, 320, 3)
    lb = ResizePlan(720, 720, 176, 320, "letterbox")
    assert lb.offset_x > 0 and lb.apply(np.full((720, 720, 3), 9, np.uint8))[:, 0].max() == 0
    with pytest.raises(ValueError, match="4n\\+1"):
        PrepareConfig(input="a", output="b", clip_len=32)


# ---------------------------------------------------------------------------------------------
# the real clip
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # ~30-70 s on 2 cores (mediapipe on the real clip)
def test_prepare_real_clip_mediapipe(tmp_path, wan_example):
    real = wan_example / "video.mp4"
    out = tmp_path / "shards"
    m = prepare(_cfg(real, out, clip_len=33, target_area=320 * 192, max_clips_per_video=2, shard_size=1,
                     replace=True), progress=False)
    assert m["counts"]["clips_written"] == 2 and m["counts"]["inputs_skipped"] == 0
    assert m["stats"]["person_frame_share"] >= 0.9
    assert 0.02 < m["stats"]["mask_coverage_mean"] < 0.9
    src, _ = read_video(real, max_frames=100)
    n_samples = 0
    assert m["stats"]["face_frame_share"] >= 0.8
    for shard in list_shards(out):
        for raw in read_shard(shard):
            d = decode_sample(raw)
            n_samples += 1
            meta = d["meta"]
            _, t, h, w = d["video"].shape
            assert t == 33 and d["pose"].shape == d["video"].shape and d["face"].shape[1] == t
            assert d["face"].shape[-2:] == (512, 512) and h % 16 == 0 and w % 16 == 0
            assert d["bg"].shape == d["video"].shape and d["mask"].shape == (1, t, h, w)
            assert np.mean(meta["person_detected"]) >= 0.9
            # the background is the frame with the character blacked out
            char = d["mask"][0].bool()
            assert (d["bg"][:, char] < -0.8).float().mean() > 0.9
            # face crops are centred on the face landmarks (target pixels)
            face = np.asarray(meta["keypoints"]["face"])
            boxes = np.asarray(meta["face_boxes"])
            ok = np.asarray(meta["face_detected"])
            assert ok.mean() >= 0.7  # face-mesh misses are filled from neighbouring boxes
            for k in np.flatnonzero(ok):
                pts = face[k][face[k, :, 2] >= 0.5, :2]
                x0, y0, x1, y1 = boxes[k]
                lx0, ly0 = pts.min(0)
                lx1, ly1 = pts.max(0)
                bw = x1 - x0
                assert abs((lx0 + lx1) / 2 - (x0 + x1) / 2) < 0.1 * bw  # horizontally centred
                assert y0 < (ly0 + ly1) / 2 < y1  # the landmarks' centre is inside the box
                assert 0.6 < (lx1 - lx0) / bw < 1.0  # the box is the landmark box grown x sqrt(1.3)
            # the stored crops are the source frames cut at face_boxes_source
            src_boxes = np.asarray(meta["face_boxes_source"])
            ref_crops = crop_boxes(src[meta["frame_indices"]], src_boxes, 512)
            got = ((d["face"].permute(1, 2, 3, 0).numpy() + 1) * 127.5)
            assert np.abs(got - ref_crops.astype(np.float32)).mean() < 6.0
            # negative control: crops from a shifted box do not match
            shifted = crop_boxes(src[meta["frame_indices"]], src_boxes + [120, 0, 120, 0], 512)
            assert np.abs(got - shifted.astype(np.float32)).mean() > 15.0
    assert n_samples == 2
    rep = inspect_dir(out, sheet=str(tmp_path / "sheet.png"))
    assert rep.ok, rep.errors
    assert rep.samples == 2 and Path(rep.sheet).stat().st_size > 10_000
    from PIL import Image

    sheet = np.asarray(Image.open(rep.sheet))
    assert sheet.shape[0] >= 2 * 128 and sheet.std() > 20


# ---------------------------------------------------------------------------------------------
# bad inputs, kill + resume (small pieces of the real clip as good inputs)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory, wan_example):
    import cv2

    d = tmp_path_factory.mktemp("inputs")
    src, fps = read_video(wan_example / "video.mp4", max_frames=164)
    small = np.stack([cv2.resize(f, (320, 180), interpolation=cv2.INTER_AREA) for f in src])
    for i in range(8):
        write_video(d / f"good_{i}.mp4", small[40 + 14 * i: 40 + 14 * i + 20], fps)
    return d, fps


@pytest.mark.slow  # ~30-70 s on 2 cores (mediapipe on the real clip)
def test_bad_inputs_are_skipped_with_reasons(tmp_path, small_inputs):
    src_dir, _ = small_inputs
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(2):
        (inp / f"good_{i}.mp4").write_bytes((src_dir / f"good_{i}.mp4").read_bytes())
    data = (src_dir / "good_2.mp4").read_bytes()
    (inp / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (inp / "zero.mp4").write_bytes(b"")
    (inp / "text.mp4").write_text("this is not a video\n" * 20)
    (inp / "short.mp4").write_bytes(b"")
    write_video(inp / "short.mp4", np.zeros((5, 64, 64, 3), np.uint8), 24)
    # Two spawned workers, buckets, letterbox and the "first" reference policy on the way.
    m = prepare(_cfg(inp, tmp_path / "out", fps=-1, clip_len=17, target_area=256 * 144, max_clips_per_video=1,
                     min_person_fraction=0.5, workers=2, buckets=[[144, 144], [144, 256]],
                     resize_mode="letterbox", reference_policy="first"), progress=False)
    reasons = {Path(s["input"]).name: s["reason"] for s in m["skipped_inputs"]}
    assert set(reasons) == {"truncated.mp4", "zero.mp4", "text.mp4", "short.mp4"}
    assert "zero-byte" in reasons["zero.mp4"]
    assert "undecodable" in reasons["text.mp4"] and "undecodable" in reasons["truncated.mp4"]
    assert "too short" in reasons["short.mp4"] and "clip_len 17" in reasons["short.mp4"]
    assert m["counts"] == {"inputs": 6, "inputs_processed": 2, "inputs_skipped": 4, "clips_written": 2,
                           "clips_skipped": 0, "shards": 1}
    assert m["stats"]["buckets"] == {"144x256": 2}
    for raw in read_shard(list_shards(tmp_path / "out")[0]):
        meta = decode_sample(raw)["meta"]
        assert meta["reference"]["policy"] == "first" and meta["bucket"] == [144, 256]
    saved = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert saved["skipped_inputs"] == m["skipped_inputs"]
    assert inspect_dir(tmp_path / "out").ok


def _all_keys(out):
    return [k for p in list_shards(out) for k in shard_keys(p)]


def test_kill_midway_and_resume(tmp_path, small_inputs):
    """A prepare process killed by SIGKILL after two shards resumes on rerun: nothing duplicated,
    nothing lost. Ready pose/face videos stand in for the pose model (resuming is the same for
    every backend; mediapipe runs in the tests above), so the job is the shard bookkeeping."""
    src_dir, fps = small_inputs
    ready = tmp_path / "ready"
    ready.mkdir()
    for i in range(8):
        t = len(read_video(src_dir / f"good_{i}.mp4")[0])
        write_video(ready / f"good_{i}.pose.mp4", np.zeros((t, 180, 320, 3), np.uint8), fps)
        write_video(ready / f"good_{i}.face.mp4", np.full((t, 32, 32, 3), 99, np.uint8), fps)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "data_tools.prepare", f"input={src_dir}", f"output={out}", "fps=-1",
            "clip_len=17", "target_area=36864", "max_clips_per_video=1", "shard_size=1", "workers=0",
            "min_person_fraction=0.5", "pose_backend=precomputed", f"+pose_options.videos={ready}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if len(list_shards(out)) >= 2:
            break
        time.sleep(0.02)
    killed_midway = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed_midway, "prepare finished before it could be killed; make the job longer"
    done_before = set(_all_keys(out))
    assert 2 <= len(done_before) < 8
    assert not (out / "manifest.json").exists()
    rerun = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming" in rerun.stdout
    keys = _all_keys(out)
    assert len(keys) == len(set(keys)) == 8  # nothing duplicated, nothing lost
    assert done_before <= set(keys)
    assert not list(out.glob("*.tmp"))
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["clips_written"] == 8 and m["counts"]["inputs"] == 8
    rep = inspect_dir(out)
    assert rep.ok, rep.errors


def test_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="pose_backend"):
        PrepareConfig(input="a", output="b", pose_backend="openpose")
    with pytest.raises(ValueError, match="multiples of 16"):
        PrepareConfig(input="a", output="b", buckets=[[100, 200]])
    r = subprocess.run([sys.executable, "-m", "data_tools.prepare", "input=x", f"output={tmp_path}", "clip_len=10"],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2 and "4n+1" in r.stderr


def test_precomputed_ready_videos(tmp_path, small_inputs):
    src_dir, fps = small_inputs
    inp, ready = tmp_path / "in", tmp_path / "ready"
    inp.mkdir()
    ready.mkdir()
    frames, _ = read_video(src_dir / "good_0.mp4")
    write_video(inp / "clip.mp4", frames, fps)
    t = len(frames)
    pose = np.zeros((t, 180, 320, 3), np.uint8)
    face = np.zeros((t, 96, 96, 3), np.uint8)
    for k in range(t):  # frame-dependent content so a frame mix-up would show
        pose[k, 40:140, 10 * k: 10 * k + 20] = (0, 255, 0)
        face[k, :, :, 0] = 10 * k
    write_video(ready / "clip.pose.mp4", pose, fps)
    write_video(ready / "clip.face.mp4", face, fps)
    m = prepare(_cfg(inp, tmp_path / "out", fps=-1, clip_len=9, clip_stride=8, target_area=320 * 176,
                     pose_backend="precomputed", pose_options={"videos": str(ready)}, face_size=48,
                     reference_policy="first"), progress=False)
    assert m["counts"]["clips_written"] == 2, m
    samples = [decode_sample(r) for p in list_shards(tmp_path / "out") for r in read_shard(p)]
    second = samples[1]
    assert second["meta"]["frame_indices"][0] == 8 and second["meta"]["keypoints_available"] is False
    h, w = second["meta"]["bucket"]
    plan = ResizePlan(180, 320, h, w, "crop")
    got_pose = (second["pose"].permute(1, 2, 3, 0).numpy() + 1) * 127.5  # [T, h, w, 3]
    bar_cols = np.flatnonzero(got_pose[0, h // 2, :, 1] > 128)
    want = (10 * 8 + 9.5) * plan.scale + plan.offset_x  # frame 8's bar, resized like the frames
    assert abs(bar_cols.mean() - want) < 1.5, (bar_cols, want)
    got_face = (second["face"][0].numpy() + 1) * 127.5  # red channel, [T, 48, 48]
    assert second["face"].shape[-1] == 48 and abs(got_face[0].mean() - 80) < 6
    assert inspect_dir(tmp_path / "out").ok


# ---------------------------------------------------------------------------------------------
# faults and odd videos on tiny clips with ready pose/face videos: no pose model runs
# ---------------------------------------------------------------------------------------------
def _write_av(path, frames, *, pts_ms=None, rotation=None, fps=30):
    """Write frames with PyAV; ``pts_ms`` gives explicit timestamps (variable frame rate),
    ``rotation`` a display-matrix rotation tag (degrees counter-clockwise)."""
    import av
    from fractions import Fraction

    c = av.open(str(path), "w")
    s = c.add_stream("libx264", rate=fps)
    s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    s.options = {"crf": "10"}
    if rotation is not None:
        s.set_display_rotation(rotation)
    if pts_ms is not None:
        s.codec_context.time_base = Fraction(1, 1000)
    for k, f in enumerate(frames):
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
        if pts_ms is not None:
            vf.pts, vf.time_base = int(pts_ms[k]), Fraction(1, 1000)
        for p in s.encode(vf):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()


def _ready(ready_dir, stem, t, h, w):
    ready_dir.mkdir(exist_ok=True)
    write_video(ready_dir / f"{stem}.pose.mp4", np.zeros((t, h, w, 3), np.uint8), 30)
    write_video(ready_dir / f"{stem}.face.mp4", np.full((t, 32, 32, 3), 99, np.uint8), 30)


def _tiny_cfg(inp, out, ready, **kw):
    base = dict(input=str(inp), output=str(out), workers=0, fps=-1, clip_len=5, target_area=64 * 96,
                face_size=16, pose_backend="precomputed", pose_options={"videos": str(ready)},
                reference_policy="first", shard_size=4)
    base.update(kw)
    return PrepareConfig(**base)


def _samples(out):
    return [decode_sample(r) for p in list_shards(out) for r in read_shard(p)]


@pytest.mark.timeout(240)
def test_a_killed_worker_fails_its_input_and_the_run_goes_on(tmp_path):
    """A worker killed by SIGKILL (the OOM killer) must not hang the job (multiprocessing.Pool
    waits forever for its task): that input is skipped with the reason, the others are written."""
    sys.path.insert(0, str(Path(__file__).parent))  # spawned workers import tests/_prepare_helpers
    from _prepare_helpers import kill_marked

    inp, ready = tmp_path / "in", tmp_path / "ready"
    inp.mkdir()
    frames = np.random.default_rng(0).integers(0, 255, (6, 64, 96, 3), dtype=np.uint8)
    for name in ("a", "KILLME", "b"):
        write_video(inp / f"{name}.mp4", frames, 30)
        _ready(ready, name, 6, 64, 96)
    t0 = time.time()
    m = prepare(_tiny_cfg(inp, tmp_path / "out", ready, workers=2), progress=False, _worker_fn=kill_marked)
    assert time.time() - t0 < 200
    reasons = {Path(s["input"]).name: s["reason"] for s in m["skipped_inputs"]}
    assert list(reasons) == ["KILLME.mp4"] and "killed by SIGKILL" in reasons["KILLME.mp4"]
    assert m["counts"]["inputs_processed"] == 2 and m["counts"]["clips_written"] == 2  # negative control


def test_rotation_tag_is_honoured(tmp_path):
    """A phone video (stored landscape, display matrix -90 deg) comes out upright (portrait)."""
    inp, ready = tmp_path / "in", tmp_path / "ready"
    inp.mkdir()
    stored = np.zeros((6, 64, 96, 3), np.uint8)
    stored[:, :16, :16] = 255  # marker at the stored top-left
    _write_av(inp / "phone.mp4", stored, rotation=-90)  # shown rotated 90 deg clockwise
    _ready(ready, "phone", 6, 96, 64)  # ready videos are upright
    m = prepare(_tiny_cfg(inp, tmp_path / "out", ready), progress=False)
    assert m["counts"]["clips_written"] == 1, m["skipped_inputs"]
    (d,) = _samples(tmp_path / "out")
    _, _, h, w = d["video"].shape
    assert (h, w) == (96, 64) and d["meta"]["source_rotation"] == 270
    frame = (d["video"][:, 0].permute(1, 2, 0).numpy() + 1) * 127.5
    assert frame[:16, -16:].mean() > 200 and frame[:16, :16].mean() < 50  # clockwise: top-left -> top-right
    raw, _ = read_video(inp / "phone.mp4")  # the library reads it upright too (negative control: stored)
    assert raw.shape[1:3] == (96, 64) and stored.shape[1:3] == (64, 96)


def test_variable_frame_rate_is_sampled_by_timestamp(tmp_path):
    """20 frames at 30 fps then 20 at 10 fps, re-sampled to 10 fps: output frame k is the source
    frame shown at k / 10 s (the index rule at the average rate would slow the first second down)."""
    from wan_animate.video_io import resample_indices as by_index

    inp, ready = tmp_path / "in", tmp_path / "ready"
    inp.mkdir()
    times = np.array([k / 30 for k in range(20)] + [19 / 30 + 0.1 * (k + 1) for k in range(20)])
    frames = np.stack([np.full((64, 96, 3), 6 * k, np.uint8) for k in range(40)])  # brightness = index
    _write_av(inp / "vfr.mp4", frames, pts_ms=np.round(times * 1000))
    _ready(ready, "vfr", 40, 64, 96)
    m = prepare(_tiny_cfg(inp, tmp_path / "out", ready, fps=10, clip_len=25), progress=False)
    assert m["counts"]["clips_written"] == 1, m["skipped_inputs"]
    (d,) = _samples(tmp_path / "out")
    want = [int(np.argmin(np.abs(times - k / 10))) for k in range(25)]
    assert d["meta"]["frame_indices"] == want and d["meta"]["variable_frame_rate"] is True
    got = ((d["video"][0, :, 32, 48].numpy() + 1) * 127.5) / 6
    assert np.abs(got - np.array(want)).max() < 1.0  # the pixels are those frames
    assert list(by_index(40, 40 / times[-1], 10)[:25]) != want  # negative control: the index rule differs


def test_missing_input_and_no_videos_fail_before_any_output(tmp_path):
    from data_tools.prepare import PrepareError

    out = tmp_path / "out"
    with pytest.raises(PrepareError, match="does not exist"):
        prepare(PrepareConfig(input=str(tmp_path / "nope"), output=str(out)), progress=False)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no videos here")
    with pytest.raises(PrepareError, match="holds no videos"):
        prepare(PrepareConfig(input=str(empty), output=str(out)), progress=False)
    assert not out.exists()
    r = subprocess.run([sys.executable, "-m", "data_tools.prepare", f"input={tmp_path / 'nope'}", f"output={out}"],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2 and "Traceback" not in r.stderr and not out.exists()
    assert r.stderr.strip().splitlines() == [f"error: input={tmp_path / 'nope'} does not exist: give a video, "
                                              "a folder of videos or a .txt list of paths"]


def test_progress_counts_clips_not_videos(tmp_path, capsys):
    inp, ready = tmp_path / "in", tmp_path / "ready"
    inp.mkdir()
    frames = np.random.default_rng(1).integers(0, 255, (15, 64, 96, 3), dtype=np.uint8)
    write_video(inp / "long.mp4", frames, 30)  # 3 clips of 5 frames
    _ready(ready, "long", 15, 64, 96)
    write_video(inp / "short.mp4", frames[:3], 30)  # too short: 0 clips
    m = prepare(_tiny_cfg(inp, tmp_path / "out", ready), progress=True)
    assert m["counts"]["clips_written"] == 3
    err = capsys.readouterr().err
    assert "3/3 [" in err and "clip" in err and "video" not in err.replace("videos", "")


def test_pose_quality_in_prepare_and_inspect(tmp_path):
    """Each clip gets a pose-quality score (manifest, json, inspect); min_pose_quality drops a clip
    whose skeleton is broken on 3 of 33 frames (arms flipped up), the clean clip stays."""
    from data_tools.pose.format import PoseSequence
    from data_tools.synthetic_data import synthesize_clip

    inp, kp = tmp_path / "in", tmp_path / "kp"
    inp.mkdir()
    kp.mkdir()
    for name, index, broken in (("clean", 3, False), ("broken", 4, True)):
        frames, pose = synthesize_clip(0, index, 33, 128, 128)[:2]
        body = pose.body.copy()
        if broken:
            for t in (5, 6, 7):
                for sh, el, wr in ((2, 3, 4), (5, 6, 7)):  # mirror the arms about the shoulders
                    body[t, [el, wr], 1] = 2 * body[t, sh, 1] - body[t, [el, wr], 1]
        write_video(inp / f"{name}.mp4", frames, 30)
        PoseSequence(body, pose.left_hand, pose.right_hand, pose.face, pose.height, pose.width).save_npz(
            kp / f"{name}.npz")
    cfg = dict(fps=-1, clip_len=33, target_area=128 * 128, face_size=32, pose_options={"path": str(kp)},
               min_person_fraction=0.5)
    m = prepare(_tiny_cfg(inp, tmp_path / "all", kp, **cfg), progress=False)
    scores = {k.split("-")[0]: v for k, v in m["pose_quality"].items()}
    assert scores["clean"] == 1.0 and scores["broken"] < 0.95 and m["stats"]["pose_flagged_clips"] == 1
    rep = inspect_dir(tmp_path / "all")
    assert rep.ok and len(rep.warnings) == 1 and "broken" in rep.warnings[0] and "frames 5-7" in rep.warnings[0]
    assert not inspect_dir(tmp_path / "all", min_pose_quality=0.95).ok
    m = prepare(_tiny_cfg(inp, tmp_path / "kept", kp, min_pose_quality=0.95, **cfg), progress=False)
    assert m["counts"]["clips_written"] == 1 and m["counts"]["clips_skipped"] == 1
    assert "min_pose_quality 0.95" in m["skipped_clips"][0]["reason"] and "broken" in m["skipped_clips"][0]["input"]


def test_reference_policy_image_reads_the_sidecar_next_to_the_video(tmp_path):
    """reference_policy=image without reference_image=: <video stem>.png/.jpg is the reference; without
    one the input is skipped with the fix."""
    import cv2

    inp, ready = tmp_path / "in", tmp_path / "ready"
    inp.mkdir()
    write_video(inp / "a.mp4", np.random.default_rng(0).integers(0, 255, (6, 64, 96, 3), dtype=np.uint8), 30)
    _ready(ready, "a", 6, 64, 96)
    m = prepare(_tiny_cfg(inp, tmp_path / "none", ready, reference_policy="image"), progress=False)
    assert "put a.png/.jpg next to the video" in m["skipped_inputs"][0]["reason"]
    red = np.zeros((64, 96, 3), np.uint8)
    red[..., 0] = 200
    cv2.imwrite(str(inp / "a.png"), red[..., ::-1])
    prepare(_tiny_cfg(inp, tmp_path / "out", ready, reference_policy="image"), progress=False)
    (sample,) = _samples(tmp_path / "out")
    assert sample["meta"]["reference"]["policy"] == "image"
    assert sample["ref"][0].mean() > 0.5 and sample["ref"][1:].mean() < -0.9  # the red sidecar, not a frame
