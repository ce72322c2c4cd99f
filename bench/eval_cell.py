"""Seconds per eval cell and per metric (CPU by default; CUDA when available and --device cuda).

Builds a tiny random model, a synthetic self-reconstruction set, LPIPS weight files in the real
format (VGG16-width random weights by default, so LPIPS cost is close to the real net's) and a
tiny I3D TorchScript, then runs a few cells through ``eval.runner.run_cell`` (the code
``python eval/main.py`` runs) with every metric on, and prints seconds per cell and per sample for
generation and each metric. The first cell also pays pipeline loading; later cells reuse it.

    python bench/eval_cell.py --threads 1 --out bench/results/eval-cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # _eval_weights: the tiny LPIPS / I3D files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--frames", type=int, default=9, help="frames per clip (4n+1)")
    ap.add_argument("--size", type=int, default=128, help="frame height = width")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--lpips-width", type=int, default=64, help="64 = VGG16 channel widths (64..512)")
    ap.add_argument("--pose-backend", default="mediapipe")
    ap.add_argument("--out", default=None, help="append a markdown table to this file")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from data_tools.synthetic_data import make_synthetic_dataset
    from eval.config import EvalConfig, MetricsConfig
    from _eval_weights import save_tiny_i3d
    from _eval_weights import save_tiny_lpips_files
    from eval.runner import run_cell
    from wan_animate.testing import make_tiny_model_folder

    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    t0 = time.perf_counter()
    model = make_tiny_model_folder(tmp / "model")
    data = make_synthetic_dataset(tmp / "data", num_clips=a.samples, clip_len=a.frames, height=a.size,
                                  width=a.size, shard_size=a.samples)
    backbone, linear = save_tiny_lpips_files(tmp / "lpips", net="vgg", width=a.lpips_width)
    i3d = save_tiny_i3d(tmp / "i3d.pt")
    setup_s = time.perf_counter() - t0

    metrics = MetricsConfig(names=["psnr", "ssim", "lpips", "fvd", "flicker", "identity", "motion", "expression",
                                   "heldout"],
                            lpips_backbone=backbone, lpips_linear=linear, fvd_detector=i3d, fvd_clip_frames=0,
                            pose_backend=a.pose_backend)
    cells = [dict(guide_scale=1.0, seed=0), dict(guide_scale=1.0, seed=1), dict(guide_scale=2.0, seed=0)]
    records = []
    for i, overrides in enumerate(cells):
        cfg = EvalConfig(model_dir=str(model), eval_set=str(data), dtype="float32", device=a.device, steps=a.steps,
                         clip_len=a.frames, max_samples=a.samples, skip_finished=False, metrics=metrics, **overrides)
        rec = run_cell(cfg, tmp / "out" / f"cell{i}")
        if rec["status"] != "ok":
            raise SystemExit(f"cell {overrides} failed: {rec['error']}\n{rec.get('traceback', '')}")
        records.append((overrides, rec))

    names = ["generate", "psnr", "ssim", "lpips", "flicker", "identity", "keypoints", "motion", "expression",
             "write_video"]
    cmd = "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    lines = [
        "# eval cell benchmark", "",
        f"- device: {a.device} ({platform.machine()}, {a.threads} torch threads), torch {torch.__version__}",
        f"- command: `{cmd}`",
        f"- cells: tiny random model, {a.samples} synthetic clips of {a.frames} frames at {a.size}x{a.size}, "
        f"{a.steps} sampling steps; LPIPS VGG16 layout at width {a.lpips_width}; tiny I3D; pose backend "
        f"`{a.pose_backend}`", f"- setup (model folder, data, weight files): {setup_s:.2f} s",
        f"- 1-min load average before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores (other jobs share the machine: compare ratios within one run)", "",
        "## Seconds per cell", "",
        "| cell | total | load pipeline | load eval set | held-out loss | FVD |", "|---|---|---|---|---|---|",
    ]
    for ov, rec in records:
        s = rec["seconds"]
        lines.append(f"| {ov} | {rec['seconds_total']:.3f} | {s.get('load_pipeline', 0):.3f} | "
                     f"{s.get('load_eval_set', 0):.3f} | {s.get('heldout', 0):.3f} | {s.get('fvd', 0):.3f} |")
    lines += ["", "## Seconds per sample (mean over the cells)", "", "| step | s/sample | share of per-sample time |",
              "|---|---|---|"]
    per = {n: sum(rec["seconds_per_sample"].get(n, 0.0) for _, rec in records) / len(records) for n in names}
    total = sum(per.values()) or 1.0
    for n in names:
        lines.append(f"| {n} | {per[n]:.4f} | {100 * per[n] / total:.1f} % |")
    lines += ["", "Held-out loss is computed once per model (cells sharing weights reuse it: 0 s after the first).",
              ""]
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
