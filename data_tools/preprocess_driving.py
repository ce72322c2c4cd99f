"""Official inference inputs from a driving video and a reference image.

    python -m data_tools.preprocess_driving --video V --ref IMAGE --out DIR [--retarget] [--replace]
        [--fps 30] [--target-area 921600] [--pose-backend mediapipe] [--pose-option key=value ...]
        [--face-size 512] [--max-frames N] [--segmenter mediapipe|sam2] [--sam2-path DIR]

Writes ``src_ref.png``, ``src_pose.mp4``, ``src_face.mp4`` (and ``src_bg.mp4``, ``src_mask.mp4``
with ``--replace``; mask 255 = character) plus ``src_meta.json`` (keypoints, sizes, options).
The size follows the driving video (target area rule, multiples of 16); the reference is
letterboxed into it. ``--retarget`` re-proportions the driving pose to the reference (animate
mode); in replace mode the pose stays on the driving person, so retargeting is not applied.
"""

from __future__ import annotations

import argparse
import json
import sys

from data_tools.driving import preprocess_driving
from data_tools.pose.backends import BACKENDS
from data_tools.segment import SEGMENTERS
from wan_animate.cli import run_tool


def _option(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--pose-option wants key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv=None) -> int:
    return run_tool(_main, argv)


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_tools.preprocess_driving", description=__doc__.split("\n\n")[0])
    ap.add_argument("--video", required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--retarget", action="store_true", help="re-proportion the pose to the reference (animate mode)")
    ap.add_argument("--replace", action="store_true", help="also write src_bg.mp4 and src_mask.mp4")
    ap.add_argument("--segmenter", default="mediapipe", choices=SEGMENTERS,
                    help="replace-mode character masks (sam2 needs --sam2-path)")
    ap.add_argument("--sam2-path", default=None,
                    help="SAM2 folder in the transformers format (e.g. sam2.1-hiera-large)")
    ap.add_argument("--fps", type=float, default=30.0, help="output frame rate (-1 keeps the source)")
    ap.add_argument("--target-area", type=int, default=1280 * 720)
    ap.add_argument("--pose-backend", default="mediapipe", choices=list(BACKENDS))
    ap.add_argument("--pose-option", type=_option, action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--face-size", type=int, default=512)
    ap.add_argument("--max-frames", type=int, default=None)
    args = ap.parse_args(argv)
    if args.segmenter == "sam2" and not args.sam2_path:
        ap.error("--segmenter sam2 needs --sam2-path DIR (a transformers-format SAM2 folder)")
    if args.retarget and args.replace:
        print("note: --retarget is ignored in replace mode (the pose must stay on the driving person)")
    paths = preprocess_driving(args.video, args.ref, args.out, retarget=args.retarget, replace=args.replace,
                               fps=args.fps, target_area=args.target_area, pose_backend=args.pose_backend,
                               pose_options=dict(args.pose_option), face_size=args.face_size,
                               max_frames=args.max_frames, segmenter=args.segmenter, sam2_path=args.sam2_path)
    for name, p in paths.items():
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
