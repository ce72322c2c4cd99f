"""Pose retargeting to the reference's proportions (facts section 8, animate mode).

Per-limb length ratios between the driving video's first frame and the reference image; a global
scale from the nose-to-ankle height (full body) or, without visible ankles, from the upper-body
limbs; the retargeted skeleton is anchored at the feet (full body) or the neck, and follows the
driving anchor's motion scaled by the global scale. Hands and face follow their wrist / nose.
"""

from __future__ import annotations

import numpy as np

from data_tools.pose.format import PoseSequence

# Kinematic tree over our OpenPose-20 body, rooted at the neck (1): (parent, child).
LIMB_TREE = (
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
    (1, 2), (2, 3), (3, 4), (1, 5), (5, 6), (6, 7),
    (1, 8), (8, 9), (9, 10), (10, 19), (1, 11), (11, 12), (12, 13), (13, 18),
)
UPPER_BODY_LIMBS = ((1, 0), (1, 2), (1, 5), (1, 8), (1, 11))


def _ok(p, threshold):
    return p[2] >= threshold


def _len(body, a, b):
    return float(np.hypot(*(body[a, :2] - body[b, :2])))


def body_height(body: np.ndarray, threshold: float = 0.5) -> float | None:
    """Nose-to-ankle height in pixels, or None when the nose or both ankles are not visible."""
    ankles = [body[j, 1] for j in (10, 13) if _ok(body[j], threshold)]
    if not _ok(body[0], threshold) or not ankles:
        return None
    return float(np.mean(ankles) - body[0, 1])


def limb_ratios(drv_body: np.ndarray, ref_body: np.ndarray, threshold: float = 0.5,
                clamp: tuple[float, float] = (0.5, 2.0)) -> tuple[dict, float, bool]:
    """({(parent, child): ratio}, global scale, full_body) from one driving and one reference frame."""
    h_drv, h_ref = body_height(drv_body, threshold), body_height(ref_body, threshold)
    full_body = bool(h_drv and h_ref and h_drv > 1 and h_ref > 1)
    if full_body:
        scale = h_ref / h_drv
    else:
        r = [_len(ref_body, a, b) / _len(drv_body, a, b) for a, b in UPPER_BODY_LIMBS
             if all(_ok(x[j], threshold) for x in (drv_body, ref_body) for j in (a, b)) and _len(drv_body, a, b) > 1]
        scale = float(np.median(r)) if r else 1.0
    ratios = {}
    for a, b in LIMB_TREE:
        ok = all(_ok(x[j], threshold) for x in (drv_body, ref_body) for j in (a, b))
        d = _len(drv_body, a, b)
        ratio = _len(ref_body, a, b) / d if ok and d > 1 else scale
        ratios[(a, b)] = float(np.clip(ratio, clamp[0] * scale, clamp[1] * scale))
    return ratios, float(scale), full_body


def _anchor(body: np.ndarray, full_body: bool, threshold: float) -> np.ndarray:
    if full_body:
        feet = [body[j, :2] for j in (10, 13) if _ok(body[j], threshold)]
        if feet:
            return np.mean(feet, 0)
    return body[1, :2].copy()


def retarget_pose(driving: PoseSequence, reference: PoseSequence, *, threshold: float = 0.5) -> PoseSequence:
    """Driving keypoints re-proportioned to the reference's limbs. Both must be in the same frame
    size (the output canvas); ``reference`` is one frame."""
    reference = reference.resized(driving.height, driving.width)
    ref_body = reference.body[0]
    drv0 = driving.body[0]
    if not (_ok(drv0[1], threshold) and _ok(ref_body[1], threshold)):
        raise ValueError("retargeting needs the neck (both shoulders) visible in the driving video's first frame "
                         "and in the reference image; run without --retarget")
    ratios, scale, full_body = limb_ratios(drv0, ref_body, threshold)
    ref_anchor = _anchor(ref_body, full_body, threshold)
    drv_anchor0 = _anchor(drv0, full_body, threshold)
    body, lh, rh, face = (a.copy() for a in driving.streams())
    for t in range(len(driving)):
        src = driving.body[t]
        new = src.copy()
        new[1, :2] = 0.0  # built relative to the neck, then placed by the anchor
        for a, b in LIMB_TREE:
            new[b, :2] = new[a, :2] + (src[b, :2] - src[a, :2]) * ratios[(a, b)]
        anchor_now = ref_anchor + (_anchor(src, full_body, threshold) - drv_anchor0) * scale
        new[:, :2] += anchor_now - _anchor(new, full_body, threshold)  # new keeps src's scores
        body[t] = new
        # hands follow their wrist (scaled like the forearm), the face its nose (like the neck-nose limb)
        for points, anchor, limb in ((lh, 7, (6, 7)), (rh, 4, (3, 4)), (face, 0, (1, 0))):
            points[t, :, :2] = new[anchor, :2] + (points[t, :, :2] - src[anchor, :2]) * ratios[limb]
    return PoseSequence(body, lh, rh, face, driving.height, driving.width)
