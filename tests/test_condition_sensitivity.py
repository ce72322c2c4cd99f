"""Condition sensitivity (``wan_animate.heldout``): swapping moves exactly the condition named, a
model that ignores a condition shows a zero gap for it, an oracle that reads a condition shows a
positive one; the tiny VAE keeps a skeleton's position in its latents."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wan_animate.heldout import CONDITIONS, condition_sensitivity, swap_condition, swap_partners
from wan_animate.objective import NUM_TRAIN_TIMESTEPS


def _batches(n: int = 3, t: int = 2, h: int = 4, w: int = 4, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        latents = torch.randn(1, 16, t + 1, h, w, generator=g)
        out.append({
            "latents": latents,
            "context": torch.randn(1, 5, 8, generator=g),
            "clip_fea": torch.randn(1, 7, 8, generator=g),
            "y": torch.randn(1, 20, t + 1, h, w, generator=g),
            # the pose latents carry the clean target: an oracle that reads them is exact
            "pose_latents": latents[:, :, 1:].clone(),
            "face_pixel_values": torch.randn(1, 3, 4 * (t - 1) + 1, 8, 8, generator=g),
        })
    return out


def pose_oracle(x, t, context, clip_fea, y, pose, face):
    """Velocity from x_t and the clean target read off the pose latents: exact with its own pose."""
    s = (t / NUM_TRAIN_TIMESTEPS).view(-1, 1, 1, 1, 1)
    pred = torch.zeros_like(x)
    pred[:, :, 1:] = (x[:, :, 1:] - (1 - s) * pose) / s - pose
    return pred


def reads(condition):
    """A model whose output depends on one condition only (through a fixed non-linear summary)."""
    def dit(x, t, context, clip_fea, y, pose, face):
        value = {"pose": pose, "face": face, "ref": torch.cat([clip_fea.flatten(1), y[:, :, 0].flatten(1),
                                                                x[:, :, 0].flatten(1)], 1)}[condition]
        return torch.zeros_like(x) + torch.tanh(value.flatten(1).sum(1)).view(-1, 1, 1, 1, 1)
    return dit


def test_swap_moves_exactly_the_named_condition():
    a, b = _batches(2)
    fields = ("latents", "context", "clip_fea", "y", "pose_latents", "face_pixel_values")
    moved = {c: swap_condition(a, b, c) for c in CONDITIONS}
    assert moved["pose"]["pose_latents"] is b["pose_latents"]
    assert moved["face"]["face_pixel_values"] is b["face_pixel_values"]
    ref = moved["ref"]
    assert torch.equal(ref["clip_fea"], b["clip_fea"])
    assert torch.equal(ref["y"][:, :, 0], b["y"][:, :, 0]) and torch.equal(ref["y"][:, :, 1:], a["y"][:, :, 1:])
    assert torch.equal(ref["latents"][:, :, 0], b["latents"][:, :, 0])
    assert torch.equal(ref["latents"][:, :, 1:], a["latents"][:, :, 1:])  # the scored target stays
    changed = {"pose": {"pose_latents"}, "face": {"face_pixel_values"}, "ref": {"clip_fea", "y", "latents"}}
    for c, batch in moved.items():
        for f in fields:
            assert torch.equal(batch[f], a[f]) == (f not in changed[c]), (c, f)
    assert torch.equal(a["y"], _batches(2)[0]["y"])  # the original batch is not modified
    with pytest.raises(ValueError, match="choose one of"):
        swap_condition(a, b, "background")


def test_animate2_swaps_its_driving_video_and_reference():
    """Wan-Animate-2's conditions (its family's ``conditions``): the driving stream (latents + CLIP of
    its first frame) and the reference; the loss runs the family's own forward."""
    from wan_animate.animate2.family import ANIMATE2

    g = torch.Generator().manual_seed(0)
    a, b = ({"latents": torch.randn(1, 16, 3, 4, 4, generator=g), "y": torch.randn(1, 20, 3, 4, 4, generator=g),
             "context": torch.randn(1, 5, 8, generator=g), "clip_fea": torch.randn(1, 7, 8, generator=g),
             "driving": torch.randn(1, 16, 2, 4, 4, generator=g), "context_ref": torch.randn(1, 5, 8, generator=g),
             "clip_ref": torch.randn(1, 7, 8, generator=g)} for _ in range(2))
    moved = swap_condition(a, b, "driving", ANIMATE2)
    assert moved["driving"] is b["driving"] and moved["clip_ref"] is b["clip_ref"]
    assert all(moved[k] is a[k] for k in ("latents", "y", "context", "clip_fea", "context_ref"))
    ref = swap_condition(a, b, "ref", ANIMATE2)
    assert ref["clip_fea"] is b["clip_fea"] and torch.equal(ref["y"][:, :, 0], b["y"][:, :, 0])
    assert ref["driving"] is a["driving"] and torch.equal(ref["latents"][:, :, 1:], a["latents"][:, :, 1:])
    with pytest.raises(ValueError, match="choose one of"):
        swap_condition(a, b, "pose", ANIMATE2)

    def reads_driving(x, t, context, clip_fea, y, driving, context_ref, clip_ref):  # Animate2DiT's signature
        return torch.zeros_like(x) + torch.tanh(driving.sum())

    out = condition_sensitivity(reads_driving, [a, b], timesteps=(500,), family=ANIMATE2)
    assert out["sensitivity_driving"] != 0.0 and out["sensitivity_ref"] == 0.0
    assert "sensitivity_pose" not in out


