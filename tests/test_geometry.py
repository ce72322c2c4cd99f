"""wan_animate.geometry / options / files: the one home of shared rules."""

import json
import math

import numpy as np
import pytest
import torch

from wan_animate.files import atomic_dir, atomic_write_json, atomic_write_text
from wan_animate.geometry import (ResizePlan, area_bucket, choose_bucket, crop_box_map, letterbox, nearest_bucket,
                                  resize_crop_tensor)
from wan_animate.options import SOLVERS, check_frames_4n1, parse_dtype, resolve_device


def test_bucket_tie_break_is_larger_area_then_first_listed():
    # equal log-aspect distance: the larger bucket wins whatever the order
    assert nearest_bucket(100, 200, [(240, 480), (480, 960)]) == (480, 960)
    assert nearest_bucket(100, 200, [(480, 960), (240, 480)]) == (480, 960)
    # same area, mirrored aspects around a square clip: the first listed
    assert nearest_bucket(500, 500, [(480, 832), (832, 480)]) == (480, 832)
    assert nearest_bucket(500, 500, [(832, 480), (480, 832)]) == (832, 480)
    assert choose_bucket(720, 1280, 832 * 480) == area_bucket(720, 1280, 832 * 480) == (464, 832)
    with pytest.raises(ValueError, match="at least one"):
        nearest_bucket(1, 1, [])


def test_letterbox_is_the_official_rule():
    img = np.full((99, 101, 3), 200, np.uint8)
    out = letterbox(img, 48, 80)
    # height binds: 48 rows; width floor(48 / 99 * 101) = 48 (round would give 49), centred at x = 16
    assert out.shape == (48, 80, 3)
    assert out[:, :16].max() == 0 and out[:, 64:].max() == 0 and out[:, 16:64].min() == 200
    plan = ResizePlan(99, 101, 48, 80, "letterbox")
    assert (plan.rh, plan.rw) == (48, 49)  # the data-prep rule rounds
    assert letterbox(np.zeros((3, 1000, 3), np.uint8), 16, 16).shape == (16, 16, 3)  # no zero-size resize


def test_crop_plan_maps_points_like_frames():
    plan = ResizePlan(720, 1280, 176, 320, "crop")
    frame = np.zeros((720, 1280, 3), np.uint8)
    frame[300:420, 700:820] = 255  # a square off-centre
    out = plan.apply(frame)
    box = plan.boxes(np.array([[700, 300, 820, 420]], np.float32))[0]
    ys, xs = np.nonzero(out[..., 0] > 127)
    assert abs(xs.min() - box[0]) <= 1 and abs(ys.min() - box[1]) <= 1
    with pytest.raises(ValueError, match="resize mode"):
        ResizePlan(1, 1, 1, 1, "stretch")


def test_resize_crop_tensor_and_box_map_agree():
    x = torch.zeros(1, 60, 100)
    x[0, 20:40, 60:80] = 1
    y = resize_crop_tensor(x, (32, 32))
    scale, top, left = crop_box_map(60, 100, (32, 32))
    ys, xs = torch.nonzero(y[0] > 0.5, as_tuple=True)
    assert abs(xs.min().item() - (60 * scale - left)) <= 1 and abs(ys.min().item() - (20 * scale - top)) <= 1
    assert resize_crop_tensor(x, (60, 100)) is x


def test_options_vocabularies():
    for a, b in (("bf16", "bfloat16"), ("fp32", "float32"), ("fp16", "float16")):
        assert parse_dtype(a) == parse_dtype(b) == parse_dtype(parse_dtype(a))
    assert parse_dtype("auto", "cpu") == torch.float32 and parse_dtype("auto", "cuda:0") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='int8'.*bf16"):
        parse_dtype("int8")
    assert resolve_device("cpu").type == "cpu" and resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device=cuda.*device=cpu"):
            resolve_device("cuda")
    assert check_frames_4n1(77) == 77 and check_frames_4n1(0, "max_frames", allow_zero=True) == 0
    for bad in (8, 0, 3):
        with pytest.raises(ValueError, match="clip_len=.* 4n\\+1"):
            check_frames_4n1(bad, "clip_len", minimum=5)
    assert "unipc" in SOLVERS


def test_strict_json_and_atomic_writes(tmp_path):
    p = atomic_write_json(tmp_path / "a.json", {"loss": float("nan"), "x": [1.0, float("inf")], "n": np.float32(2)})
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": None, "x": [1.0, None], "n": 2.0}
    atomic_write_text(tmp_path / "b.txt", "hi")
    assert [q.name for q in sorted(tmp_path.iterdir())] == ["a.json", "b.txt"]  # no temp files left
    with pytest.raises(ValueError):  # the guard: a type strict_json passes through must not leak NaN
        json.dumps(math.nan, allow_nan=False)

    calls = []

    def build(d):
        calls.append(d)
        d.mkdir()
        (d / "f").write_text("x")

    dst = atomic_dir(tmp_path / "model", build)
    assert (dst / "f").is_file() and (dst / ".complete").is_file()
    atomic_dir(tmp_path / "model", build)
    assert len(calls) == 1  # a complete folder is reused

    def crash(d):
        d.mkdir()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_dir(tmp_path / "other", crash)
    assert not (tmp_path / "other").exists() and len(list(tmp_path.glob("other*"))) == 0
