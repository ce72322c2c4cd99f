"""Motion and expression fidelity from keypoints.

Keypoints of the generated video (from a ``data_tools`` pose backend) are compared with the
driving keypoints, only at points the backend detected in the driving video (score >= threshold).

Motion (body: 20 OpenPose points; hands: 2 x 21 points), per frame normalised by the larger side
of the driving person's body box (the usual PCK normaliser):

* ``<group>_error``: mean normalised distance over points detected in both videos;
* ``<group>_pck@a``: fraction of driving points whose generated point was detected *and* lies
  within ``a`` x box size (a point the generated video lost counts as a miss);
* ``<group>_detected``: fraction of driving points also detected in the generated video.

Expression (68 face landmarks): each face's landmarks are centred on their mean and divided by
that face's inter-ocular distance (outer eye corners 36 and 45), the way a face crop removes head
position and size; ``face_nme`` is the mean distance between the two normalised shapes, in
inter-ocular units. Head motion itself is part of the body metrics (nose, eyes, ears).
"""

from __future__ import annotations

import numpy as np

from data_tools.pose.format import PoseSequence

EYE_OUTER = (36, 45)  # 0-based iBUG-68 indices of the outer eye corners


def _check_lengths(generated: PoseSequence, driving: PoseSequence) -> PoseSequence:
    if len(generated) != len(driving):
        raise ValueError(f"keypoints: generated has {len(generated)} frames, driving {len(driving)}; "
                         "compare sequences of the same length")
    return driving.resized(generated.height, generated.width)


def body_box_size(pose: PoseSequence, threshold: float) -> np.ndarray:
    """Larger side of the box around each frame's confident body points, NaN if < 2 points. [T]"""
    out = np.full(len(pose), np.nan, np.float64)
    for t, pts in enumerate(pose.body):
        ok = pts[:, 2] >= threshold
        if ok.sum() >= 2:
            xy = pts[ok, :2]
            size = float((xy.max(0) - xy.min(0)).max())
            out[t] = size if size > 0 else np.nan
    return out


def _group_metrics(gen: np.ndarray, drv: np.ndarray, norm: np.ndarray, threshold: float,
                   pck_thresholds) -> dict:
    """gen, drv: [T, N, 3]; norm: [T] (NaN = frame unusable)."""
    valid_frame = np.isfinite(norm)[:, None]
    ref = (drv[..., 2] >= threshold) & valid_frame  # [T, N] points we judge
    found = ref & (gen[..., 2] >= threshold)
    dist = np.linalg.norm(gen[..., :2] - drv[..., :2], axis=-1) / np.where(np.isfinite(norm), norm, 1.0)[:, None]
    n_ref = int(ref.sum())

    def share(mask: np.ndarray) -> float:  # of the judged driving points; NaN when none is judged
        return float(mask.sum() / n_ref) if n_ref else float("nan")

    return {"points": n_ref, "error": float(dist[found].mean()) if found.any() else float("nan"),
            "detected": share(found), **{f"pck@{a:g}": share(found & (dist <= a)) for a in pck_thresholds}}


def motion_metrics(generated: PoseSequence, driving: PoseSequence, *, threshold: float = 0.5,
                   pck_thresholds=(0.05, 0.1)) -> dict:
    """Body and hand keypoint error / PCK of ``generated`` against ``driving`` (flat dict)."""
    driving = _check_lengths(generated, driving)
    norm = body_box_size(driving, threshold)
    out = {"motion_frames_without_person": int((~np.isfinite(norm)).sum())}
    groups = {
        "body": (generated.body, driving.body),
        "hands": (np.concatenate([generated.left_hand, generated.right_hand], 1),
                  np.concatenate([driving.left_hand, driving.right_hand], 1)),
    }
    for name, (g, d) in groups.items():
        out.update({f"{name}_{k}": v for k, v in _group_metrics(g, d, norm, threshold, pck_thresholds).items()})
    return out


def normalised_face(face: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """face [T, 68, 3] -> (shape [T, 68, 2] centred and in inter-ocular units, point mask [T, 68],
    frame mask [T]). A frame is usable when both outer eye corners and >= 34 points are confident."""
    ok = face[..., 2] >= threshold
    xy = face[..., :2].astype(np.float64)
    a, b = EYE_OUTER
    iod = np.linalg.norm(xy[:, a] - xy[:, b], axis=-1)
    usable = ok[:, a] & ok[:, b] & (ok.sum(-1) >= 34) & (iod > 0)
    count = np.maximum(ok.sum(-1, keepdims=True), 1)
    centre = (xy * ok[..., None]).sum(1) / count  # [T, 2]
    shape = (xy - centre[:, None]) / np.where(iod > 0, iod, 1.0)[:, None, None]
    return shape, ok, usable


def expression_metrics(generated: PoseSequence, driving: PoseSequence, *, threshold: float = 0.5) -> dict:
    """68-landmark error (``face_nme``) between generated and driving faces, crop-normalised."""
    driving = _check_lengths(generated, driving)
    gs, gok, gframe = normalised_face(generated.face, threshold)
    ds, dok, dframe = normalised_face(driving.face, threshold)
    judged = int(dframe.sum())
    both = dframe & gframe
    out = {"face_frames": judged,
           "face_detected": float(both.sum() / judged) if judged else float("nan")}
    pts = both[:, None] & gok & dok
    out["face_nme"] = float(np.linalg.norm(gs - ds, axis=-1)[pts].mean()) if pts.any() else float("nan")
    return out
