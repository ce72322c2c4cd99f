"""Data stream: rank splitting, resumable position, buckets, bad samples skipped + counted, the
flow-matching loss's definition."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch

from train.config import DataConfig
from train.data import BatchIterator, StreamSpec
from train.data import resolve_urls
from wan_animate.geometry import nearest_bucket
from wan_animate.objective import LossConfig, add_noise, flow_matching_loss, sample_timesteps, shift_sigma


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data_tools.synthetic_data import make_synthetic_dataset

    out = tmp_path_factory.mktemp("syn")
    return make_synthetic_dataset(out, num_clips=6, clip_len=9, height=32, width=32, seed=0, shard_size=3,
                                  face_size=32)


def _spec(urls, rank=0, world=1, **kw):
    cfg = DataConfig(source="shards", urls=[str(u) for u in urls], clip_len=5, refert_nums=[1], shuffle_buffer=3, **kw)
    return StreamSpec(urls=resolve_urls(cfg.urls), cfg=cfg, micro_batch_size=1, seed=3, rank=rank,
                      world_size=world, face_size=32)


def _keys(it, n):
    return [next(it)[0]["key"] for _ in range(n)]


def test_ranks_get_different_samples_every_step(shards):
    a = _keys(BatchIterator(_spec([shards], 0, 2)), 6)
    b = _keys(BatchIterator(_spec([shards], 1, 2)), 6)
    assert all(x != y for x, y in zip(a, b))
    assert set(a[:3]).isdisjoint(b[:3])  # one epoch: the two ranks split the 6 clips


def test_resume_position_reproduces_the_stream(shards):
    spec = _spec([shards])
    straight = BatchIterator(spec)
    seq = [next(straight)[0] for _ in range(7)]
    resumed = BatchIterator(spec, start_batch=4)
    rest = [next(resumed)[0] for _ in range(3)]
    for x, y in zip(seq[4:], rest):
        assert x["key"] == y["key"] and x["num_given"] == y["num_given"] and x["caption"] == y["caption"]
        assert torch.equal(x["video"], y["video"]) and torch.equal(x["face"], y["face"])
    assert resumed.state_dict()["position"] == 7


def test_bad_samples_are_skipped_and_counted(shards, tmp_path):
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for key in ("broken0", "broken1"):
            for field, data in (("mp4", b"not a video"), ("pose.mp4", b"x"), ("face.mp4", b"x"),
                                ("ref.png", b"x"), ("json", b'{"schema_version": 1, "height": 32, "width": 32}')):
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    it = BatchIterator(_spec([bad, *sorted(Path(shards).glob("*.tar"))], max_skipped_fraction=0.9))
    got = _keys(it, 8)
    assert not any(k.startswith("broken") for k in got)
    assert it.skipped >= 2 and it.recent_errors


def test_buckets_pick_nearest_aspect():
    buckets = [(720, 1280), (1280, 720), (624, 624)]
    assert nearest_bucket(1080, 1920, buckets) == (720, 1280)
    assert nearest_bucket(1920, 1080, buckets) == (1280, 720)
    assert nearest_bucket(500, 520, buckets) == (624, 624)


def test_bucketed_batches_have_the_bucket_size(shards):
    spec = _spec([shards], buckets=[[32, 64], [48, 48]])
    ex = next(BatchIterator(spec))[0]
    assert tuple(ex["video"].shape[-2:]) == (48, 48)  # square source -> square bucket, upscaled
    assert tuple(ex["pose"].shape[-2:]) == (48, 48) and tuple(ex["ref"].shape[-2:]) == (48, 48)
    assert ex["face_region"].shape == (2, 6, 6) and ex["face_region"].sum() > 0


def test_face_region_maps_pixel_boxes_to_latent_cells():
    from train.data import face_region_map

    # 64 x 128 source -> 32 x 32 bucket: scale 0.5, resized to 32 x 64, 16 px cropped off the left.
    # Box x 40..56, y 16..40 -> bucket x 4..12, y 8..20 -> latent (/8) cols 0.5..1.5, rows 1..2.5
    # -> cells cols {0, 1}, rows {1, 2}. clip_len 9 -> latent frames {0}, {1..4}, {5..8}.
    boxes = [None] * 20
    boxes[3 + 4] = [40, 16, 56, 40]  # pixel frame 4 of a clip starting at source frame 3
    region = face_region_map(boxes, 3, 9, (64, 128), (32, 32))
    assert region.shape == (3, 4, 4)
    want = torch.zeros(3, 4, 4)
    want[1, 1:3, 0:2] = 1
    assert torch.equal(region, want)
    boxes[3] = [40, 16, 56, 40]  # pixel frame 0 alone fills latent frame 0
    assert torch.equal(face_region_map(boxes, 3, 9, (64, 128), (32, 32))[0], want[1])


def test_flow_matching_definition():
    cfg = LossConfig(shift=5.0)
    s = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(shift_sigma(s, 5.0), torch.tensor([0.0, 5 / 6, 1.0]))
    t = sample_timesteps(4096, cfg, generator=torch.Generator().manual_seed(0))
    assert 0 <= t.min() and t.max() <= 1000 and t.float().median() > 700  # shift 5 favours noise
    x0, eps = torch.randn(1, 16, 3, 2, 2), torch.randn(1, 16, 3, 2, 2)
    assert torch.allclose(add_noise(x0, eps, torch.tensor([250.0])), 0.75 * x0 + 0.25 * eps)

    seen = {}

    def oracle(x, tt, context, clip, y, pose, face):  # predicts eps - x0 exactly on target slots
        seen["x"] = x
        v = eps - x0
        v = v.clone()
        v[:, :, 0] = 123.0  # the reference slot is ignored by the loss
        return v

    batch = dict(latents=x0, context=torch.zeros(1), clip_fea=torch.zeros(1), y=torch.zeros(1, 20, 3, 2, 2),
                 pose_latents=torch.zeros(1), face_pixel_values=torch.zeros(1))
    out = flow_matching_loss(oracle, batch, cfg, timesteps=torch.tensor([400.0]), noise=eps)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-10)
    assert torch.allclose(seen["x"], 0.6 * x0 + 0.4 * eps)
    wrong = flow_matching_loss(lambda *a: x0 - eps, batch, cfg, timesteps=torch.tensor([400.0]), noise=eps)
    assert wrong.loss.item() > 1.0  # negative control: the opposite sign is far off

    region = torch.zeros(1, 2, 2, 2)
    region[..., 0, 0] = 1
    face_cfg = LossConfig(face_weight=10.0)
    pred = eps - x0
    pred = pred.clone()
    pred[:, :, 1:, 0, 0] += 1.0  # error only inside the face region
    up = flow_matching_loss(lambda *a: pred, {**batch, "face_region": region}, face_cfg,
                            timesteps=torch.tensor([400.0]), noise=eps).loss
    flat = flow_matching_loss(lambda *a: pred, batch, face_cfg, timesteps=torch.tensor([400.0]), noise=eps).loss
    assert up > 3 * flat


def test_pipe_urls_stream_like_local_files(shards):
    files = sorted(Path(shards).glob("*.tar"))
    local = BatchIterator(_spec(files))
    piped = BatchIterator(_spec([f"pipe:cat {f}" for f in files]))
    assert _keys(local, 4) == _keys(piped, 4)


def test_worker_round_robin_resume(shards):
    """With 2 loader workers the stream interleaves them; resuming at batch 3 continues it exactly."""
    spec = _spec([shards], num_workers=2)
    straight = _keys(BatchIterator(spec), 7)
    for start in (3, 4, 5):
        assert _keys(BatchIterator(spec, start_batch=start), 7 - start) == straight[start:], start
    assert len(set(straight[:6])) >= 3  # workers read different shards (not one stream twice)
    assert _keys(BatchIterator(spec), 7) == straight  # deterministic across runs
