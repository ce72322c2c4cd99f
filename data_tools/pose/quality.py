"""A pose-quality score per clip, from its keypoints alone (detectors such as mediapipe
sometimes draw a wrong skeleton for a few frames, e.g. arms up while the person stands).

``pose_quality(seq)`` looks at the body points and marks frames as bad for three reasons:

- temporal jumps: a point moves more than ``jump_torso`` torso lengths between two frames and more
  than ``jump_ratio`` times its own displacement in the neighbouring frames (so fast but smooth
  motion is not a jump), for at least ``jump_points`` points at once. The clip is cut at the jumps
  and the pieces are joined into tracks where the pose comes back; every track but the longest
  that has at most ``max_glitch_frames`` frames is a glitch, all its frames bad (a wrong skeleton
  on the first frames, arms jumping up for a few frames). A longer other track (a cut, a real
  very fast move) marks only its first frame. Synthetic clips of under ~17 frames swing their
  arms by up to 100 degrees a frame and can be flagged; real video at >= 16 fps moves far less.
- limb-length outliers: a limb (upper arm, forearm, thigh, shin, shoulder or hip width) longer
  than ``max_limb_ratio`` times its median length over the clip (a limb cannot grow; it can look
  shorter when it points at the camera, so only growth is flagged).
- low confidence: fewer of the 14 main body points (nose to ankles) have a score >= ``threshold``
  than ``min_confident_points`` (4, prepare's person rule) or than ``min_confident_fraction`` of
  the clip's median count (a half-body clip, legs never seen, is not low confidence; a frame that
  loses half of what the clip usually sees is).

The score is the fraction of good frames (1.0 = no frame flagged). The torso length (neck to the
hips' midpoint, median over the clip; 1.5 shoulder widths when the hips are never seen) is the
unit, so the rules do not depend on the resolution.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from data_tools.pose.format import PoseSequence

NECK, R_SHOULDER, L_SHOULDER, R_HIP, L_HIP = 1, 2, 5, 8, 11
MAIN_POINTS = tuple(range(14))  # nose .. l_ankle (eyes, ears and toes are often missing legitimately)
LIMBS = {
    "r_upper_arm": (2, 3), "r_forearm": (3, 4), "l_upper_arm": (5, 6), "l_forearm": (6, 7),
    "r_thigh": (8, 9), "r_shin": (9, 10), "l_thigh": (11, 12), "l_shin": (12, 13),
    "shoulders": (2, 5), "hips": (8, 11),
}


@dataclass(frozen=True)
class PoseQualityRules:
    threshold: float = 0.5  # a point counts when its score is >= this (the renderer's threshold)
    jump_torso: float = 0.5
    jump_ratio: float = 3.0
    jump_points: int = 2
    max_glitch_frames: int = 8
    max_limb_ratio: float = 1.6
    min_confident_points: int = 4
    min_confident_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold={self.threshold} must be in [0, 1]")
        if not 0 <= self.min_confident_fraction <= 1:
            raise ValueError(f"min_confident_fraction={self.min_confident_fraction} must be in [0, 1]")
        for name in ("jump_torso", "jump_ratio", "max_limb_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("jump_points", "max_glitch_frames", "min_confident_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def _torso_length(xy: np.ndarray, ok: np.ndarray) -> float | None:
    have = ok[:, NECK] & ok[:, R_HIP] & ok[:, L_HIP]
    if have.any():
        mid_hip = (xy[have, R_HIP] + xy[have, L_HIP]) / 2
        length = float(np.median(np.linalg.norm(xy[have, NECK] - mid_hip, axis=-1)))
        if length > 0:
            return length
    have = ok[:, R_SHOULDER] & ok[:, L_SHOULDER]  # a half-body clip: shoulders instead
    if have.any():
        width = float(np.median(np.linalg.norm(xy[have, R_SHOULDER] - xy[have, L_SHOULDER], axis=-1)))
        if width > 0:
            return 1.5 * width
    return None


def _jump_frames(xy: np.ndarray, ok: np.ndarray, torso: float, rules: PoseQualityRules) -> np.ndarray:
    """bool [T]: frame t (t >= 1) is a jump from frame t - 1."""
    t_len = len(xy)
    jumps = np.zeros(t_len, bool)
    if t_len < 2:
        return jumps
    disp = np.linalg.norm(np.diff(xy, axis=0), axis=-1)  # [T-1, N]
    valid = ok[1:] & ok[:-1]
    disp = np.where(valid, disp, np.nan)
    for i in range(len(disp)):
        near = [j for j in (i - 2, i - 1, i + 1, i + 2) if 0 <= j < len(disp)]
        with warnings.catch_warnings():  # an all-missing neighbourhood is expected: NaN, no warning
            warnings.simplefilter("ignore", RuntimeWarning)
            local = np.nanmedian(disp[near], axis=0) if near else np.full(disp.shape[1], np.nan)
        big = disp[i] > rules.jump_torso * torso
        sudden = np.where(np.isnan(local), True, disp[i] > rules.jump_ratio * np.nan_to_num(local))
        jumps[i + 1] = int(np.sum(big & sudden & valid[i])) >= rules.jump_points
    return jumps


def _typical_speed(xy: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Median displacement per frame of each point over the clip (0 where never seen twice)."""
    disp = np.where(ok[1:] & ok[:-1], np.linalg.norm(np.diff(xy, axis=0), axis=-1), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nan_to_num(np.nanmedian(disp, axis=0))


def _glitch_frames(xy: np.ndarray, ok: np.ndarray, jumps: np.ndarray, torso: float,
                   rules: PoseQualityRules) -> np.ndarray:
    """Frames of short glitches (see the module docstring). The clip is cut at the jumps; a piece
    joins an earlier piece's track when its first frame is no jump from that piece's last frame
    (the pose came back); the track with most frames is right, other tracks of at most
    ``max_glitch_frames`` frames are glitches, and longer ones lose only their first frame."""
    t_len = len(jumps)
    cuts = [0, *np.flatnonzero(jumps).tolist(), t_len]
    pieces = [(a, b) for a, b in itertools.pairwise(cuts) if b > a]
    track = list(range(len(pieces)))
    speed = _typical_speed(xy, ok)
    for k in range(1, len(pieces)):
        for m in range(k - 2, -1, -1):  # the piece right before is by construction a jump away
            # Across a gap the pose may have moved on at its usual speed.
            gap = pieces[k][0] - (pieces[m][1] - 1)
            limit = rules.jump_torso * torso + speed * gap
            a, b = pieces[m][1] - 1, pieces[k][0]  # the earlier piece's last frame, this piece's first
            if np.sum(ok[a] & ok[b] & (np.linalg.norm(xy[a] - xy[b], axis=-1) > limit)) < rules.jump_points:
                track[k] = track[m]
                break
    frames = {t: sum(b - a for (a, b), tr in zip(pieces, track) if tr == t) for t in set(track)}
    best = max(frames, key=frames.get)
    bad = np.zeros(t_len, bool)
    for (a, b), tr in zip(pieces, track):
        if tr != best:  # a short other track is a glitch; a longer one (a cut) loses only its first frame
            bad[a:b if frames[tr] <= rules.max_glitch_frames else a + 1] = True
    return bad


def _limb_outlier_frames(xy: np.ndarray, ok: np.ndarray, rules: PoseQualityRules) -> np.ndarray:
    bad = np.zeros(len(xy), bool)
    for a, b in LIMBS.values():
        have = ok[:, a] & ok[:, b]
        if have.sum() < 3:  # no meaningful median
            continue
        length = np.linalg.norm(xy[:, a] - xy[:, b], axis=-1)
        median = float(np.median(length[have]))
        if median > 0:
            bad |= have & (length > rules.max_limb_ratio * median)
    return bad


def pose_quality(seq: PoseSequence, rules: PoseQualityRules | None = None) -> dict:
    """Pose-quality report of one clip, JSON-ready::

        {"score": 0.82, "frames": 17, "flags": ["temporal_jumps"], "bad_frames": [0, 1, 2],
         "jump_frames": [...], "limb_outlier_frames": [...], "low_confidence_frames": [...],
         "torso_px": 61.3, "rules": {...}}

    ``flags`` names every reason that marked at least one frame ("no_person" when no frame has a
    neck and both hips or both shoulders, then the score is 0).
    """
    rules = rules or PoseQualityRules()
    t_len = len(seq)
    xy = seq.body[..., :2].astype(np.float64)
    ok = seq.body[..., 2] >= rules.threshold
    count = ok[:, list(MAIN_POINTS)].sum(-1)
    usual = float(np.median(count)) if t_len else 0.0
    low_conf = count < max(rules.min_confident_points, rules.min_confident_fraction * usual)
    torso = _torso_length(xy, ok)
    if torso is None or t_len == 0:
        return {"score": 0.0, "frames": t_len, "flags": ["no_person"], "bad_frames": list(range(t_len)),
                "jump_frames": [], "limb_outlier_frames": [],
                "low_confidence_frames": np.flatnonzero(low_conf).tolist(), "torso_px": None, "rules": asdict(rules)}
    jumps = _jump_frames(xy, ok, torso, rules)
    glitch = _glitch_frames(xy, ok, jumps, torso, rules) if jumps.any() else np.zeros(t_len, bool)
    limbs = _limb_outlier_frames(xy, ok, rules)
    bad = glitch | limbs | low_conf
    flags = [name for name, m in (("temporal_jumps", glitch), ("limb_length_outliers", limbs),
                                  ("low_confidence", low_conf)) if m.any()]
    return {"score": round(1.0 - float(bad.mean()), 4), "frames": t_len, "flags": flags,
            "bad_frames": np.flatnonzero(bad).tolist(), "jump_frames": np.flatnonzero(glitch).tolist(),
            "limb_outlier_frames": np.flatnonzero(limbs).tolist(),
            "low_confidence_frames": np.flatnonzero(low_conf).tolist(), "torso_px": round(torso, 2),
            "rules": asdict(rules)}


def describe_pose_quality(q: dict) -> str:
    """One line for logs and ``inspect``: ``pose 0.82 (temporal_jumps: frames 0-2)``."""
    def spans(frames: list[int]) -> str:  # runs of consecutive frames: frame - position is constant in one
        runs = [[f for _, f in run] for _, run in itertools.groupby(enumerate(frames), lambda p: p[1] - p[0])]
        return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)

    if not q["flags"]:
        return f"pose {q['score']:.2f} (ok)"
    keys = {"temporal_jumps": "jump_frames", "limb_length_outliers": "limb_outlier_frames",
            "low_confidence": "low_confidence_frames", "no_person": "bad_frames"}
    parts = [f"{flag}: frames {spans(q[keys[flag]])}" for flag in q["flags"]]
    return f"pose {q['score']:.2f} ({'; '.join(parts)})"
