"""eval/main.py end to end on a tiny random model: a 2 x 2 sweep writes a report with every cell,
a rerun skips finished cells, a failing cell is reported while the others finish; cross-identity
pair folders; configuration errors are clear."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from data_tools.pose.format import PoseSequence

ROOT = Path(__file__).resolve().parents[1]


class BlobPoseBackend:
    """A deterministic stand-in for a pose backend (mediapipe finds nobody in 64 px cartoons):
    each keypoint is the intensity centroid of one horizontal band of the frame."""

    name = "blob"

    def extract(self, frames, **unused) -> PoseSequence:
        frames = np.asarray(frames, np.float32).mean(-1)  # [T, H, W]
        t, h, w = frames.shape

        def points(n, x0, x1):
            out = np.zeros((t, n, 3), np.float32)
            for j in range(n):
                y0, y1 = j * h // n, max(j * h // n + 1, (j + 1) * h // n)
                band = frames[:, y0:y1, int(x0 * w):int(x1 * w)] + 1e-3  # [T, b, cols]
                cols = np.arange(band.shape[-1]) + int(x0 * w)
                out[:, j, 0] = (band.sum(1) * cols).sum(-1) / band.sum((1, 2))
                out[:, j, 1] = (y0 + y1) / 2
                out[:, j, 2] = 1.0
            return out

        return PoseSequence(points(20, 0, 1), points(21, 0, 0.5), points(21, 0.5, 1), points(68, 0.2, 0.8), h, w)


def make_blob_backend(**unused):
    return BlobPoseBackend()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from data_tools.synthetic_data import make_synthetic_dataset
    from _eval_weights import save_tiny_i3d
    from _eval_weights import save_tiny_lpips_files
    from wan_animate.testing import make_tiny_model_folder

    root = tmp_path_factory.mktemp("eval_assets")
    model = make_tiny_model_folder(root / "model")
    data = make_synthetic_dataset(root / "data", num_clips=2, clip_len=5, height=64, width=64, shard_size=2)
    backbone, linear = save_tiny_lpips_files(root / "lpips", net="vgg")
    i3d = save_tiny_i3d(root / "i3d_torchscript.pt")
    return {"root": root, "model": model, "data": data, "lpips": (backbone, linear), "i3d": i3d}


def common_args(a, out) -> list[str]:
    return [
        f"model_dir={a['model']}", f"eval_set={a['data']}", f"out_dir={out}", "dtype=float32", "device=cpu",
        "steps=2", "clip_len=5", "max_samples=2",
        "metrics.names=[psnr,ssim,lpips,fvd,flicker,identity,motion,expression,heldout,sensitivity]",
        f"metrics.lpips_backbone={a['lpips'][0]}", f"metrics.lpips_linear={a['lpips'][1]}",
        f"metrics.fvd_detector={a['i3d']}", "metrics.fvd_clip_frames=0",
        "metrics.pose_backend=test_eval_sweep:make_blob_backend",
    ]


def run_main(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HYDRA_FULL_ERROR="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(ROOT / "eval" / "main.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


class SelfContained(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.external, self.tags = 0, [], set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.images += 1
            if not attrs.get("src", "").startswith("data:image/png;base64,"):
                self.external.append(attrs.get("src"))
        if tag in ("script", "link", "iframe") or (tag != "img" and attrs.get("src")):
            self.external.append(f"<{tag}>")


@pytest.mark.slow  # whole suite only: a training run or a sweep (> 20 s on 2 cores)
def test_sweep_report_rerun_and_failing_cell(assets):
    out = assets["root"] / "sweep"
    r = run_main(["-m", *common_args(assets, out), "guide_scale=1,2", "seed=0,1"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cells = sorted(p.parent for p in out.glob("*/metrics.json"))
    assert len(cells) == 4
    records = [json.loads((c / "metrics.json").read_text()) for c in cells]
    assert all(rec["status"] == "ok" for rec in records), [rec.get("error") for rec in records]
    for c, rec in zip(cells, records):
        assert len(list((c / "videos").glob("*.mp4"))) == 2 and len(list((c / "frames").glob("*.png"))) == 2
        m = rec["metrics"]
        for k in ("psnr", "ssim", "lpips", "fvd", "flicker", "temporal_error", "identity", "body_error",
                  "body_pck@0.05", "hands_pck@0.1", "face_nme", "heldout_loss", "sensitivity_pose",
                  "sensitivity_ref"):
            assert k in m and m[k] is not None and np.isfinite(m[k]), (k, m.get(k))
        assert rec["not_computed"] == {}
        assert rec["seconds_per_sample"]["generate"] > 0
    # Different seeds / guide scales really generate different videos.
    assert len({round(rec["metrics"]["psnr"], 6) for rec in records}) == 4

    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and {(x["params"]["guide_scale"], x["params"]["seed"]) for x in lines} == {
        ("1", "0"), ("1", "1"), ("2", "0"), ("2", "1")}
    md = (out / "report.md").read_text()
    assert "4 cells: 4 ok, 0 failed" in md and "swept: guide_scale, seed" in md
    page = (out / "report.html").read_text()
    parser = SelfContained()
    parser.feed(page)
    assert parser.external == [] and "table" in parser.tags
    assert parser.images == 2 + 4 * 2  # one plot per swept value + 2 frame strips per cell
    for rec in records:
        assert rec["cell"] in page
        assert set(rec["cell"].split(",")) == {"clip_len=5", "dtype=float32", "max_samples=2", "steps=2",
                                               f"guide_scale={rec['config']['guide_scale']:g}",
                                               f"seed={rec['config']['seed']}"}

    # Rerun with one more guide scale, which is invalid (< 1): the 4 finished cells are skipped and
    # not rewritten, the 2 new cells fail with a clear error, the report lists them, exit status 1.
    mtimes = [(c / "metrics.json").stat().st_mtime_ns for c in cells]
    r = run_main(["-m", *common_args(assets, out), "guide_scale=1,2,0.5", "seed=0,1"])
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("skipped (finished before)") == 4
    assert "6 cells: 4 ok (4 cached), 2 failed" in r.stdout
    assert [(c / "metrics.json").stat().st_mtime_ns for c in cells] == mtimes
    records = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/metrics.json")}
    failed = [rec for rec in records.values() if rec["status"] == "failed"]
    assert len(records) == 6 and len(failed) == 2
    assert all("guide_scale=0.5" in rec["error"] and "must be >= 1" in rec["error"] for rec in failed)
    md = (out / "report.md").read_text()
    assert "6 cells: 4 ok, 2 failed" in md and "## Failed cells" in md and "guide_scale=0.5" in md

    # Every JSON file the sweep wrote is strict (no NaN / Infinity).
    from test_eval_report import strict_json_files

    written = strict_json_files(out)
    assert {p.name for p in written} >= {"metrics.json", "results.jsonl"} and len(written) >= 7

    # The report can be rebuilt by hand.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "eval.report", str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and '"failed": 2' in r.stdout, r.stderr[-2000:]
