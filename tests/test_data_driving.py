"""Retargeting and the official inference inputs (preprocess_driving)."""

import json

import numpy as np
import pytest

from data_tools.pose.format import PoseSequence
from data_tools.retarget import LIMB_TREE, retarget_pose
from wan_animate.video_io import read_video


def _skeleton(scale, origin, t=3, sway=0.0):
    """A standing full-body skeleton (OpenPose 20) of height ~ 100*scale, feet at ``origin``."""
    base = np.array([
        [0, -100], [0, -85], [-12, -85], [-16, -65], [-18, -48], [12, -85], [16, -65], [18, -48],
        [-8, -50], [-9, -25], [-10, 0], [8, -50], [9, -25], [10, 0], [-3, -103], [3, -103], [-6, -100],
        [6, -100], [14, 2], [-14, 2]], np.float64)
    body = np.zeros((t, 20, 3), np.float32)
    for k in range(t):
        pts = base * scale + origin + [sway * k, 0]
        body[k, :, :2] = pts
        body[k, :, 2] = 1
    face = np.zeros((t, 68, 3), np.float32)
    face[:, :, :2] = body[:, :1, :2] + np.random.default_rng(0).normal(0, 2 * scale, (t, 68, 2))
    face[:, :, 2] = 1
    hands = np.zeros((t, 21, 3), np.float32)
    return PoseSequence(body, hands, hands.copy(), face, 400, 400)


def test_retarget_takes_reference_proportions_and_follows_motion():
    drv = _skeleton(2.0, [150, 350], sway=10.0)
    # the reference has longer arms than a scaled driving skeleton
    ref = _skeleton(1.5, [250, 300], t=1)
    ref.body[0, 4, :2] += [0, 10]
    ref.body[0, 7, :2] += [0, 10]
    out = retarget_pose(drv, ref)
    for a, b in LIMB_TREE:
        want = np.hypot(*(ref.body[0, a, :2] - ref.body[0, b, :2]))
        got = np.hypot(*(out.body[0, a, :2] - out.body[0, b, :2]))
        assert abs(got - want) < 1e-3 * max(want, 1), (a, b, got, want)
    # anchored at the feet: first frame's feet land on the reference's feet
    np.testing.assert_allclose(out.body[0, [10, 13], :2].mean(0), ref.body[0, [10, 13], :2].mean(0), atol=1e-3)
    # motion follows the driving sway scaled by the height ratio (1.5 / 2.0)
    shift = out.body[2, 1, 0] - out.body[0, 1, 0]
    assert abs(shift - 20 * 0.75) < 1e-3
    # the face follows the nose with the head ratio; negative control: untouched pose differs
    assert np.abs(out.face[0, :, :2] - drv.face[0, :, :2]).mean() > 10


def test_retarget_needs_a_neck():
    drv = _skeleton(1.0, [100, 300])
    ref = _skeleton(1.0, [100, 300], t=1)
    ref.body[0, 1, 2] = 0
    with pytest.raises(ValueError, match="neck"):
        retarget_pose(drv, ref)


def test_preprocess_driving_writes_official_inputs(tmp_path, wan_example):
    from data_tools.preprocess_driving import main

    video, ref = str(wan_example / "video.mp4"), str(wan_example / "image.jpeg")
    out = tmp_path / "job"
    rc = main(["--video", video, "--ref", ref, "--out", str(out),
               "--replace", "--target-area", str(256 * 144), "--max-frames", "9", "--face-size", "128",
               "--pose-option", "max_side=256"])
    assert rc == 0
    names = {"src_ref.png", "src_pose.mp4", "src_face.mp4", "src_bg.mp4", "src_mask.mp4", "src_meta.json"}
    assert names <= {p.name for p in out.iterdir()}
    pose, _ = read_video(out / "src_pose.mp4")
    face, _ = read_video(out / "src_face.mp4")
    bg, _ = read_video(out / "src_bg.mp4")
    mask, _ = read_video(out / "src_mask.mp4")
    assert len(pose) == len(face) == len(bg) == len(mask) == 9
    assert pose.shape[1:3] == bg.shape[1:3] == (144, 256) and face.shape[1:3] == (128, 128)
    assert pose.max() > 0  # a skeleton was drawn
    assert 0.02 < (mask[..., 0] > 127).mean() < 0.9
    meta = json.loads((out / "src_meta.json").read_text())
    assert meta["num_frames"] == 9 and not meta["retargeted"]
    # animate mode with retargeting onto the reference image
    out2 = tmp_path / "job2"
    assert main(["--video", video, "--ref", ref, "--out", str(out2),
                 "--retarget", "--target-area", str(256 * 144), "--max-frames", "5", "--face-size", "64",
                 "--pose-option", "max_side=256"]) == 0
    meta2 = json.loads((out2 / "src_meta.json").read_text())
    assert meta2["retargeted"] and not (out2 / "src_bg.mp4").exists()
    from PIL import Image

    assert Image.open(out2 / "src_ref.png").size == (256, 144)