def test_partners_pair_samples_of_one_shape():
    batches = _batches(3) + _batches(1, h=8)
    assert swap_partners(batches) == [1, 2, 0, None]
    out = condition_sensitivity(reads("pose"), batches, timesteps=(500,))
    assert out["sensitivity_samples"] == 3 and out["sensitivity_unpaired"] == 1
    with pytest.raises(ValueError, match="at least two samples"):
        condition_sensitivity(reads("pose"), _batches(1))
    two = _batches(2)
    two[0] = {k: torch.cat([v, v]) for k, v in two[0].items()}
    with pytest.raises(ValueError, match="one-sample batches"):
        swap_partners(two)


def test_oracle_gap_is_positive_and_ignored_conditions_give_zero():
    out = condition_sensitivity(pose_oracle, _batches(4), timesteps=(200, 800), seed=3)
    assert out["sensitivity_own_loss"] < 1e-8
    assert out["sensitivity_pose"] > 1.0 and out["sensitivity_pose@t200"] > 0 and out["sensitivity_pose@t800"] > 0
    assert out["sensitivity_face"] == 0.0 and out["sensitivity_ref"] == 0.0
    assert out == condition_sensitivity(pose_oracle, _batches(4), timesteps=(200, 800), seed=3)  # pinned draws


@pytest.mark.parametrize("condition", CONDITIONS)
def test_each_condition_is_measured_alone(condition):
    out = condition_sensitivity(reads(condition), _batches(3), timesteps=(300, 700))
    for c in CONDITIONS:
        assert (out[f"sensitivity_{c}"] != 0.0) == (c == condition), (c, out)
        assert set(out) >= {f"sensitivity_{c}@t300", f"sensitivity_{c}@t700", f"sensitivity_{c}_ratio"}


def test_tiny_vae_latents_keep_where_a_limb_is():
    """The tiny VAE's latent at a cell changes when a 2-pixel line crosses that cell, and only in
    the quarter of the cell the line crosses (the pooling keeps 4x4-pixel quarters)."""
    from wan_animate.encoders import WanVAE
    from wan_animate.testing import build_tiny_vae

    vae = WanVAE(build_tiny_vae())
    blank = -torch.ones(1, 3, 1, 64, 64)
    line = blank.clone()
    line[:, :, :, 20:22, 8:16] = 1.0  # rows 20-21, columns 8-15: cell (2, 1), its lower quarters (rows 20-23)
    za, zb = vae.encode(blank), vae.encode(line)
    diff = (zb - za)[0, :12, 0].abs().reshape(4, 3, 8, 8).amax(1)  # [quarter, cell row, cell col]
    assert diff[:, 2, 1].amax() > 0.5  # the cell the line crosses
    # its lower quarters (the other two move < 2% of that: the encoder's output norm is near-linear)
    assert diff[2:, 2, 1].amin() > 1.0 and diff[:2, 2, 1].amax() < 0.02
    rest = diff.clone()
    rest[:, 2, 1] = 0
    assert rest.amax() < 1e-5  # no other cell moves
    decoded = vae.decode(zb)
    assert decoded.shape == (1, 3, 1, 64, 64)
    assert decoded[0, :, 0, 16:24, 8:16].mean() > decoded[0, :, 0, 40:48, 40:48].mean() + 0.05


def test_end_of_run_condition_gaps(tmp_path, fresh_accelerate_state):
    """The quick start's end-of-run gaps: the first clips of the training data (or of
    train.validation_urls) through the training recipe with its random choices off."""
    from conftest import make_tiny_assets
    from train.config import compose
    from train.data import resolve_urls
    from train.parallel import make_accelerator
    from train.trainer import Trainer
    from train.validation import condition_gaps

    (model,), data = make_tiny_assets(tmp_path, num_clips=3)
    # the clips' own size as the one bucket (data=shards' 720p-class buckets would upscale the 32x32
    # clips to 624x624 before the VAE: ~10 min of encoding on 2 cores for the same checks)
    bucket = ["data.buckets=[[32,32]]"]
    held = make_tiny_assets(tmp_path / "held", num_clips=2)[1]
    cfg = compose(["data=shards", f"data.urls=[{data}]", "data.clip_len=9", "data.num_workers=0", *bucket,
                   f"train.output_dir={tmp_path / 'run'}", f"model.path={model}"])
    trainer = Trainer(cfg, make_accelerator(cfg), Path(model), resolve_urls([str(data)]))
    gaps = condition_gaps(cfg, trainer.acc, trainer.pipe, trainer.raw_dit, trainer.urls, trainer.batch_dtype, 0)
    assert gaps["clips"] == "training clips" and gaps["sensitivity_samples"] == 3
    assert {f"sensitivity_{c}@t{t}" for c in CONDITIONS for t in (300, 600, 900)} <= set(gaps)
    cfg = compose(["data=shards", f"data.urls=[{data}]", "data.clip_len=9", "data.num_workers=0", *bucket,
                   f"train.output_dir={tmp_path / 'run'}", f"model.path={model}", f"train.validation_urls=[{held}]"])
    again = condition_gaps(cfg, trainer.acc, trainer.pipe, trainer.raw_dit, trainer.urls, trainer.batch_dtype, 0)
    assert again["clips"] == "validation clips" and again["sensitivity_samples"] == 2
    assert condition_gaps(cfg, trainer.acc, trainer.pipe, trainer.raw_dit, trainer.urls, trainer.batch_dtype, 3) is None
