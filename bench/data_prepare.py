"""Frames/s of the data preparation stages on CPU: decode, pose (mediapipe), render, face crop, write.

    python bench/data_prepare.py [--video V] [--frames 66] [--area 61440] [--max-side 384 640] [--out FILE.md]

Measures each stage on the same frames of a real clip, then a whole `prepare` job
(decode + pose + render + crops + encode + shard write) in one process, and prints a markdown
table with the command that made it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SAMPLE_VIDEO, command_line, write_report
from data_tools.config import PrepareConfig  # noqa: E402
from data_tools.pose import crop_faces, get_pose_backend, render_pose  # noqa: E402
from data_tools.prepare import prepare  # noqa: E402
from wan_animate.geometry import ResizePlan, area_bucket  # noqa: E402
from data_tools.shards import encode_sample  # noqa: E402
from wan_animate.video_io import read_video  # noqa: E402


def timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--video", default=str(SAMPLE_VIDEO))
    ap.add_argument("--frames", type=int, default=66)
    ap.add_argument("--area", type=int, default=320 * 192, help="target area of the clips (pixels)")
    ap.add_argument("--max-side", type=int, nargs="+", default=[384, 640], help="mediapipe input sizes to time")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args()
    cmd = command_line(__file__)

    (frames, fps), t_dec = timed(read_video, args.video, max_frames=args.frames)
    n = len(frames)
    src_h, src_w = frames.shape[1:3]
    h, w = area_bucket(src_h, src_w, args.area)
    plan = ResizePlan(src_h, src_w, h, w)
    rows = [("decode (PyAV, %dx%d)" % (src_w, src_h), n / t_dec)]
    pose = None
    for ms in args.max_side:
        backend = get_pose_backend("mediapipe", max_side=ms)
        backend.extract(frames[:2])  # warm-up
        pose, t = timed(backend.extract, frames)
        rows.append((f"pose: mediapipe holistic, max_side {ms}", n / t))
    target, t_rs = timed(plan.apply_all, frames)
    rows.append((f"resize to {w}x{h}", n / t_rs))
    pose_t = plan.pose(pose)
    rendered, t_r = timed(render_pose, pose_t, h, w)
    rows.append((f"render pose video {w}x{h}", n / t_r))
    (face, boxes), t_f = timed(crop_faces, frames, pose, 512)
    rows.append(("face boxes + 512x512 crops", n / t_f))
    meta = {"keypoints": pose_t.to_dict(), "face_boxes": boxes.tolist(), "frame_indices": list(range(n))}
    _, t_w = timed(encode_sample, "bench", target=target, pose=rendered, face=face, ref=target[0], meta=meta,
                   caption="c", fps=fps)
    rows.append(("encode sample (3 x H.264 + png + json)", n / t_w))

    tmp = Path(tempfile.mkdtemp())
    clip_len = 33
    clips = max(n // clip_len, 1)
    cfg = PrepareConfig(input=args.video, output=str(tmp / "out"), clip_len=clip_len, target_area=args.area,
                        max_clips_per_video=clips, workers=0, shard_size=4,
                        pose_options={"max_side": args.max_side[0]})
    m, t_all = timed(prepare, cfg, progress=False)
    shutil.rmtree(tmp, ignore_errors=True)
    frames_written = m["stats"]["frames"]
    rows.append((f"prepare end to end ({clips} clips x {clip_len} frames, workers=0, max_side "
                 f"{args.max_side[0]}; incl. model load)", frames_written / t_all))

    load = os.getloadavg()[0]
    lines = [
        "# data_tools on CPU: frames/s per stage", "",
        f"- command: `{cmd}`",
        f"- device: CPU only ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), "
        f"load average {load:.1f} at the end (the machine is shared, so figures are indicative)",
        f"- input: {Path(args.video).name}, {n} frames of {src_w}x{src_h}; clips at {w}x{h}", "",
        "| stage | frames/s |", "|---|---|",
    ] + [f"| {name} | {v:.1f} |" for name, v in rows]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
