"""Driving videos for real clips: the same motion with another appearance (schema version 2).

The Wan-Animate-2 family learns from triplets (reference image, driving video, target video). A
real clip has one performer, so its driving video is made from the clip itself by changing
everything a model could copy and keeping everything it must transfer (the body and face motion):

* inside the character mask: the colours (hue rotation, a saturation lift that also colours grey
  or black clothing, a brightness / contrast change) and a texture (a screen-space stripe
  pattern multiplied in);
* outside it: a new background (a smooth two-colour gradient with low-frequency noise), so the
  target's environment can only come from the reference image;
* the mask edge is dilated and feathered, so no ring of the original background survives.

Every random choice comes from one generator seeded by the sample key (reproducible per clip, and
constant over the clip's frames: the driving video is one consistent other person). Training with
driving == target would teach the model to copy the driving frames (docs/data.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class AppearanceChange:
    hue_shift: int  # OpenCV hue units (0..179 = 0..358 degrees)
    saturation_scale: float
    saturation_add: float  # 0..255: lifts grey / black clothing to a colour
    value_scale: float
    value_add: float
    texture_period: float  # stripe period, fraction of min(H, W)
    texture_angle: float  # radians
    texture_strength: float  # 0..1: multiplicative depth of the stripes
    background_a: tuple  # RGB of the gradient's two ends
    background_b: tuple
    background_angle: float
    background_noise: float  # amplitude of the low-frequency noise, 0..255
    edge_dilate: float  # fraction of min(H, W)
    edge_feather: float  # fraction of min(H, W)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def draw_appearance(rng: np.random.Generator) -> AppearanceChange:
    """One random appearance change. Hue shifts stay 60..300 degrees from the original, so the
    colours always change."""
    return AppearanceChange(
        hue_shift=int(rng.integers(30, 151)), saturation_scale=float(rng.uniform(0.6, 1.2)),
        saturation_add=float(rng.uniform(60, 140)), value_scale=float(rng.uniform(0.6, 1.0)),
        value_add=float(rng.uniform(10, 60)), texture_period=float(rng.uniform(0.04, 0.12)),
        texture_angle=float(rng.uniform(0, np.pi)), texture_strength=float(rng.uniform(0.2, 0.45)),
        background_a=tuple(int(c) for c in rng.integers(0, 256, 3)),
        background_b=tuple(int(c) for c in rng.integers(0, 256, 3)),
        background_angle=float(rng.uniform(0, 2 * np.pi)), background_noise=float(rng.uniform(10, 40)),
        edge_dilate=float(rng.uniform(0.01, 0.02)), edge_feather=float(rng.uniform(0.005, 0.015)),
    )


def _recolour(frame: np.ndarray, p: AppearanceChange) -> np.ndarray:
    hsv = cv2.cvtColor(frame, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + p.hue_shift) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] * p.saturation_scale + p.saturation_add, 0, 255)
    hsv[..., 2] = np.clip(hsv[..., 2] * p.value_scale + p.value_add, 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)


def _texture(h: int, w: int, p: AppearanceChange) -> np.ndarray:
    """Multiplicative stripes [H, W, 1] in [1 - strength, 1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u = xx * np.cos(p.texture_angle) + yy * np.sin(p.texture_angle)
    period = max(p.texture_period * min(h, w), 2.0)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * u / period)
    return (1.0 - p.texture_strength * stripes)[..., None]


def _background(h: int, w: int, p: AppearanceChange, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u = (xx / max(w - 1, 1) - 0.5) * np.cos(p.background_angle) + (yy / max(h - 1, 1) - 0.5) * np.sin(p.background_angle)
    u = np.clip(u + 0.5, 0, 1)[..., None]
    a, b = np.array(p.background_a, np.float32), np.array(p.background_b, np.float32)
    bg = (1 - u) * a + u * b
    coarse = rng.standard_normal((max(h // 32, 2), max(w // 32, 2), 3)).astype(np.float32)
    bg += p.background_noise * cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(bg, 0, 255)


def change_appearance(frames: np.ndarray, masks: np.ndarray, params: AppearanceChange,
                      seed: int = 0) -> np.ndarray:
    """``frames`` uint8 [T, H, W, 3] and character ``masks`` [T, H, W] (nonzero = character) -> the
    driving video uint8 [T, H, W, 3]: the character recoloured and textured over a new background.
    The background noise is drawn from ``seed`` (one background for the whole clip)."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.shape}")
    if masks.shape != frames.shape[:3]:
        raise ValueError(f"masks {masks.shape} must be [T, H, W] = {frames.shape[:3]}")
    _, h, w, _ = frames.shape
    side = min(h, w)
    background = _background(h, w, params, np.random.default_rng(seed))
    texture = _texture(h, w, params)
    k = max(int(round(params.edge_dilate * side)), 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))
    sigma = max(params.edge_feather * side, 0.5)
    out = np.empty_like(frames)
    for t, (frame, mask) in enumerate(zip(frames, masks)):
        m = cv2.dilate((np.asarray(mask) > 0).astype(np.uint8), kernel).astype(np.float32)
        m = cv2.GaussianBlur(m, (0, 0), sigma)[..., None]
        character = _recolour(frame, params) * texture
        out[t] = np.clip(m * character + (1 - m) * background, 0, 255).round().astype(np.uint8)
    return out
