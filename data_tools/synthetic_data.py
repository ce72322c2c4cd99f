"""Procedurally animated characters written as normal schema-v1 shards (tests, CI, quick start):
the library part, importable by train/ and eval/ (the command is ``data_tools.synthetic``).

Each clip is one character (torso shape, colours, limb thickness, head size and background
drawn from the seed) that swings its arms and legs, turns its head, blinks and opens its mouth.
Keypoints are exact (computed from the animation, not detected), the pose video goes through
the same renderer and the face crops through the same cropper as real data. The target frames
are a deterministic function of the reference (appearance), the pose (limbs, head position and
turn) and the face crops (eyes, mouth, and a light that follows the mouth), so a small model can
learn the task.

    from data_tools.synthetic_data import make_synthetic_dataset
    make_synthetic_dataset("DIR", num_clips=8, clip_len=17, height=64, width=64, seed=0)
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace as with_fields
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from data_tools.config import SyntheticConfig
from data_tools.pose.face import crop_faces
from data_tools.pose.format import NUM_FACE, PoseSequence
from data_tools.pose.render import render_pose
from data_tools.segment import background
from data_tools.shards import ShardWriter, encode_sample
from wan_animate.config import DEFAULT_PROMPT


@dataclass
class Character:
    background: tuple
    torso_color: tuple
    limb_color: tuple
    skin_color: tuple
    hair_color: tuple
    torso_width: float  # fraction of the frame width (half-width of the shoulders)
    hip_width: float
    limb_thickness: float  # fraction of min(H, W)
    head_radius: float  # fraction of H
    arm_freq: float  # swings per clip
    leg_freq: float
    arm_phase: float
    turn_freq: float
    blink_period: int  # frames
    mouth_freq: float
    drift: float  # horizontal sway, fraction of W


def _color(rng, low=40, high=255) -> tuple:
    return tuple(int(c) for c in rng.integers(low, high, 3))


def random_character(rng: np.random.Generator) -> Character:
    return Character(
        background=_color(rng, 0, 90), torso_color=_color(rng, 90), limb_color=_color(rng, 90),
        skin_color=_color(rng, 150), hair_color=_color(rng, 20, 140),
        torso_width=float(rng.uniform(0.10, 0.18)), hip_width=float(rng.uniform(0.06, 0.14)),
        limb_thickness=float(rng.uniform(0.035, 0.06)), head_radius=float(rng.uniform(0.08, 0.11)),
        arm_freq=float(rng.uniform(0.5, 1.5)), leg_freq=float(rng.uniform(0.3, 1.0)),
        arm_phase=float(rng.uniform(0, 2 * math.pi)), turn_freq=float(rng.uniform(0.3, 1.0)),
        blink_period=int(rng.integers(6, 12)), mouth_freq=float(rng.uniform(0.5, 2.0)),
        drift=float(rng.uniform(-0.06, 0.06)),
    )


@dataclass
class FrameState:
    arm_l: float
    arm_r: float
    fore_l: float
    fore_r: float
    leg_l: float
    leg_r: float
    yaw: float  # -1 .. 1
    eye_open: float  # 0 .. 1
    mouth_open: float  # 0 .. 1
    shift: float  # horizontal offset, fraction of W


def animation_state(ch: Character, t: int, clip_len: int) -> FrameState:
    u = t / max(clip_len - 1, 1)
    s = math.sin(2 * math.pi * ch.arm_freq * u + ch.arm_phase)
    leg = math.sin(2 * math.pi * ch.leg_freq * u)
    return FrameState(
        arm_l=0.6 + 0.9 * s, arm_r=0.6 - 0.9 * s, fore_l=0.5 + 0.5 * s, fore_r=0.5 - 0.5 * s,
        leg_l=0.25 * leg, leg_r=-0.25 * leg, yaw=math.sin(2 * math.pi * ch.turn_freq * u),
        eye_open=0.0 if t % ch.blink_period == ch.blink_period - 1 else 1.0,
        mouth_open=0.5 + 0.5 * math.sin(2 * math.pi * ch.mouth_freq * u), shift=ch.drift * math.sin(math.pi * u),
    )


# The expression lights the scene: this RGB shift is added to every pixel of a frame in proportion
# to the mouth opening (0 at rest). The eyes and mouth are 1-3 pixels at 64x64, too few to leave a
# measurable trace in the latents (docs/training.md); the light, which the face crops show too, makes
# the expression a frame-wide part of the target that only the face crops carry.
EXPRESSION_LIGHT = (127, 63, -63)


def light(frame: np.ndarray, st: FrameState) -> np.ndarray:
    """``frame`` uint8 [H, W, 3] lit by ``EXPRESSION_LIGHT`` x the mouth opening of ``st``."""
    shift = np.round(st.mouth_open * np.array(EXPRESSION_LIGHT)).astype(np.int16)
    return np.clip(frame.astype(np.int16) + shift, 0, 255).astype(np.uint8)


REST = FrameState(arm_l=0.25, arm_r=0.25, fore_l=0.1, fore_r=0.1, leg_l=0.05, leg_r=-0.05, yaw=0.0,
                  eye_open=1.0, mouth_open=0.0, shift=0.0)


def _ellipse_points(cx, cy, rx, ry, n, start=0.0, end=2 * math.pi, closed=True):
    count = n if closed else n - 1
    angles = [start + (end - start) * i / count for i in range(n)]
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]


def character_keypoints(ch: Character, st: FrameState, height: int, width: int):
    """Exact keypoints (body 20, hands 2 x 21, face 68) and drawing geometry for one frame."""
    H, W = height, width
    cx = W * (0.5 + st.shift)
    neck = (cx, 0.33 * H)
    hip_y = 0.62 * H
    sh_l, sh_r = (cx + ch.torso_width * W, neck[1]), (cx - ch.torso_width * W, neck[1])  # image right = left
    hip_l, hip_r = (cx + ch.hip_width * W, hip_y), (cx - ch.hip_width * W, hip_y)
    upper, fore, thigh, shin = 0.13 * H, 0.12 * H, 0.15 * H, 0.14 * H

    def limb(origin, angle, length, side):
        # angle 0 = straight down; positive lifts the limb outwards to ``side`` (+1 image right)
        return (origin[0] + side * length * math.sin(angle), origin[1] + length * math.cos(angle))

    elb_l = limb(sh_l, st.arm_l, upper, +1)
    wri_l = limb(elb_l, st.arm_l + st.fore_l, fore, +1)
    elb_r = limb(sh_r, st.arm_r, upper, -1)
    wri_r = limb(elb_r, st.arm_r + st.fore_r, fore, -1)
    knee_l, knee_r = limb(hip_l, st.leg_l, thigh, +1), limb(hip_r, -st.leg_r, thigh, -1)
    ank_l, ank_r = limb(knee_l, st.leg_l * 0.5, shin, +1), limb(knee_r, -st.leg_r * 0.5, shin, -1)
    toe_l, toe_r = (ank_l[0] + 0.04 * W, ank_l[1] + 0.01 * H), (ank_r[0] - 0.04 * W, ank_r[1] + 0.01 * H)

    r = ch.head_radius * H
    head = (cx, neck[1] - r * 1.25)
    yaw_dx = st.yaw * 0.35 * r
    eye_l = (head[0] + 0.4 * r + yaw_dx, head[1] - 0.1 * r)
    eye_r = (head[0] - 0.4 * r + yaw_dx, head[1] - 0.1 * r)
    nose = (head[0] + 1.2 * yaw_dx, head[1] + 0.2 * r)
    ear_l = (head[0] + r * (1.0 - 0.15 * max(st.yaw, 0)), head[1])
    ear_r = (head[0] - r * (1.0 - 0.15 * max(-st.yaw, 0)), head[1])
    mouth = (head[0] + yaw_dx, head[1] + 0.55 * r)

    body_xy = [nose, neck, sh_r, elb_r, wri_r, sh_l, elb_l, wri_l, hip_r, knee_r, ank_r, hip_l, knee_l,
               ank_l, eye_r, eye_l, ear_r, ear_l, toe_l, toe_r]
    body = np.array([[x, y, 1.0] for x, y in body_xy], np.float32)

    def hand(wrist, elbow):  # five straight fingers of 4 joints fanned around the forearm's direction
        base = math.atan2(wrist[1] - elbow[1], wrist[0] - elbow[0])
        fingers = [base + (f - 2) * 0.35 for f in range(5)]
        pts = [wrist] + [(wrist[0] + 0.012 * H * j * math.cos(a), wrist[1] + 0.012 * H * j * math.sin(a))
                         for a in fingers for j in range(1, 5)]
        return np.array([[x, y, 1.0] for x, y in pts], np.float32)

    eye_rx, eye_ry = 0.2 * r, max(0.12 * r * st.eye_open, 0.02 * r)
    mouth_rx, mouth_ry = 0.35 * r, 0.04 * r + 0.2 * r * st.mouth_open
    face_xy = []
    face_xy += _ellipse_points(head[0] + 0.5 * yaw_dx, head[1] + 0.05 * r, 0.95 * r, 0.95 * r, 17,
                               math.pi, 0.0, closed=False)[::-1]  # jaw, image-left to right, under the head
    face_xy = [(x, 2 * (head[1] + 0.05 * r) - y) for x, y in face_xy]  # mirror the arc to the lower half
    face_xy += [(eye_r[0] - 0.25 * r + 0.12 * r * i, eye_r[1] - 0.3 * r) for i in range(5)]  # right brow
    face_xy += [(eye_l[0] - 0.25 * r + 0.12 * r * i, eye_l[1] - 0.3 * r) for i in range(5)]  # left brow
    face_xy += [(nose[0], head[1] - 0.1 * r + 0.1 * r * i) for i in range(4)]  # nose bridge
    face_xy += [(nose[0] - 0.16 * r + 0.08 * r * i, nose[1] + 0.08 * r) for i in range(5)]  # nose base
    for e in (eye_r, eye_l):
        face_xy += _ellipse_points(e[0], e[1], eye_rx, eye_ry, 6, math.pi, 3 * math.pi)
    face_xy += _ellipse_points(mouth[0], mouth[1], mouth_rx, mouth_ry, 12, math.pi, 3 * math.pi)
    face_xy += _ellipse_points(mouth[0], mouth[1], 0.7 * mouth_rx, 0.7 * mouth_ry, 8, math.pi, 3 * math.pi)
    face = np.array([[x, y, 1.0] for x, y in face_xy], np.float32)
    assert len(face) == NUM_FACE
    geometry = dict(head=head, r=r, eyes=(eye_l, eye_r), eye_axes=(eye_rx, eye_ry), mouth=mouth,
                    mouth_axes=(mouth_rx, mouth_ry), yaw_dx=yaw_dx,
                    torso=[sh_l, sh_r, hip_r, hip_l])
    return body, hand(wri_l, elb_l), hand(wri_r, elb_r), face, geometry


def draw_character(ch: Character, body, geo, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame uint8 [H, W, 3] and character mask bool [H, W]."""
    H, W = height, width
    layer = np.zeros((H, W, 3), np.uint8)
    mask = np.zeros((H, W), np.uint8)
    thick = max(int(round(ch.limb_thickness * min(H, W))), 1)
    limbs = ((5, 6), (6, 7), (2, 3), (3, 4), (11, 12), (12, 13), (8, 9), (9, 10), (13, 18), (10, 19))
    pts = body[:, :2]

    def both(draw):
        draw(layer, True)
        draw(mask, False)

    torso = np.round(np.array(geo["torso"])).astype(np.int32)
    both(lambda img, c: cv2.fillConvexPoly(img, torso, ch.torso_color if c else 255))
    for a, b in limbs:
        pa, pb = tuple(int(round(v)) for v in pts[a]), tuple(int(round(v)) for v in pts[b])
        both(lambda img, c: cv2.line(img, pa, pb, ch.limb_color if c else 255, thick, cv2.LINE_AA if c else 8))
    neck_top = (int(round(pts[1][0])), int(round(geo["head"][1])))
    both(lambda img, c: cv2.line(img, tuple(int(round(v)) for v in pts[1]), neck_top,
                                 ch.skin_color if c else 255, thick))
    hx, hy, r = geo["head"][0], geo["head"][1], geo["r"]
    centre = (int(round(hx)), int(round(hy)))
    both(lambda img, c: cv2.circle(img, centre, int(round(r)), ch.skin_color if c else 255, -1))
    # Hair: a cap whose side shifts against the head turn.
    cap_centre = (int(round(hx - 0.5 * geo["yaw_dx"])), int(round(hy - 0.45 * r)))
    cv2.ellipse(layer, cap_centre, (int(round(r)), max(int(round(0.55 * r)), 1)), 0, 180, 360, ch.hair_color, -1)
    for (ex, ey) in geo["eyes"]:
        axes = (max(int(round(geo["eye_axes"][0])), 1), max(int(round(geo["eye_axes"][1])), 0))
        cv2.ellipse(layer, (int(round(ex)), int(round(ey))), axes, 0, 0, 360, (15, 15, 15), -1)
    mx, my = geo["mouth"]
    maxes = (max(int(round(geo["mouth_axes"][0])), 1), max(int(round(geo["mouth_axes"][1])), 1))
    cv2.ellipse(layer, (int(round(mx)), int(round(my))), maxes, 0, 0, 360, (120, 20, 30), -1)
    sel = mask > 0  # the character over its background
    return np.where(sel[..., None], layer, np.asarray(ch.background, np.uint8)), sel


