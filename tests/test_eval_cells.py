"""eval cells in-process: checkpoint loading changes (only) what it should, the held-out loss is
deterministic, cross-identity pair folders, bad samples skipped and counted, clear config errors."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from eval.config import EvalConfig, MetricsConfig
from eval.data import load_eval_set
from eval.resources import clear_cache, resolve_checkpoint
from eval.runner import run_cell
from wan_animate.video_io import write_video

# Every cell here samples videos with the tiny model (~110 CPU s for the file on 2 cores): whole suite only.
pytestmark = pytest.mark.slow

BLOB = "test_eval_sweep:make_blob_backend"  # deterministic stand-in pose backend (tests/ is on sys.path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from data_tools.synthetic_data import make_synthetic_dataset
    from wan_animate.testing import make_tiny_model_folder

    root = tmp_path_factory.mktemp("eval_cells")
    return {
        "root": root,
        "model": make_tiny_model_folder(root / "model"),
        "other": make_tiny_model_folder(root / "other", seed=1),
        "data": make_synthetic_dataset(root / "data", num_clips=2, clip_len=5, height=64, width=64, shard_size=2),
    }


def cfg_for(a, **kw) -> EvalConfig:
    metrics = kw.pop("metrics", MetricsConfig(names=["psnr", "ssim", "flicker", "heldout"]))
    base = dict(model_dir=str(a["model"]), eval_set=str(a["data"]), dtype="float32", device="cpu", steps=2,
                clip_len=5, max_samples=2, skip_finished=False, metrics=metrics)
    base.update(kw)
    return EvalConfig(**base)


def test_checkpoint_replaces_the_dit(assets, tmp_path):
    base = run_cell(cfg_for(assets), tmp_path / "base")
    same = run_cell(cfg_for(assets, checkpoint=str(assets["model"] / "transformer")), tmp_path / "same")
    other = run_cell(cfg_for(assets, checkpoint=str(assets["other"] / "transformer")), tmp_path / "other")
    assert base["status"] == same["status"] == other["status"] == "ok", other.get("traceback")
    # The same weights through the checkpoint path give the very same videos and losses.
    assert same["metrics"] == base["metrics"]
    assert other["metrics"]["psnr"] != base["metrics"]["psnr"]
    assert other["metrics"]["heldout_loss"] != base["metrics"]["heldout_loss"]
    # Held-out loss: deterministic across runs (recomputed from scratch, nothing cached).
    clear_cache()
    again = run_cell(cfg_for(assets), tmp_path / "again")
    assert again["metrics"]["heldout_loss"] == base["metrics"]["heldout_loss"]
    assert set(base["metrics"]) >= {"heldout_loss@t100", "heldout_loss@t900"}


def test_training_checkpoint_folder_without_config(assets, tmp_path):
    """checkpoints/step-N/model.safetensors (accelerate state, no config inside) loads with the
    base model's config and equals the same weights loaded from a folder with config.json."""
    from safetensors.torch import save_file

    from wan_animate.weights.load import load_dit

    step = tmp_path / "checkpoints" / "step-7"
    step.mkdir(parents=True)
    dit = load_dit(assets["other"] / "transformer", dtype=None)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(step / "model.safetensors"))
    (step / "optimizer.bin").write_bytes(b"")
    assert resolve_checkpoint(str(step)) == str(step / "model.safetensors")
    metrics = MetricsConfig(names=["psnr"])
    a = run_cell(cfg_for(assets, checkpoint=str(step), metrics=metrics), tmp_path / "a")
    b = run_cell(cfg_for(assets, checkpoint=str(assets["other"] / "transformer"), metrics=metrics), tmp_path / "b")
    assert a["status"] == b["status"] == "ok", a.get("traceback")
    assert a["metrics"] == b["metrics"]


def test_missing_checkpoint_fails_the_cell_with_a_clear_error(assets, tmp_path):
    rec = run_cell(cfg_for(assets, checkpoint=str(tmp_path / "nope")), tmp_path / "cell")
    assert rec["status"] == "failed" and "does not exist" in rec["error"]
    assert json.loads((tmp_path / "cell" / "metrics.json").read_text())["status"] == "failed"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no DiT weights found"):
        resolve_checkpoint(str(tmp_path / "junk"))


