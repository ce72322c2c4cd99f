"""``python -m data_tools.synthetic output=DIR [num_clips=8 clip_len=17 height=64 width=64 seed=0 driving=false]``:
the command that writes the synthetic set (the generator: ``data_tools.synthetic_data``).
"""

from __future__ import annotations

import json

from data_tools.config import SyntheticConfig
from data_tools.synthetic_data import make_synthetic_dataset


def _main(cfg: SyntheticConfig) -> None:
    out = make_synthetic_dataset(cfg.output, num_clips=cfg.num_clips, clip_len=cfg.clip_len, height=cfg.height,
                                 width=cfg.width, seed=cfg.seed, shard_size=cfg.shard_size,
                                 face_size=cfg.face_size, fps=cfg.fps, replace=cfg.replace, progress=True,
                                 driving=cfg.driving)
    m = json.loads((out / "manifest.json").read_text())
    print(f"wrote {m['counts']['samples']} samples in {m['counts']['shards']} shards to {out} ({m['seconds']} s)")


if __name__ == "__main__":
    from data_tools.config import run_hydra

    run_hydra("synthetic", SyntheticConfig, _main)