def _animate(ch: Character, clip_len: int, height: int, width: int):
    """Per frame of ``ch``'s animation: (lit frame, character mask, [body, left hand, right hand, face])."""
    for t in range(clip_len):
        st = animation_state(ch, t, clip_len)
        *points, geo = character_keypoints(ch, st, height, width)
        frame, mask = draw_character(ch, points[0], geo, height, width)
        yield light(frame, st), mask, points


def synthesize_clip(seed: int, index: int, clip_len: int, height: int, width: int):
    """One clip: (frames [T,H,W,3], PoseSequence, reference [H,W,3], masks [T,H,W] bool, background)."""
    rng = np.random.default_rng([seed, index])
    ch = random_character(rng)
    frames, masks, keypoints = zip(*_animate(ch, clip_len, height, width))
    body, _, _, _, geo = character_keypoints(ch, REST, height, width)
    ref, _ = draw_character(ch, body, geo, height, width)
    pose = PoseSequence(*(np.stack(stream) for stream in zip(*keypoints)), height, width)
    return np.stack(frames), pose, ref, np.stack(masks), ch


# The fields of ``Character`` that make its motion; the others are its appearance (colours, body shape).
MOTION_FIELDS = ("arm_freq", "leg_freq", "arm_phase", "turn_freq", "blink_period", "mouth_freq", "drift")


