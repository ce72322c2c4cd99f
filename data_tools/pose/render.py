"""Pose video renderer in the official Wan-Animate style (facts section 8).

Black canvas; the 19 OpenPose limbs as filled ellipses in the OpenPose palette at 0.6 brightness;
joints as full-colour discs; hands as 20 edges coloured by hue i/20 with blue keypoint dots;
face landmarks are not drawn. Points with score below ``threshold`` (0.5) are skipped. Hand
points whose integer x or y is below 1 (the left / top edge and beyond) are not drawn, nor the
edges touching them, as in the official renderer. Frames are bit-identical to the official
renderer's on the same keypoints (tests/test_data_pose.py checks 480p and 1080p).
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
HAND_EDGES = tuple((0 if j == 0 else 4 * f + j, 4 * f + j + 1) for f in range(5) for j in range(4))
LIMB_BRIGHTNESS = 0.6


def stick_width(height: int, width: int) -> int:
    """Limb half-width and joint radius in pixels (1 below 400 px, 4 at 1080p)."""
    return max(int(min(height, width) / 200) - 1, 1)


def hand_stick_width(height: int, width: int) -> int:
    """Hand edge thickness and hand point radius: half the body's, at least 1 (2 at 1080p)."""
    return max(stick_width(height, width) // 2, 1)


def _draw_body(canvas: np.ndarray, body: np.ndarray, threshold: float, sw: int) -> None:
    for i, (a, b) in enumerate(BODY_LIMBS):
        pa, pb = body[a], body[b]
        if pa[2] < threshold or pb[2] < threshold:
            continue
        mx, my = (pa[0] + pb[0]) / 2, (pa[1] + pb[1]) / 2
        dx, dy = pa[0] - pb[0], pa[1] - pb[1]
        # numpy scalar arithmetic in the keypoints' dtype, as the official renderer does, so that
        # int(length / 2) truncates identically (math.hypot rounds differently in rare cases).
        length = (dx ** 2 + dy ** 2) ** 0.5
        angle = math.degrees(math.atan2(dy, dx))
        poly = cv2.ellipse2Poly((int(mx), int(my)), (int(length / 2), sw), int(angle), 0, 360, 1)
        color = tuple(int(c * LIMB_BRIGHTNESS) for c in OPENPOSE_COLORS[i])
        cv2.fillConvexPoly(canvas, poly, color)
    for j, p in enumerate(body):
        if p[2] < threshold:
            continue
        cv2.circle(canvas, (int(p[0]), int(p[1])), sw, OPENPOSE_COLORS[j], thickness=-1)


def _hand_point_drawn(p: np.ndarray, threshold: float) -> bool:
    # The official rule: confident, and integer x and y both >= 1 (a point on row or column 0,
    # or outside the canvas on the left / top, is treated as missing).
    return p[2] >= threshold and int(p[0]) >= 1 and int(p[1]) >= 1


def _draw_hand(canvas: np.ndarray, hand: np.ndarray, threshold: float, hand_sw: int) -> None:
    drawn = [_hand_point_drawn(p, threshold) for p in hand]
    for i, (a, b) in enumerate(HAND_EDGES):
        if not (drawn[a] and drawn[b]):
            continue
        pa, pb = hand[a], hand[b]
        rgb = colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0)
        cv2.line(canvas, (int(pa[0]), int(pa[1])), (int(pb[0]), int(pb[1])),
                 tuple(round(c * 255) for c in rgb), hand_sw)  # cv2 rounds float colours
    for p, ok in zip(hand, drawn):
        if ok:
            cv2.circle(canvas, (int(p[0]), int(p[1])), hand_sw, (0, 0, 255), thickness=-1)


def render_frame(body, left_hand, right_hand, height: int, width: int, *, threshold: float = 0.5,
                 draw_hands: bool = True) -> np.ndarray:
    """One pose frame: uint8 [H, W, 3] RGB. Keypoints are in pixels of this canvas."""
    canvas = np.zeros((height, width, 3), np.uint8)
    sw = stick_width(height, width)
    _draw_body(canvas, np.asarray(body), threshold, sw)
    if draw_hands:
        for hand in (left_hand, right_hand):
            _draw_hand(canvas, np.asarray(hand), threshold, hand_stick_width(height, width))
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
