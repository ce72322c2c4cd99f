"""WanAnimateConfig and video I/O: the pieces every other part stands on."""

import numpy as np
import pytest

from wan_animate.config import PRESETS, WanAnimateConfig
from wan_animate.video_io import VideoDecodeError, encode_video_bytes, read_video, write_video


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_round_trips_through_every_format(name):
    cfg = WanAnimateConfig.preset(name)
    assert WanAnimateConfig.from_dict(cfg.to_dict()) == cfg
    assert WanAnimateConfig.from_official_config(cfg.to_official_config()) == cfg
    assert WanAnimateConfig.from_diffusers_config(cfg.to_diffusers_config()) == cfg


def test_14b_preset_has_published_shapes():
    cfg = WanAnimateConfig.preset("14b")
    assert (cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers) == (5120, 13824, 40, 40)
    assert cfg.head_dim == 128 and cfg.rope_split == (44, 42, 42) and cfg.num_face_blocks == 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_heads": 3}, "not divisible by num_heads"),
        ({"in_dim": 30}, "in_dim=30 must equal"),
        ({"num_layers": 5}, "multiple of face_adapter_period"),
        ({"motion_encoder_size": 48}, "power of two"),
        ({"motion_encoder_channel_sizes": {"4": 8}}, "lacks resolutions"),
    ],
)
def test_invalid_config_says_what_to_change(overrides, message):
    with pytest.raises(ValueError, match=message):
        WanAnimateConfig.preset("tiny", **overrides)


def test_unknown_preset_and_field_are_named():
    with pytest.raises(ValueError, match="Unknown preset 'huge'"):
        WanAnimateConfig.preset("huge")
    with pytest.raises(ValueError, match="dimm"):
        WanAnimateConfig.from_dict({"dimm": 3})


def test_video_round_trip(tmp_path):
    # A smooth gradient survives H.264 at crf 18 almost exactly.
    t, h, w = 5, 32, 48
    ramp = np.linspace(0, 255, w, dtype=np.float32)[None, None, :, None]
    frames = np.broadcast_to(ramp, (t, h, w, 3)).astype(np.uint8).copy()
    frames[:, :, :, 1] = np.arange(t, dtype=np.uint8)[:, None, None] * 40
    write_video(tmp_path / "v.mp4", frames, 24)
    decoded, fps = read_video(tmp_path / "v.mp4")
    assert decoded.shape == frames.shape and fps == pytest.approx(24)
    assert np.abs(decoded.astype(int) - frames).mean() < 3
    same, _ = read_video(encode_video_bytes(frames, 24))
    assert same.shape == frames.shape


def test_bad_videos_raise_decode_error_naming_the_file(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video")
    good = encode_video_bytes(np.zeros((8, 32, 32, 3), np.uint8), 30)
    (tmp_path / "cut.mp4").write_bytes(good[: len(good) // 3])
    for name in ("empty.mp4", "text.mp4", "cut.mp4", "missing.mp4"):
        with pytest.raises(VideoDecodeError, match=name):
            read_video(tmp_path / name)


def test_write_rejects_bad_frames(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 31, 32, 3), np.uint8), 30)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "f.mp4", np.zeros((2, 32, 32, 3), np.float32), 30)
