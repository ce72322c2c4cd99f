"""Frame-accurate random access: decord vs PyAV on a real clip (is decord the better tool?).

    python bench/video_decode.py [--video tests/fixtures/wan_examples/replace/video.mp4] [--repeats 5]

Cases (fastest of ``--repeats`` runs: wall seconds, and CPU seconds of the whole process, all
threads, which a busy shared machine distorts far less than wall time):
* ``all``: decode every frame;
* ``window``: 17 contiguous frames at a random start (what a training loader takes from a clip);
* ``scatter``: 8 random frame indices anywhere in the clip;
and the same on a shard-like in-memory clip (77 frames 832x480 H.264 from ``encode_video_bytes``, the
loader's path: bytes of a tar member). Frame accuracy: every frame a reader returns is compared with
the sequential PyAV decode of the same index (max |difference| in uint8; 0 or colour-conversion noise
means the right frame, large means a wrong frame).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench scripts run from a checkout

from bench.common import SAMPLE_VIDEO
from wan_animate.video_io import encode_video_bytes, read_video  # noqa: E402


def pyav_frames(source, indices, threads: bool) -> np.ndarray:
    """Decode forward from the start (these clips have one keyframe), keep ``indices``, stop after the last."""
    import av

    want = sorted(set(int(i) for i in indices))
    container = av.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    stream = container.streams.video[0]
    if threads:
        stream.thread_type = "AUTO"
    got, k = {}, 0
    for frame in container.decode(stream):
        if k in want:
            got[k] = frame.to_ndarray(format="rgb24")
        k += 1
        if k > want[-1]:
            break
    container.close()
    return np.stack([got[i] for i in indices])


def decord_frames(source, indices) -> np.ndarray:
    import decord

    vr = decord.VideoReader(io.BytesIO(source) if isinstance(source, bytes) else source, ctx=decord.cpu(0))
    return vr.get_batch(list(indices)).asnumpy()


def _time(fn, repeats):
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus), out


def run(name, source, n, reference, repeats, rng):
    rows = []
    cases = {"all": lambda: np.arange(n)}
    start = int(rng.integers(0, n - 17))
    cases["window"] = lambda: np.arange(start, start + 17)
    scatter = np.sort(rng.choice(n, 8, replace=False))
    cases["scatter"] = lambda: scatter
    for case, idx_fn in cases.items():
        idx = idx_fn()
        for reader, fn in (("pyav", lambda: pyav_frames(source, idx, False)),
                           ("pyav-threads", lambda: pyav_frames(source, idx, True)),
                           ("decord", lambda: decord_frames(source, idx))):
            sec, cpu, frames = _time(fn, repeats)
            err = int(np.abs(frames.astype(np.int16) - reference[idx].astype(np.int16)).max())
            rows.append((name, case, len(idx), reader, sec, cpu, err))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--video", default=str(SAMPLE_VIDEO))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    real_ref, fps = read_video(args.video)
    rows = run(f"real {real_ref.shape[2]}x{real_ref.shape[1]} {len(real_ref)}f", args.video, len(real_ref),
               real_ref, args.repeats, rng)
    from wan_animate.geometry import ResizePlan

    plan = ResizePlan(real_ref.shape[1], real_ref.shape[2], 480, 832, "crop")
    clip = plan.apply_all(np.concatenate([real_ref, real_ref[::-1]])[:77])
    blob = encode_video_bytes(clip, fps)
    shard_ref, _ = read_video(blob)
    rows += run("shard 832x480 77f (bytes)", blob, len(shard_ref), shard_ref, args.repeats, rng)
    print(f"# python bench/video_decode.py --video {args.video} --repeats {args.repeats}")
    print(f"# 1-minute load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| clip | case | frames | reader | wall s (min) | CPU s (min) | max abs diff vs PyAV sequential |")
    print("|---|---|---|---|---|---|---|")
    for name, case, k, reader, sec, cpu, err in rows:
        print(f"| {name} | {case} | {k} | {reader} | {sec:.3f} | {cpu:.3f} | {err} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