def driving_character(ch: Character, seed: int, index: int) -> Character:
    """Another character (colours, body shape, background drawn from ``(seed, index)``'s own
    stream) that performs exactly ``ch``'s motion: same joint angles, head turn, blinks and mouth
    in every frame. Its clip is the driving video of a version-2 sample."""
    other = random_character(np.random.default_rng([seed, index, 0xD21]))
    return with_fields(other, **{name: getattr(ch, name) for name in MOTION_FIELDS})


def render_animation(ch: Character, clip_len: int, height: int, width: int) -> np.ndarray:
    """Frames uint8 [T, H, W, 3] of ``ch`` performing its animation."""
    return np.stack([frame for frame, _, _ in _animate(ch, clip_len, height, width)])


def make_synthetic_dataset(output_dir, *, num_clips: int = 8, clip_len: int = 17, height: int = 64,
                           width: int = 64, seed: int = 0, shard_size: int = 4, face_size: int = 64,
                           fps: float = 30.0, replace: bool = False, progress: bool = False,
                           driving: bool = False) -> Path:
    """Write ``num_clips`` synthetic samples as schema-v1 shards + manifest.json; returns the folder.

    ``driving=True`` adds each clip's driving video (schema version 2): the same animation
    rendered exactly with a second character (``driving_character``), the triplets the
    Wan-Animate-2 family trains on.

    Deterministic: the same arguments give identical samples (videos are lossless H.264, so the
    decoded frames are exact; the mp4 bytes may differ because x264 is multi-threaded).
    """
    cfg = SyntheticConfig(output=str(output_dir), num_clips=num_clips, clip_len=clip_len, height=height,
                          width=width, seed=seed, shard_size=shard_size, face_size=face_size, fps=fps,
                          replace=replace, driving=driving)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("shard-*.tar")) + list(out.glob("shard-*.tar.tmp")):
        stale.unlink()
    started = time.time()
    keys = []
    with ShardWriter(out, shard_size=shard_size, mtime=0) as writer:
        for i in tqdm(range(num_clips), desc="synthetic", unit="clip", disable=not progress):
            frames, pose, ref, masks, ch = synthesize_clip(seed, i, clip_len, height, width)
            face, boxes = crop_faces(frames, pose, face_size, smooth_window=1)
            key = f"synthetic_s{seed}_{i:06d}"
            meta = {
                "source": f"synthetic://seed={seed}/clip={i}", "frame_indices": list(range(clip_len)),
                "source_fps": fps, "source_height": height, "source_width": width,
                "bucket": [height, width], "reference": {"policy": "rest_pose", "index": None},
                "keypoints": pose.to_dict(), "face_boxes": np.round(boxes, 2).tolist(),
                "person_detected": [True] * clip_len, "face_detected": [True] * clip_len,
                "synthetic": {"character": asdict(ch)},
            }
            driver = driving_character(ch, seed, i) if driving else None
            if driver is not None:
                meta["synthetic"]["driving_character"] = asdict(driver)
            bg, mask = (background(frames, masks), masks) if replace else (None, None)
            writer.write(encode_sample(key, target=frames, pose=render_pose(pose, height, width), face=face,
                                       ref=ref, meta=meta, caption=DEFAULT_PROMPT, fps=fps, bg=bg, mask=mask,
                                       driving=render_animation(driver, clip_len, height, width) if driver else None,
                                       crf=0))  # lossless: decoded frames are exact and reproducible
            keys.append(key)
    manifest = {
        "schema_version": 1, "kind": "synthetic", "config": asdict(cfg),
        "counts": {"samples": len(keys), "shards": len(writer.shards_written), "skipped_inputs": 0},
        "shards": [p.name for p in writer.shards_written], "face_size": face_size,
        "height": height, "width": width, "clip_len": clip_len, "fps": fps, "replace": replace,
        "driving": driving,
        "seconds": round(time.time() - started, 3),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    return out
