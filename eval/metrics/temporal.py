"""Temporal consistency of a generated video.

``flicker``: mean absolute change between consecutive frames (0..255 scale). Lower is steadier,
but a frozen video scores 0, so read it next to the ground truth's own value (``flicker_gt``).

``temporal_error`` (needs ground truth): mean absolute difference between the generated video's
frame-to-frame changes and the ground truth's, ``|(g[t+1]-g[t]) - (r[t+1]-r[t])|``. It is 0 for a
perfect reconstruction and grows both with flicker (changes the truth lacks) and with frozen or
missing motion (changes the truth has).
"""

from __future__ import annotations

from eval.metrics.image import as_float_video, check_same_shape


def flicker(frames) -> float:
    x = as_float_video(frames)
    if x.shape[0] < 2:
        raise ValueError("flicker needs at least 2 frames")
    return float((x[1:] - x[:-1]).abs().mean())


def temporal_error(generated, target) -> float:
    a, b = as_float_video(generated), as_float_video(target)
    check_same_shape(a, b, "temporal_error")
    if a.shape[0] < 2:
        raise ValueError("temporal_error needs at least 2 frames")
    return float(((a[1:] - a[:-1]) - (b[1:] - b[:-1])).abs().mean())