def make_pairs(assets, dst):
    """Cross-identity pairs: sample 0's reference animated with sample 1's driving streams."""
    es = load_eval_set(assets["data"])
    a, b = es.samples
    good = dst / "pair_good"
    good.mkdir(parents=True)
    Image.fromarray(a.ref).save(good / "src_ref.png")
    write_video(good / "src_pose.mp4", b.pose, 30)
    write_video(good / "src_face.mp4", b.face, 30)
    write_video(good / "driving.mp4", b.target, 30)
    broken = dst / "pair_broken"
    broken.mkdir()
    Image.fromarray(a.ref).save(broken / "ref.png")  # an image but no video
    return dst


def test_cross_identity_pairs(assets, tmp_path):
    pairs = make_pairs(assets, tmp_path / "pairs")
    metrics = MetricsConfig(names=["psnr", "identity", "motion", "expression", "flicker"], pose_backend=BLOB)
    rec = run_cell(cfg_for(assets, eval_set=str(pairs), metrics=metrics), tmp_path / "cell")
    assert rec["status"] == "ok", rec.get("traceback")
    assert rec["eval_set"]["kind"] == "pairs" and rec["eval_set"]["samples"] == 1
    assert [s["key"] for s in rec["eval_set"]["skipped"]] == ["pair_broken"]
    assert "one image and one video" in rec["eval_set"]["skipped"][0]["reason"]
    assert "ground truth" in rec["not_computed"]["psnr"] and "not requested" in rec["not_computed"]["lpips"]
    m = rec["metrics"]
    for k in ("identity", "body_error", "body_pck@0.1", "hands_error", "face_nme", "flicker"):
        assert m[k] is not None and np.isfinite(m[k]), k
    assert "temporal_error" not in m  # needs ground truth


def test_raw_pair_goes_through_preprocess_driving(assets, tmp_path):
    """A raw (image, video) pair is preprocessed by data_tools.preprocess_driving (cached under
    OUT_DIR/_preprocessed); stored keypoints (the pose the model was driven with) can be the
    driving side of the motion metrics."""
    es = load_eval_set(assets["data"])
    a, b = es.samples
    raw = tmp_path / "pairs" / "raw_pair"
    raw.mkdir(parents=True)
    Image.fromarray(a.ref).save(raw / "reference.png")
    write_video(raw / "dance.mp4", b.target, 30)
    b.stored_keypoints.save_npz(tmp_path / "dance_keypoints.npz")
    preprocess = {"target_area": 64 * 64, "face_size": 64, "pose_backend": "precomputed",
                  "pose_options": {"path": str(tmp_path / "dance_keypoints.npz")}}
    metrics = MetricsConfig(names=["identity", "motion"], pose_backend=BLOB, driving_keypoints="stored")
    out = tmp_path / "out"
    rec = run_cell(cfg_for(assets, eval_set=str(tmp_path / "pairs"), metrics=metrics, preprocess=preprocess,
                       out_dir=str(out)), out / "cell")
    assert rec["status"] == "ok", rec.get("traceback")
    assert rec["eval_set"] == {"kind": "pairs", "samples": 1, "skipped": []}
    cached = out / "_preprocessed" / "raw_pair"
    assert {p.name for p in cached.iterdir()} >= {"src_ref.png", "src_pose.mp4", "src_face.mp4", "driving.mp4"}
    driving = load_eval_set(tmp_path / "pairs", cache_dir=out / "_preprocessed").samples[0].driving
    assert driving.shape == b.target.shape  # same size: target_area kept 64 x 64
    assert np.isfinite(rec["metrics"]["body_error"]) and rec["metrics"]["body_points"] > 0


