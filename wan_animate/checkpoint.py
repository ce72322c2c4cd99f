"""Wan-Animate DiT checkpoints: the command line over ``wan_animate.weights`` (loading, saving,
converting and diagnosing, one job per module; ``from wan_animate import load_dit, save_dit``)::

    python -m wan_animate.checkpoint convert SRC DST --to official|diffusers [--dtype bf16|fp32|keep]
    python -m wan_animate.checkpoint inspect PATH
    python -m wan_animate.checkpoint make-tiny DST --layout diffusers|official [--seed N] [--family animate2]

``convert`` and ``inspect`` detect the model family (Animate v1 or Animate-2) from the tensor names;
``inspect`` prints it.
"""

from __future__ import annotations

import argparse
import json
import sys

from wan_animate.animate2.config import PRESETS as ANIMATE2_PRESETS
from wan_animate.cli import run_tool
from wan_animate.config import PRESETS
from wan_animate.family import ANIMATE, family_of
from wan_animate.options import DTYPE_NAMES, parse_dtype
from wan_animate.testing import make_tiny_model_folder


def main(argv: list[str] | None = None) -> int:
    """One line and exit status 2 for a bad checkpoint / argument; ``--debug`` for the traceback."""
    return run_tool(_main, argv, extra=(ValueError,))


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m wan_animate.checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an expected error")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a DiT checkpoint between the official and diffusers layouts")
    conv.add_argument("src", help="official/diffusers folder, pipeline folder or single .safetensors file")
    conv.add_argument("dst", help="output folder (or a .safetensors file for one file)")
    conv.add_argument("--to", required=True, choices=["official", "diffusers"])
    conv.add_argument("--dtype", default="keep", choices=["keep", *DTYPE_NAMES])
    conv.add_argument("--max-shard-size", default="5GB")
    conv.add_argument("--preset", default=None, choices=sorted(set(PRESETS) | set(ANIMATE2_PRESETS)),
                      help="config for a single file without config metadata (default: from the files, else 14b)")
    info = sub.add_parser("inspect", help="print layout, config and size of a checkpoint (headers only)")
    info.add_argument("path")
    tiny = sub.add_parser("make-tiny", help="write a complete tiny random model folder (for tests and demos)")
    tiny.add_argument("dst")
    tiny.add_argument("--layout", default="diffusers", choices=["diffusers", "official"])
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--family", default="animate", choices=["animate", "animate2"],
                      help="model family: Wan-Animate-14B (animate) or Wan-Animate-2 (animate2)")
    args = parser.parse_args(argv)

    if args.command == "convert":
        family = family_of(args.src, default=ANIMATE)  # unknown names: its loader's diagnosis
        config = family.config(args.preset)[0] if args.preset else None
        files = family.convert(args.src, args.dst, args.to, dtype=None if args.dtype == "keep" else parse_dtype(args.dtype),
                               max_shard_size=args.max_shard_size, config=config)
        print(f"wrote {len(files)} file(s) to {args.dst} ({args.to} layout)")
    elif args.command == "inspect":
        found = family_of(args.path, default=ANIMATE).inspect(args.path)
        config = found.pop("config")
        for key, value in found.items():
            print(f"{key}: {value}")
        print("config:", json.dumps(config.to_dict()))
    else:
        make_tiny_model_folder(args.dst, layout=args.layout, seed=args.seed, family=args.family)
        print(f"wrote a tiny {args.family} {args.layout} model folder to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
