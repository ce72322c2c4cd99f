"""Face-crop augmentation (scale, colour jitter, noise) and its wiring into the training stream."""

import numpy as np
import pytest
import torch

from train.face_augment import FaceAugmentParams, augment_face, draw_face_augment

IDENTITY = FaceAugmentParams(scale=1.0, brightness=0.0, contrast=1.0, saturation=1.0, noise_std=0.0)


def _face(frames: int = 3, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, frames, size, size, generator=g) * 1.6 - 0.8


def test_identity_parameters_leave_the_crop_unchanged():
    face = _face()
    torch.testing.assert_close(augment_face(face, IDENTITY, noise_seed=0), face, atol=1e-5, rtol=0)


def test_zoom_scales_a_centred_square():
    face = -torch.ones(3, 1, 64, 64)
    face[:, :, 24:40, 24:40] = 1.0  # 16x16 bright square in the centre
    zoomed = augment_face(face, FaceAugmentParams(1.5, 0.0, 1.0, 1.0, 0.0), noise_seed=0)
    bright = (zoomed[0, 0] > 0).sum().item()
    assert bright == pytest.approx(16 * 16 * 1.5**2, rel=0.15)
    shrunk = augment_face(face, FaceAugmentParams(0.75, 0.0, 1.0, 1.0, 0.0), noise_seed=0)
    assert (shrunk[0, 0] > 0).sum().item() == pytest.approx(16 * 16 * 0.75**2, rel=0.2)


def test_colour_operations():
    face = _face()
    # brightness is in [-1, 1] pixel units (inputs within +-0.8: nothing clips)
    brighter = augment_face(face, FaceAugmentParams(1.0, 0.1, 1.0, 1.0, 0.0), noise_seed=0)
    torch.testing.assert_close(brighter, face + 0.1, atol=1e-5, rtol=0)
    grey = augment_face(face, FaceAugmentParams(1.0, 0.0, 1.0, 0.0, 0.0), noise_seed=0)
    torch.testing.assert_close(grey[0], grey[1])
    torch.testing.assert_close(grey[1], grey[2])
    flat = augment_face(face, FaceAugmentParams(1.0, 0.0, 0.0, 1.0, 0.0), noise_seed=0)
    assert flat[:, 0].std().item() < 1e-5  # contrast 0: every pixel of a frame at the frame mean


def test_noise_is_seeded_and_bounded():
    face = _face()
    p = FaceAugmentParams(1.0, 0.0, 1.0, 1.0, 0.05)
    a, b = augment_face(face, p, noise_seed=7), augment_face(face, p, noise_seed=7)
    assert torch.equal(a, b) and not torch.equal(a, augment_face(face, p, noise_seed=8))
    assert (a - face).std().item() == pytest.approx(0.05, rel=0.2)
    assert a.min() >= -1 and a.max() <= 1


def test_draws_stay_in_their_ranges():
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = draw_face_augment(rng, scale=0.1, color=0.2, noise=0.03)
        assert 0.9 <= p.scale <= 1.1 and -0.2 <= p.brightness <= 0.2
        assert 0.8 <= p.contrast <= 1.2 and 0.8 <= p.saturation <= 1.2 and 0 <= p.noise_std <= 0.03


def test_training_stream_applies_it_only_when_enabled():
    from train.config import ConfigError, DataConfig
    from train.data import _face_choices

    face = _face()
    off = DataConfig(face_dropout=0.0)
    assert torch.equal(_face_choices(face, off, np.random.default_rng(1)), face)
    # disabled: only the face-dropout draw is consumed, as before augmentation existed
    rng_off, reference = np.random.default_rng(1), np.random.default_rng(1)
    _face_choices(face, off, rng_off)
    reference.random()
    assert rng_off.random() == reference.random()
    on = DataConfig(face_dropout=0.0, face_aug_prob=1.0)
    augmented = _face_choices(face, on, np.random.default_rng(1))
    assert augmented.shape == face.shape and not torch.equal(augmented, face)
    assert torch.equal(augmented, _face_choices(face, on, np.random.default_rng(1)))  # deterministic per sample
    with pytest.raises(ConfigError, match="face_aug_scale"):
        DataConfig(face_aug_scale=1.5)