def test_corrupt_shard_sample_is_skipped_and_counted(assets, tmp_path):
    src = sorted(assets["data"].glob("shard-*.tar"))[0]
    dst = tmp_path / "data"
    dst.mkdir()
    shutil.copy(src, dst / src.name)
    with tarfile.open(dst / "shard-000001.tar", "w") as tar:
        for name, data in (("aaa_broken.json", json.dumps({"schema_version": 1}).encode()),
                           ("aaa_broken.mp4", b"not a video"), ("aaa_broken.pose.mp4", b"x"),
                           ("aaa_broken.face.mp4", b"x"), ("aaa_broken.ref.png", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    es = load_eval_set(dst)
    assert len(es.samples) == 2 and [s["key"] for s in es.skipped] == ["aaa_broken"]
    assert "does not decode" in es.skipped[0]["reason"]


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="metrics.lpips_backbone"):
        MetricsConfig(names=["lpips"])
    with pytest.raises(ValueError, match="fvd_detector"):
        MetricsConfig(names=["fvd"])
    with pytest.raises(ValueError, match="unknown metrics"):
        MetricsConfig(names=["psnr", "fid"])
    ok = dict(model_dir="m", eval_set="e")
    with pytest.raises(ValueError, match="4n\\+1"):
        EvalConfig(**ok, max_frames=6)
    with pytest.raises(ValueError, match="solver"):
        EvalConfig(**ok, solver="ddim")
    with pytest.raises(ValueError, match="model_dir is required"):
        EvalConfig(eval_set="e")


def test_replace_mode(assets, tmp_path):
    from data_tools.synthetic_data import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "replace", num_clips=1, clip_len=5, height=64, width=64, replace=True)
    metrics = MetricsConfig(names=["psnr"])
    rec = run_cell(cfg_for(assets, eval_set=str(data), mode="replace", metrics=metrics), tmp_path / "cell")
    assert rec["status"] == "ok", rec.get("traceback")
    # Replace mode conditions on the background video, so its output differs from animate mode.
    animate = run_cell(cfg_for(assets, eval_set=str(data), metrics=metrics), tmp_path / "animate")
    assert rec["metrics"]["psnr"] != animate["metrics"]["psnr"]
    bad = run_cell(cfg_for(assets, mode="replace", metrics=metrics), tmp_path / "bad")
    assert bad["status"] == "failed" and "no bg/mask streams" in bad["error"]


def test_loss_metrics_generate_no_video(assets, tmp_path, monkeypatch):
    """heldout / sensitivity alone never run the sampler and write no video; sensitivity reports
    every condition at every timestep, on the same samples and draws as the held-out loss."""
    import eval.runner

    def no_sampler(*a, **k):
        raise AssertionError("the sampler ran for a loss-only cell")

    monkeypatch.setattr(eval.runner, "generate", no_sampler)
    rec = run_cell(cfg_for(assets, metrics=MetricsConfig(names=["heldout", "sensitivity"])), tmp_path / "loss")
    assert rec["status"] == "ok", rec.get("traceback")
    assert rec["generated_videos"] is False
    assert not (tmp_path / "loss" / "videos").exists() and not (tmp_path / "loss" / "frames").exists()
    m = rec["metrics"]
    for c in ("pose", "face", "ref"):
        assert {f"sensitivity_{c}", f"sensitivity_{c}_ratio"} | {f"sensitivity_{c}@t{t}" for t in (100, 300, 500, 700, 900)} <= set(m)
    assert m["sensitivity_samples"] == 2 and m["sensitivity_own_loss"] > 0
    # the own loss of the paired samples is the held-out loss of the same two samples
    assert m["sensitivity_own_loss"] == pytest.approx(m["heldout_loss"], rel=1e-6)
    one = run_cell(cfg_for(assets, max_samples=1, metrics=MetricsConfig(names=["sensitivity"])), tmp_path / "one")
    assert one["status"] == "ok" and "at least two samples" in one["not_computed"]["sensitivity"]
    with pytest.raises(ValueError, match="sensitivity_conditions"):
        MetricsConfig(names=["sensitivity"], sensitivity_conditions=["pose", "hands"])
