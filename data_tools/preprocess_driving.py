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
from pathlib import Path

import cv2
import numpy as np

from data_tools.pose import get_pose_backend
from data_tools.pose.face import crop_faces
from data_tools.pose.render import render_pose
from data_tools.prepare import resample_indices
from data_tools.retarget import retarget_pose
from wan_animate.files import atomic_write_json
from wan_animate.geometry import ResizePlan, area_bucket
from wan_animate.video_io import read_video, write_video


def preprocess_driving(video, ref, out, *, retarget: bool = False, replace: bool = False, fps: float = 30.0,
                       target_area: int = 1280 * 720, pose_backend: str = "mediapipe",
                       pose_options: dict | None = None, face_size: int = 512,
                       max_frames: int | None = None, segmenter: str = "mediapipe",
                       sam2_path: str | None = None) -> dict[str, Path]:
    """Write the official inference inputs to ``out``; returns {name: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seg = None
    if replace:  # built first so that a bad SAM2 folder fails before the slow work
        from data_tools.segment import background, get_segmenter

        seg = (get_segmenter(segmenter, path=sam2_path, progress=True) if segmenter == "sam2"
               else get_segmenter(segmenter))
    limit = None
    if max_frames is not None:  # decode only the source frames the first max_frames outputs need
        _, probe_fps = read_video(video, max_frames=1)
        limit = int(np.ceil(max_frames * (1.0 if fps == -1 else probe_fps / fps))) + 2
    frames_src, src_fps = read_video(video, max_frames=limit)
    sel = resample_indices(len(frames_src), src_fps, fps)
    if max_frames is not None:
        sel = sel[:max_frames]
    frames_src = frames_src[sel]
    out_fps = src_fps if fps == -1 else fps
    src_h, src_w = frames_src.shape[1:3]
    h, w = area_bucket(src_h, src_w, target_area)
    plan = ResizePlan(src_h, src_w, h, w, "crop")
    ref_img = cv2.imread(str(ref), cv2.IMREAD_COLOR)
    if ref_img is None:
        raise FileNotFoundError(f"reference image {ref} cannot be read")
    ref_img = ref_img[..., ::-1].copy()
    ref_plan = ResizePlan(ref_img.shape[0], ref_img.shape[1], h, w, "letterbox")
    ref_out = ref_plan.apply(ref_img)

    backend = get_pose_backend(pose_backend, **(pose_options or {}))
    pose_src = backend.extract(frames_src, source=str(video), frame_indices=sel)
    pose = plan.pose(pose_src)
    retargeted = False
    if retarget and not replace:
        ref_pose = ref_plan.pose(backend.extract_image(ref_img))
        pose = retarget_pose(pose, ref_pose)
        retargeted = True
    frames = plan.apply_all(frames_src)
    face, boxes = crop_faces(frames_src, pose_src, face_size)
    paths = {"src_ref.png": out / "src_ref.png", "src_pose.mp4": out / "src_pose.mp4",
             "src_face.mp4": out / "src_face.mp4"}
    cv2.imwrite(str(paths["src_ref.png"]), ref_out[..., ::-1])
    write_video(paths["src_pose.mp4"], render_pose(pose, h, w), out_fps)
    write_video(paths["src_face.mp4"], face, out_fps)
    if replace:
        masks = seg.masks(frames, pose=pose)  # replace mode: pose is the driving person's, in frame pixels
        seg.close()
        paths["src_bg.mp4"] = out / "src_bg.mp4"
        paths["src_mask.mp4"] = out / "src_mask.mp4"
        write_video(paths["src_bg.mp4"], background(frames, masks), out_fps)
        write_video(paths["src_mask.mp4"], np.repeat((masks * 255).astype(np.uint8)[..., None], 3, -1), out_fps)
    meta = {"video": str(video), "ref": str(ref), "fps": out_fps, "height": h, "width": w,
            "num_frames": int(len(frames)), "frame_indices": [int(i) for i in sel], "retargeted": retargeted,
            "replace": replace, "pose_backend": pose_backend, "keypoints": pose.to_dict(),
            "segmenter": segmenter if replace else None,
            "face_boxes_source": np.round(boxes, 2).tolist()}
    paths["src_meta.json"] = out / "src_meta.json"
    atomic_write_json(paths["src_meta.json"], meta, indent=None)
    return paths


def _option(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--pose-option wants key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_tools.preprocess_driving", description=__doc__.split("\n\n")[0])
    ap.add_argument("--video", required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--retarget", action="store_true", help="re-proportion the pose to the reference (animate mode)")
    ap.add_argument("--replace", action="store_true", help="also write src_bg.mp4 and src_mask.mp4")
    ap.add_argument("--segmenter", default="mediapipe", choices=["mediapipe", "sam2"],
                    help="replace-mode character masks (sam2 needs --sam2-path)")
    ap.add_argument("--sam2-path", default=None,
                    help="SAM2 folder in the transformers format (e.g. sam2.1-hiera-large)")
    ap.add_argument("--fps", type=float, default=30.0, help="output frame rate (-1 keeps the source)")
    ap.add_argument("--target-area", type=int, default=1280 * 720)
    ap.add_argument("--pose-backend", default="mediapipe", choices=["mediapipe", "vitpose", "precomputed"])
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
