"""Known-answer tests of eval/metrics: identical inputs give the ideal score, known distortions
move each metric the right way, weight files in the real formats load."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_tools.pose.format import PoseSequence
from eval.metrics import (
    LPIPS, FVDError, LPIPSError, expression_metrics, flicker, frechet_distance, fvd,
    identity_similarity, load_i3d, motion_metrics, psnr, ssim, temporal_error,
)
from wan_animate.heldout import heldout_loss
from _eval_weights import save_tiny_i3d
from _eval_weights import save_tiny_lpips_files


def make_video(t=6, h=32, w=40, seed=0) -> np.ndarray:
    """A smooth gradient with a moving disc: structured enough for SSIM/LPIPS to mean something."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, 0.5 + 0.0 * xx], -1) * 200 + rng.uniform(0, 30, 3)
    frames = []
    for i in range(t):
        f = base.copy()
        cx, cy = 8 + 3 * i, h / 2
        f[(xx - cx) ** 2 + (yy - cy) ** 2 < 25] = (250, 40, 40)
        frames.append(f)
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def add_noise(v, sigma, seed=1):
    rng = np.random.default_rng(seed)
    return np.clip(v + rng.normal(0, sigma, v.shape), 0, 255).astype(np.uint8)


def blur(v, k=5):
    return np.stack([cv2.GaussianBlur(f, (k, k), 0) for f in v])


# ---------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_ssim_identical():
    v = make_video()
    assert psnr(v, v) == math.inf
    assert ssim(v, v) == pytest.approx(1.0, abs=1e-12)


def test_psnr_ssim_known_distortions_move_the_right_way():
    v = make_video()
    light, heavy = add_noise(v, 5), add_noise(v, 25)
    assert math.isfinite(psnr(v, light))
    assert psnr(v, light) > psnr(v, heavy)
    assert 1.0 > ssim(light, v) > ssim(heavy, v)
    assert ssim(blur(v, 3), v) > ssim(blur(v, 9), v)
    assert psnr(blur(v, 3), v) > psnr(blur(v, 9), v)
    # Known value: a constant offset of 10 grey levels gives MSE 100.
    off = v.astype(np.int32)
    off = np.where(off < 245, off + 10, off - 10).astype(np.uint8)
    assert psnr(off, v) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-9)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    return np.outer(g / g.sum(), g / g.sum())  # [size, size], sums to 1


def ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Straight from the definition: explicit loop over every 11x11 window, per channel."""
    win = gaussian_window(11, 1.5)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    a, b = a.astype(np.float64), b.astype(np.float64)
    for ch in range(3):
        for i in range(a.shape[0] - 10):
            for j in range(a.shape[1] - 10):
                x, y = a[i : i + 11, j : j + 11, ch], b[i : i + 11, j : j + 11, ch]
                mx, my = (win * x).sum(), (win * y).sum()
                vx, vy = (win * (x - mx) ** 2).sum(), (win * (y - my) ** 2).sum()
                cxy = (win * (x - mx) * (y - my)).sum()
                vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_explicit_definition():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (15, 14, 3), dtype=np.uint8)
    b = add_noise(a, 30)
    assert ssim(a[None], b[None]) == pytest.approx(ssim_reference(a, b), abs=1e-10)


def test_shape_mismatch_is_a_clear_error():
    v = make_video()
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(v, v[:-1])


# ---------------------------------------------------------------------------- LPIPS


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_loads_real_format_and_orders_distortions(tmp_path, net):
    backbone, linear = save_tiny_lpips_files(tmp_path, net=net)
    m = LPIPS.from_files(backbone, linear, net=net)
    size = 64 if net == "alex" else 32  # alexnet's stride-4 stem needs more pixels
    v = make_video(t=3, h=size, w=size)
    assert m.video_distance(v, v) == pytest.approx(0.0, abs=1e-7)
    d_light, d_heavy = m.video_distance(add_noise(v, 5), v), m.video_distance(add_noise(v, 40), v)
    assert 0 < d_light < d_heavy
    assert m.video_distance(blur(v, 9), v) > 0


def test_lpips_matches_hand_written_formula(tmp_path):
    """An independent computation of the LPIPS formula straight from the two weight files."""
    backbone, linear = save_tiny_lpips_files(tmp_path, net="vgg", width=3, seed=5)
    m = LPIPS.from_files(backbone, linear, net="vgg")
    sd, lin = torch.load(backbone, weights_only=True), torch.load(linear, weights_only=True)
    torch.manual_seed(1)
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(x):
        x = (x - shift) / scale
        out = []
        convs = [[0, 2], [5, 7], [10, 12, 14], [17, 19, 21], [24, 26, 28]]
        for stage, idx in enumerate(convs):
            if stage > 0:
                x = F.max_pool2d(x, 2)
            for i in idx:
                x = F.relu(F.conv2d(x, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], padding=1))
            out.append(x)
        return out

    expected = 0
    for k, (x, y) in enumerate(zip(taps(a), taps(b))):
        nx = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        expected = expected + (F.conv2d((nx - ny) ** 2, lin[f"lin{k}.model.1.weight"])).mean((2, 3))[:, 0]
    torch.testing.assert_close(m(a, b), expected, rtol=1e-5, atol=1e-6)


def test_lpips_bad_files_raise_clear_errors(tmp_path):
    backbone, linear = save_tiny_lpips_files(tmp_path, net="vgg")
    with pytest.raises(LPIPSError, match="does not exist"):
        LPIPS.from_files(tmp_path / "nope.pth", linear)
    torch.save({"lin0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(LPIPSError, match="lin0.model.1.weight"):
        LPIPS.from_files(backbone, tmp_path / "wrong.pth")
    other_b, other_l = save_tiny_lpips_files(tmp_path / "w8", net="vgg", width=8)
    with pytest.raises(LPIPSError, match="different nets"):
        LPIPS.from_files(backbone, other_l)
    with pytest.raises(LPIPSError, match="features.0.weight"):
        LPIPS.from_files(linear, linear)  # a linear file given as the backbone


# ---------------------------------------------------------------------------- FVD


def test_frechet_distance_known_answer():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 4))
    shift = np.array([1.0, -2.0, 0.5, 0.0])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # Same covariance, shifted mean: the distance is exactly |shift|^2.
    assert frechet_distance(a + shift, a) == pytest.approx(float((shift**2).sum()), abs=1e-6)
    # Scaled by k = 3: Tr(S + k^2 S - 2 k S) = (1 - k)^2 Tr(S), plus |k mu - mu|^2.
    s = np.cov(a, rowvar=False)
    assert frechet_distance(a * 3, a) == pytest.approx(4 * np.trace(s) + 4 * (a.mean(0) ** 2).sum(), rel=1e-6)
    with pytest.raises(FVDError, match="at least 2 clips"):
        frechet_distance(a[:1], a)


def test_fvd_from_torchscript_file(tmp_path):
    det = load_i3d(save_tiny_i3d(tmp_path / "i3d_torchscript.pt"))
    real = [make_video(t=8, h=32, w=40, seed=s) for s in range(3)]
    score, n = fvd(det, real, real, clip_frames=4)
    assert n == 6 and score == pytest.approx(0.0, abs=1e-6)
    near, _ = fvd(det, [add_noise(v, 10) for v in real], real, clip_frames=4)
    far, _ = fvd(det, [255 - v for v in real], real, clip_frames=4)
    assert 0 < near < far


def test_fvd_rejects_non_torchscript(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "sd.pt")
    with pytest.raises(FVDError, match="not a TorchScript module"):
        load_i3d(tmp_path / "sd.pt")
    with pytest.raises(FVDError, match="does not exist"):
        load_i3d(tmp_path / "missing.pt")


# ---------------------------------------------------------------------------- keypoints


def make_pose(t=5, seed=0, h=256, w=256) -> PoseSequence:
    rng = np.random.default_rng(seed)

    def pts(n, lo, hi):
        return np.concatenate([rng.uniform(lo, hi, (t, n, 2)), np.ones((t, n, 1))], -1)

    body = pts(20, 40, 200)
    body[:, 0, :2] = [40, 40]
    body[:, 1, :2] = [200, 200]  # body box = 160 px on each side, every frame
    face = pts(68, 90, 130)
    face[:, 36, :2], face[:, 45, :2] = [95, 100], [125, 100]  # inter-ocular distance 30 px
    return PoseSequence(body, pts(21, 60, 90), pts(21, 150, 180), face, h, w)


def shifted(p: PoseSequence, dx: float) -> PoseSequence:
    arrays = [a.copy() for a in (p.body, p.left_hand, p.right_hand, p.face)]
    for a in arrays:
        a[..., 0] += dx
    return PoseSequence(*arrays, p.height, p.width)


def test_keypoints_identical_give_zero_error():
    p = make_pose()
    m = motion_metrics(p, p)
    for g in ("body", "hands"):
        assert m[f"{g}_error"] == 0.0 and m[f"{g}_pck@0.05"] == 1.0 and m[f"{g}_pck@0.1"] == 1.0
    assert expression_metrics(p, p)["face_nme"] == 0.0


def test_shifted_keypoints_cross_pck_thresholds():
    p = make_pose()
    m = motion_metrics(shifted(p, 0.07 * 160), p)  # 7 % of the 160 px body box
    assert m["body_error"] == pytest.approx(0.07, abs=1e-5)
    assert m["body_pck@0.05"] == 0.0 and m["body_pck@0.1"] == 1.0
    m2 = motion_metrics(shifted(p, 0.2 * 160), p)
    assert m2["body_error"] > m["body_error"] and m2["body_pck@0.1"] == 0.0


def test_hands_scored_separately_and_only_on_driving_detections():
    p = make_pose()
    gen = PoseSequence(p.body, p.left_hand + [5, 0, 0], p.right_hand, p.face, p.height, p.width)
    m = motion_metrics(gen, p)
    assert m["body_error"] == 0.0 and m["hands_error"] > 0
    # Points the driving video did not detect are never judged, whatever the generation did there.
    drv = PoseSequence(p.body, p.left_hand.copy(), p.right_hand, p.face, p.height, p.width)
    drv.left_hand[..., 2] = 0
    assert motion_metrics(gen, drv)["hands_error"] == 0.0
    assert motion_metrics(gen, drv)["hands_points"] == 5 * 21
    # A generated point that was not detected counts as a PCK miss.
    lost = PoseSequence(p.body.copy(), p.left_hand, p.right_hand, p.face, p.height, p.width)
    lost.body[:, :10, 2] = 0
    m = motion_metrics(lost, p)
    assert m["body_detected"] == 0.5 and m["body_pck@0.1"] == 0.5 and m["body_error"] == 0.0


def test_expression_is_crop_invariant_and_sees_mouth_motion():
    p = make_pose()
    moved = PoseSequence(p.body, p.left_hand, p.right_hand, p.face.copy(), p.height, p.width)
    moved.face[..., :2] = moved.face[..., :2] * 1.5 + 7  # same face, bigger and elsewhere
    assert expression_metrics(moved, p)["face_nme"] == pytest.approx(0.0, abs=1e-6)
    opened = PoseSequence(p.body, p.left_hand, p.right_hand, p.face.copy(), p.height, p.width)
    opened.face[:, 57:60, 1] += 10  # lower lip down
    assert expression_metrics(opened, p)["face_nme"] > 0.01


def test_keypoints_rescale_driving_to_generated_size():
    p = make_pose()
    half = PoseSequence(*(a.copy() for a in (p.body, p.left_hand, p.right_hand, p.face)), 128, 128)
    for a in (half.body, half.left_hand, half.right_hand, half.face):
        a[..., :2] /= 2
    assert motion_metrics(half, p)["body_error"] == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------- temporal


def test_flicker_and_temporal_error():
    v = make_video(t=8)
    assert temporal_error(v, v) == 0.0
    frozen = np.repeat(v[:1], len(v), 0)
    assert flicker(frozen) == 0.0 < flicker(v)
    assert temporal_error(frozen, v) > 0
    noisy = np.stack([add_noise(f, 8, seed=i) for i, f in enumerate(v)])  # independent per frame
    assert flicker(noisy) > flicker(v)
    assert temporal_error(noisy, v) > 0


# ---------------------------------------------------------------------------- identity


class FakeImageEncoder(torch.nn.Module):
    """Stands in for the CLIP tower: a fixed random conv + pooling into 257 tokens."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 5, stride=4)

    def encode(self, images):
        f = self.conv(F.interpolate(images, size=(64, 64), mode="bilinear"))  # [B, 16, 15, 15]
        tokens = f.flatten(2).transpose(1, 2)  # [B, 225, 16]
        return torch.cat([tokens.mean(1, keepdim=True), tokens, tokens[:, :31]], 1)  # [B, 257, 16]


