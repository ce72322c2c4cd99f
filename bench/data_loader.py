"""Samples/s of the training loader (train.data) on raw vs cached shards, CPU.

    python bench/data_loader.py [--clips 16] [--frames 17] [--size 64] [--batches 32] [--out FILE.md]

Writes a synthetic raw set, caches it with a tiny random model folder (data_tools.cache_latents),
then times `train.data.BatchIterator` over both. The cached path skips video decoding of the
target/pose/reference streams (it still decodes the face video), so the ratio is what matters.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import command_line, write_report


def time_loader(urls, source, clip_len, size, batches, face_size):
    from train.config import DataConfig
    from train.data import BatchIterator, StreamSpec
    from train.data import resolve_urls

    urls = resolve_urls([str(u) for u in urls])
    cfg = DataConfig(source=source, urls=[str(u) for u in urls], clip_len=clip_len, refert_nums=[1],
                     shuffle_buffer=0, num_workers=0)
    spec = StreamSpec(urls=urls, cfg=cfg, micro_batch_size=1, seed=0, face_size=face_size,
                      default_size=(size, size))
    it = BatchIterator(spec)
    next(it)  # warm-up (imports, text embeds)
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(next(it))
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cmd = command_line(__file__)
    torch.set_num_threads(1)

    from data_tools.cache_latents import cache_latents
    from data_tools.config import CacheLatentsConfig
    from data_tools.synthetic_data import make_synthetic_dataset
    from wan_animate.testing import make_tiny_model_folder

    tmp = Path(tempfile.mkdtemp())
    raw = make_synthetic_dataset(tmp / "raw", num_clips=args.clips, clip_len=args.frames, height=args.size,
                                 width=args.size, face_size=32, shard_size=4)
    model = make_tiny_model_folder(tmp / "model")
    t = time.perf_counter()
    cache_latents(CacheLatentsConfig(input=str(raw), output=str(tmp / "cached"), model=str(model), device="cpu",
                                     refert_nums=[0, 1]), progress=False)
    cache_s = time.perf_counter() - t
    raw_sps = time_loader([raw], "shards", args.frames, args.size, args.batches, 32)
    cached_sps = time_loader([tmp / "cached"], "cached", args.frames, args.size, args.batches, 32)
    lines = [
        "# Training loader on CPU: raw vs cached shards", "",
        f"- command: `{cmd}`",
        f"- device: CPU only ({os.cpu_count()} cores), torch threads 1, loader workers 0, micro-batch 1; "
        f"load average {os.getloadavg()[0]:.1f} (shared machine)",
        f"- data: {args.clips} synthetic clips, {args.frames} frames of {args.size}x{args.size}, faces 32x32; "
        f"cached with a tiny random model folder ({cache_s:.1f} s for the whole set)", "",
        "| shards | samples/s |", "|---|---|",
        f"| raw (decode_sample: 3 videos + png) | {raw_sps:.1f} |",
        f"| cached (decode_cached_sample: safetensors + face video) | {cached_sps:.1f} |",
        f"| ratio cached / raw | {cached_sps / raw_sps:.2f}x |",
    ]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
