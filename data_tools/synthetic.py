"""``python -m data_tools.synthetic output=DIR [num_clips=8 clip_len=17 height=64 width=64 seed=0 driving=false]``:
the command that writes the synthetic set (the generator: ``data_tools.synthetic_data``).
"""

from __future__ import annotations

import json
from dataclasses import asdict

from data_tools.config import SyntheticConfig
from data_tools.synthetic_data import make_synthetic_dataset


def _main(cfg: SyntheticConfig) -> None:
    options = {k: v for k, v in asdict(cfg).items() if k != "output"}  # every other field is an option of the generator
    out = make_synthetic_dataset(cfg.output, progress=True, **options)
    m = json.loads((out / "manifest.json").read_text())
    print(f"wrote {m['counts']['samples']} samples in {m['counts']['shards']} shards to {out} ({m['seconds']} s)")


if __name__ == "__main__":
    from data_tools.config import run_hydra

    run_hydra("synthetic", SyntheticConfig, _main)