def test_identity_cosine():
    enc = FakeImageEncoder()
    v = make_video(t=4)
    assert identity_similarity(enc, v[0], np.repeat(v[:1], 4, 0)) == pytest.approx(1.0, abs=1e-5)
    other = 255 - v
    assert identity_similarity(enc, v[0], other) < identity_similarity(enc, v[0], v)


# ---------------------------------------------------------------------------- held-out loss


class ScaleDiT(torch.nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(float(a)))

    def forward(self, x, t, context, clip_fea, y, pose_latents, face_pixel_values):
        return self.a * x


def make_batches(n=2):
    g = torch.Generator().manual_seed(0)
    return [{
        "latents": torch.randn(1, 4, 3, 4, 4, generator=g), "y": torch.zeros(1, 12, 3, 4, 4),
        "context": torch.zeros(1, 2, 8), "clip_fea": torch.zeros(1, 2, 8),
        "pose_latents": torch.zeros(1, 4, 2, 4, 4), "face_pixel_values": torch.zeros(1, 3, 5, 8, 8),
    } for _ in range(n)]


def test_heldout_loss_is_deterministic_and_model_sensitive():
    dit = ScaleDiT(0.5).train()
    a = heldout_loss(dit, make_batches(), timesteps=(250, 750), seed=3)
    b = heldout_loss(dit, make_batches(), timesteps=(250, 750), seed=3)
    assert a == b and a["heldout_samples"] == 2 and set(a) >= {"heldout_loss@t250", "heldout_loss@t750"}
    assert dit.training  # mode restored
    assert heldout_loss(dit, make_batches(), timesteps=(250, 750), seed=4) != a
    assert heldout_loss(ScaleDiT(-3.0), make_batches(), timesteps=(250, 750), seed=3)["heldout_loss"] > a["heldout_loss"]
    with pytest.raises(ValueError, match=r"\[0, 1000\]"):
        heldout_loss(dit, make_batches(), timesteps=(1500,))


def test_frozen_frames_move_every_metric_the_right_way():
    v = make_video(t=8)
    frozen = np.repeat(v[:1], len(v), 0)
    assert psnr(frozen, v) < psnr(v, v) and ssim(frozen, v) < 1.0
    assert temporal_error(frozen, v) > temporal_error(v, v)
    # Keypoints: the driving person walks right 3 % of the box per frame; the generation stands still.
    p = make_pose(t=8)
    walking = PoseSequence(*(a.copy() for a in (p.body, p.left_hand, p.right_hand, p.face)), p.height, p.width)
    for a in (walking.body, walking.left_hand, walking.right_hand, walking.face):
        a[..., 0] += np.arange(8)[:, None] * 0.03 * 160
    still = walking.select(np.zeros(8, int))
    m = motion_metrics(still, walking)
    assert m["body_error"] > 0.05 and m["body_pck@0.05"] < 1.0 and m["hands_pck@0.1"] < 1.0
    assert motion_metrics(walking, walking)["body_pck@0.05"] == 1.0
