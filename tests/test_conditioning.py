"""Conditioning builder against hand-computed expectations (facts section 1)."""

import pytest
import torch

from wan_animate.conditioning import (
    build_condition,
    environment_mask,
    num_latent_frames,
    pack_pixel_mask,
    temporal_mask,
    temporal_reference_video,
)


def pixel_frame_of(latent_frame: int, channel: int) -> int:
    """Hand rule: latent frame 0 holds pixel frame 0 four times; latent i>0 channel c holds 4(i-1)+1+c."""
    return 0 if latent_frame == 0 else 4 * (latent_frame - 1) + 1 + channel


def test_latent_frame_count():
    assert num_latent_frames(77) == 20
    assert num_latent_frames(9) == 3
    assert num_latent_frames(1) == 1
    with pytest.raises(ValueError, match="4n\\+1"):
        num_latent_frames(8)


def test_pack_pixel_mask_order():
    f = 13
    pixel = torch.arange(f, dtype=torch.float32).view(1, 1, f, 1, 1).expand(2, 1, f, 2, 3)
    packed = pack_pixel_mask(pixel)
    assert packed.shape == (2, 4, 4, 2, 3)
    for i in range(4):
        for c in range(4):
            assert torch.all(packed[:, c, i] == pixel_frame_of(i, c)), (i, c)


@pytest.mark.parametrize("clip_len", [9, 13])
@pytest.mark.parametrize("refert_num", [1, 5])
@pytest.mark.parametrize("first_segment", [True, False])
def test_animate_condition(clip_len, refert_num, first_segment):
    b, t, h, w = 2, num_latent_frames(clip_len), 4, 6
    ref = torch.randn(b, 16, 1, h, w)
    tmp = torch.randn(b, 16, t, h, w)
    given = 0 if first_segment else refert_num
    y = build_condition(ref, tmp, num_given=given, mode="animate")
    assert y.shape == (b, 20, t + 1, h, w)
    # channel layout: 4 mask channels first, then the latent
    assert torch.equal(y[:, 4:, :1], ref)
    assert torch.equal(y[:, 4:, 1:], tmp)
    assert torch.all(y[:, :4, 0] == 1), "reference slot mask must be all ones"
    for i in range(t):
        for c in range(4):
            expected = 1.0 if pixel_frame_of(i, c) < given else 0.0
            assert torch.all(y[:, c, 1 + i] == expected), (i, c, expected)
    # hand count: a first segment has no given frame; refert 1 fills latent 0; refert 5 latents 0 and 1
    full = [i for i in range(t) if y[0, :4, 1 + i].min() == 1]
    empty = [i for i in range(t) if y[0, :4, 1 + i].max() == 0]
    assert full == {0: [], 1: [0], 5: [0, 1]}[given]
    assert empty == [i for i in range(t) if i not in full]


@pytest.mark.parametrize("refert_num", [1, 5])
@pytest.mark.parametrize("first_segment", [True, False])
def test_replace_condition(refert_num, first_segment):
    clip_len, b, hh, ww = 9, 1, 32, 48
    t, h, w = num_latent_frames(clip_len), hh // 8, ww // 8
    # pixel frame j: the character covers pixel rows 8*(j%4) .. 8*(j%4)+7 -> latent row j%4
    char = torch.zeros(b, 1, clip_len, hh, ww)
    for j in range(clip_len):
        char[:, :, j, 8 * (j % 4): 8 * (j % 4) + 8] = 1
    given = 0 if first_segment else refert_num
    y = build_condition(torch.randn(b, 16, 1, h, w), torch.randn(b, 16, t, h, w), num_given=given,
                        mode="replace", character_mask=char)
    assert y.shape == (b, 20, t + 1, h, w)
    for i in range(t):
        for c in range(4):
            j = pixel_frame_of(i, c)
            expected = torch.ones(h, w)
            if j >= given:  # environment 1, character row 0
                expected[j % 4] = 0
            assert torch.equal(y[0, c, 1 + i], expected), (i, c)


def test_environment_mask_is_nearest_and_inverted():
    char = torch.zeros(1, 1, 1, 16, 16)
    char[..., 0:8, 8:16] = 1  # top-right quadrant is the character
    env = environment_mask(char, (2, 2))
    assert torch.equal(env[0, 0, 0], torch.tensor([[1.0, 0.0], [1.0, 1.0]]))


def test_temporal_mask_replace_given_frames_override_environment():
    env = torch.zeros(1, 1, 5, 2, 2)
    m = temporal_mask(5, (2, 2), num_given=1, env_mask=env)
    assert m[:, :, 0].min() == 1 and m[:, :, 1].max() == 0


def test_temporal_reference_video_animate_and_replace():
    clip_len, hh, ww = 9, 16, 16
    prev = torch.rand(1, 3, 5, hh, ww) * 2 - 1
    bg = torch.rand(1, 3, clip_len, hh, ww) * 2 - 1

    v, n = temporal_reference_video(clip_len, hh, ww, mode="animate")
    assert n == 0 and v.shape == (1, 3, clip_len, hh, ww) and v.abs().max() == 0

    v, n = temporal_reference_video(clip_len, hh, ww, mode="animate", prev_frames=prev)
    assert n == 5 and torch.equal(v[:, :, :5], prev) and v[:, :, 5:].abs().max() == 0

    v, n = temporal_reference_video(clip_len, hh, ww, mode="replace", bg_video=bg)
    assert n == 0 and torch.equal(v, bg)

    v, n = temporal_reference_video(clip_len, hh, ww, mode="replace", prev_frames=prev[:, :, -1:], bg_video=bg)
    assert n == 1 and torch.equal(v[:, :, :1], prev[:, :, -1:]) and torch.equal(v[:, :, 1:], bg[:, :, 1:])

    # carried frames of another size are resized (bicubic) to the clip size
    v, n = temporal_reference_video(clip_len, 32, 32, mode="animate", prev_frames=prev[:, :, :1])
    assert v.shape == (1, 3, clip_len, 32, 32) and n == 1 and v[:, :, :1].abs().max() > 0


def test_condition_errors():
    ref, tmp = torch.zeros(1, 16, 1, 2, 2), torch.zeros(1, 16, 3, 2, 2)
    with pytest.raises(ValueError, match="character_mask"):
        build_condition(ref, tmp, num_given=0, mode="replace")
    with pytest.raises(ValueError, match="mode"):
        build_condition(ref, tmp, num_given=0, mode="inpaint")
    with pytest.raises(ValueError, match="frames"):
        build_condition(ref, tmp, num_given=0, mode="replace", character_mask=torch.zeros(1, 1, 5, 16, 16))
    with pytest.raises(ValueError, match="bg_video"):
        temporal_reference_video(9, 16, 16, mode="replace")
