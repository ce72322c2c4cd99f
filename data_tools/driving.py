"""Official inference inputs from a driving video and a reference image (the library part of
``python -m data_tools.preprocess_driving``; eval and ``eval.generate --driving`` call it).

``preprocess_driving(video, ref, out, ...)`` writes ``src_ref.png``, ``src_pose.mp4``,
``src_face.mp4`` (and ``src_bg.mp4``, ``src_mask.mp4`` in replace mode; mask 255 = character) plus
``src_meta.json`` (keypoints, sizes, options). The size follows the driving video (target area
rule, multiples of 16); the reference is letterboxed into it. ``retarget`` re-proportions the
driving pose to the reference (animate mode); in replace mode the pose stays on the driving person.

Pose estimation is the slow part (a CPU pose model per frame): ``progress(done, total)`` is
called once per frame as it finishes, so a caller can show frames done / total.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from data_tools.pose import get_pose_backend
from data_tools.pose.face import crop_faces
from data_tools.pose.render import render_pose
from data_tools.retarget import retarget_pose
from wan_animate.files import atomic_write_json
from wan_animate.geometry import ResizePlan, area_bucket
from wan_animate.video_io import decode_video, read_video, resample_indices, write_video


def preprocess_driving(video, ref, out, *, retarget: bool = False, replace: bool = False, fps: float = 30.0,
                       target_area: int = 1280 * 720, pose_backend: str = "mediapipe",
                       pose_options: dict | None = None, face_size: int = 512,
                       max_frames: int | None = None, segmenter: str = "mediapipe",
                       sam2_path: str | None = None,
                       progress: Callable[[int, int], None] | None = None) -> dict[str, Path]:
    """Write the official inference inputs to ``out``; returns {name: path}. ``progress(done,
    total)``: called once per frame of pose estimation (``done`` = 1 .. ``total``)."""
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
    decoded = decode_video(video, max_frames=limit, threads=True)  # upright, with timestamps (VFR)
    frames_src, src_fps = decoded.frames, decoded.fps
    sel = resample_indices(len(frames_src), src_fps, fps, decoded.times)[:max_frames]  # None: all
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

    backend = get_pose_backend(pose_backend, **(pose_options or {}))
    pose_src = backend.extract(frames_src, source=str(video), frame_indices=sel,
                               progress=_per_frame(progress, len(frames_src)))
    if not pose_src.person_detected().any():  # nothing to animate from: refuse before any output is built
        raise ValueError(f"no person found in {video}: the pose backend ({pose_backend}) detected no body in any of "
                         f"its {len(pose_src)} frames; use a driving video that shows the moving person.")
    pose = plan.pose(pose_src)
    retargeted = retarget and not replace  # replace mode: the pose stays on the driving person
    if retargeted:
        pose = retarget_pose(pose, ref_plan.pose(backend.extract_image(ref_img)))
    frames = plan.apply_all(frames_src)
    face, boxes = crop_faces(frames_src, pose_src, face_size)
    names = ("src_ref.png", "src_pose.mp4", "src_face.mp4", *(("src_bg.mp4", "src_mask.mp4") if replace else ()),
             "src_meta.json")
    paths = {name: out / name for name in names}
    cv2.imwrite(str(paths["src_ref.png"]), ref_plan.apply(ref_img)[..., ::-1])
    write_video(paths["src_pose.mp4"], render_pose(pose, h, w), out_fps)
    write_video(paths["src_face.mp4"], face, out_fps)
    if replace:
        masks = seg.masks(frames, pose=pose)  # replace mode: pose is the driving person's, in frame pixels
        seg.close()
        write_video(paths["src_bg.mp4"], background(frames, masks), out_fps)
        write_video(paths["src_mask.mp4"], np.repeat((masks * 255).astype(np.uint8)[..., None], 3, -1), out_fps)
    meta = {"video": str(video), "ref": str(ref), "fps": out_fps, "height": h, "width": w,
            "num_frames": int(len(frames)), "frame_indices": [int(i) for i in sel], "retargeted": retargeted,
            "replace": replace, "pose_backend": pose_backend, "keypoints": pose.to_dict(),
            "segmenter": segmenter if replace else None,
            "face_boxes_source": np.round(boxes, 2).tolist()}
    atomic_write_json(paths["src_meta.json"], meta, indent=None)
    return paths


def _per_frame(progress: Callable[[int, int], None] | None, total: int) -> Callable[[int], None] | None:
    """The backends' hook (``n`` more frames done; a batched backend reports a batch at once) as
    one ``progress(done, total)`` call per frame."""
    if progress is None:
        return None
    done = 0

    def frames_done(n: int) -> None:
        nonlocal done
        for _ in range(n):
            done += 1
            progress(done, total)

    return frames_done
