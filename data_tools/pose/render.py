"""Pose video renderer in the official Wan-Animate style (facts section 8).

Black canvas; the 19 OpenPose limbs as filled ellipses in the OpenPose palette at 0.6 brightness;
joints as full-colour discs; hands as 20 one-pixel edges coloured by hue i/20 with blue keypoint
dots; face landmarks are not drawn. Points with score below ``threshold`` (0.5) are skipped.
"""

from __future__ import annotations

import colorsys
import math

import cv2
import numpy as np

from data_tools.pose.format import PoseSequence

# Limbs as pairs of indices into our 20-point OpenPose body (0-based). Wan-Animate keeps
# OpenPose's first 17 limbs and replaces its two shoulder-ear limbs by the feet (ankle -> toe).
BODY_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11),
    (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (13, 18), (10, 19),
)
# The OpenPose palette (RGB), one colour per joint / limb, plus Wan-Animate's two toe colours.
OPENPOSE_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
    (200, 200, 0), (100, 100, 0),  # l_toe, r_toe
)
HAND_EDGES = tuple(
    (0 if j == 0 else 4 * f + j, 4 * f + j + 1) for f in range(5) for j in range(4)
)
LIMB_BRIGHTNESS = 0.6


def stick_width(height: int, width: int) -> int:
    return max(int(min(height, width) / 200) - 1, 1)


def _draw_body(canvas: np.ndarray, body: np.ndarray, threshold: float, sw: int) -> None:
    for i, (a, b) in enumerate(BODY_LIMBS):
        pa, pb = body[a], body[b]
        if pa[2] < threshold or pb[2] < threshold:
            continue
        mx, my = (pa[0] + pb[0]) / 2, (pa[1] + pb[1]) / 2
        length = math.hypot(pa[0] - pb[0], pa[1] - pb[1])
        angle = math.degrees(math.atan2(pa[1] - pb[1], pa[0] - pb[0]))
        poly = cv2.ellipse2Poly((int(mx), int(my)), (int(length / 2), sw), int(angle), 0, 360, 1)
        color = tuple(int(c * LIMB_BRIGHTNESS) for c in OPENPOSE_COLORS[i])
        cv2.fillConvexPoly(canvas, poly, color)
    for j, p in enumerate(body):
        if p[2] < threshold:
            continue
        cv2.circle(canvas, (int(p[0]), int(p[1])), sw, OPENPOSE_COLORS[j], thickness=-1)


def _draw_hand(canvas: np.ndarray, hand: np.ndarray, threshold: float, sw: int) -> None:
    for i, (a, b) in enumerate(HAND_EDGES):
        pa, pb = hand[a], hand[b]
        if pa[2] < threshold or pb[2] < threshold:
            continue
        rgb = colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0)
        cv2.line(canvas, (int(pa[0]), int(pa[1])), (int(pb[0]), int(pb[1])),
                 tuple(round(c * 255) for c in rgb), 1)  # cv2 rounds float colours
    for p in hand:
        if p[2] < threshold:
            continue
        cv2.circle(canvas, (int(p[0]), int(p[1])), max(sw // 2, 1), (0, 0, 255), thickness=-1)


def render_frame(body, left_hand, right_hand, height: int, width: int, *, threshold: float = 0.5,
                 draw_hands: bool = True) -> np.ndarray:
    """One pose frame: uint8 [H, W, 3] RGB. Keypoints are in pixels of this canvas."""
    canvas = np.zeros((height, width, 3), np.uint8)
    sw = stick_width(height, width)
    _draw_body(canvas, np.asarray(body), threshold, sw)
    if draw_hands:
        _draw_hand(canvas, np.asarray(left_hand), threshold, sw)
        _draw_hand(canvas, np.asarray(right_hand), threshold, sw)
    return canvas


def render_pose(pose: PoseSequence, height: int | None = None, width: int | None = None, *,
                threshold: float = 0.5, draw_hands: bool = True) -> np.ndarray:
    """Render a pose sequence as a skeleton video uint8 [T, H, W, 3].

    Keypoints are rescaled from the pose's own frame size to ``height x width`` (default: the
    pose's size), so a pose extracted on a large frame renders correctly on the training size.
    """
    height = pose.height if height is None else int(height)
    width = pose.width if width is None else int(width)
    scaled = pose.resized(height, width)
    out = np.zeros((len(scaled), height, width, 3), np.uint8)
    for t in range(len(scaled)):
        out[t] = render_frame(scaled.body[t], scaled.left_hand[t], scaled.right_hand[t], height, width,
                              threshold=threshold, draw_hands=draw_hands)
    return out
