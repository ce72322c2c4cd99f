"""Pose-quality score: synthetic clips with exact keypoints, clean and broken."""

import json

import numpy as np
import pytest

from data_tools.pose import PoseSequence
from data_tools.pose.quality import PoseQualityRules, describe_pose_quality, pose_quality
from data_tools.synthetic_data import synthesize_clip

ARMS = ((2, 3, 4), (5, 6, 7))  # (shoulder, elbow, wrist), right and left


def _clip(index=3, clip_len=33, size=480):
    return synthesize_clip(0, index, clip_len, size, size)[1]


def _with_body(seq, body):
    return PoseSequence(body, seq.left_hand, seq.right_hand, seq.face, seq.height, seq.width)


def _arms_up(body, frames, lift=0.0):
    """Mirror both arms about the shoulder line (hands above the head), ``lift`` px higher still."""
    for t in frames:
        for sh, el, wr in ARMS:
            for j, extra in ((el, lift / 2), (wr, lift)):
                body[t, j, 1] = 2 * body[t, sh, 1] - body[t, j, 1] - extra


@pytest.mark.parametrize("clip_len", [17, 33, 81])
def test_clean_synthetic_clips_are_not_flagged(clip_len):
    for index in range(8):
        q = pose_quality(_clip(index, clip_len, 64))
        assert q["score"] == 1.0 and q["flags"] == [] and q["bad_frames"] == [], (index, q)


def test_broken_skeleton_is_flagged_on_its_frames():
    seq = _clip()
    body = seq.body.copy()
    _arms_up(body, (5, 6, 7))
    forearm = body[20:22, 7, :2] - body[20:22, 6, :2]
    body[20:22, 7, :2] = body[20:22, 6, :2] + 2 * forearm  # the left forearm doubles in length
    q = pose_quality(_with_body(seq, body))
    assert q["flags"] == ["temporal_jumps", "limb_length_outliers"]
    assert q["jump_frames"] == [5, 6, 7] and q["limb_outlier_frames"] == [20, 21]
    assert q["bad_frames"] == [5, 6, 7, 20, 21] and q["score"] == pytest.approx(1 - 5 / 33, abs=1e-4)
    assert describe_pose_quality(q) == "pose 0.85 (temporal_jumps: frames 5-7; limb_length_outliers: frames 20-21)"
    json.dumps(q, allow_nan=False)  # strict JSON for the manifest


def test_wrong_first_frames_are_the_glitch_not_the_rest():
    # mediapipe's failure on the sample clip: a wrong skeleton on the first frames, then right.
    seq = _clip()
    body = seq.body.copy()
    _arms_up(body, (0, 1, 2), lift=60)
    q = pose_quality(_with_body(seq, body))
    assert "temporal_jumps" in q["flags"] and q["jump_frames"] == [0, 1, 2]
    assert 3 not in q["bad_frames"]


def test_negative_controls_small_shift_and_long_other_track():
    seq = _clip()
    body = seq.body.copy()
    body[5:8, [3, 4, 6, 7], 1] -= 4  # a few pixels: no jump (torso is ~140 px)
    assert pose_quality(_with_body(seq, body))["score"] == 1.0
    # A limb 1.4x its median (within max_limb_ratio 1.6) is not an outlier.
    body = seq.body.copy()
    body[20, 7, :2] = body[20, 6, :2] + 1.4 * (body[20, 7, :2] - body[20, 6, :2])
    assert pose_quality(_with_body(seq, body))["limb_outlier_frames"] == []
    # Arms up for longer than max_glitch_frames: a second long track, only its first frame marked.
    body = seq.body.copy()
    _arms_up(body, range(10, 22))
    q = pose_quality(_with_body(seq, body))
    # (frames 22.. rejoin the first track: 21 frames against 12)
    assert q["jump_frames"] == [10] and q["score"] == pytest.approx(32 / 33, abs=1e-4)


def test_low_confidence_and_no_person():
    seq = _clip(clip_len=17)
    body = seq.body.copy()
    body[4, :10, 2] = 0.3  # 4 of 14 main points left
    q = pose_quality(_with_body(seq, body))
    assert q["flags"] == ["low_confidence"] and q["low_confidence_frames"] == [4]
    empty = PoseSequence.empty(5, 64, 64)
    q = pose_quality(empty)
    assert q["score"] == 0.0 and q["flags"] == ["no_person"] and q["torso_px"] is None
    json.dumps(q, allow_nan=False)


def test_rules_are_validated_and_scale_free():
    with pytest.raises(ValueError, match="max_limb_ratio"):
        PoseQualityRules(max_limb_ratio=0)
    with pytest.raises(ValueError, match="jump_points"):
        PoseQualityRules(jump_points=0)
    seq = _clip()
    body = seq.body.copy()
    _arms_up(body, (5, 6, 7))
    big = _with_body(seq, body)
    small = big.resized(120, 120)
    assert pose_quality(big)["bad_frames"] == pose_quality(small)["bad_frames"] == [5, 6, 7]


def test_half_body_clip_is_not_low_confidence():
    # Legs and hips never seen (a half-body framing): not low confidence; the unit falls back to
    # the shoulders. A frame that then loses most of the upper body still is.
    seq = _clip(clip_len=17)
    body = seq.body.copy()
    body[:, 8:14, 2] = 0.1
    q = pose_quality(_with_body(seq, body))
    assert q["score"] == 1.0 and q["torso_px"] > 0, q
    body[6, :6, 2] = 0.1
    assert pose_quality(_with_body(seq, body))["low_confidence_frames"] == [6]
