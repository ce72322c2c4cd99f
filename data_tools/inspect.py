"""Validate schema-v1 shards and draw a contact sheet a person can look at.

    python -m data_tools.inspect DIR [--sheet PATH] [--rows 4] [--frames 4] [--max-samples N]

Checks every sample of every ``shard-*.tar`` in DIR: each stream decodes, frame counts agree,
sizes are right (H, W multiples of 16; face square; ref H x W; json keypoints / face boxes per
frame), keys are unique across shards, no partial ``*.tar.tmp`` is left, and the manifest's
counts match. The contact sheet has one row per sample: reference | frames | pose | face.
Exit status 1 when anything is wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from data_tools.dataset import SampleDecodeError, decode_sample
from data_tools.shards import list_shards, read_shard
from wan_animate.video_io import tensor_to_frames


@dataclass
class InspectReport:
    samples: int = 0
    shards: int = 0
    errors: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    sheet: str | None = None

    @property
    def ok(self) -> bool:
        return not self.errors


def check_sample(d: dict) -> list[str]:
    key, meta = d["key"], d["meta"]
    errs = []
    _, t, h, w = d["video"].shape
    if h % 16 or w % 16:
        errs.append(f"{key}: frame size {h}x{w} is not a multiple of 16")
    if (meta.get("height"), meta.get("width")) != (h, w):
        errs.append(f"{key}: json size {meta.get('height')}x{meta.get('width')} != frames {h}x{w}")
    s = d["face"].shape[-1]
    if d["face"].shape[-2] != s or meta.get("face_size", s) != s:
        errs.append(f"{key}: face crops {tuple(d['face'].shape[-2:])} not square of face_size {meta.get('face_size')}")
    kp = meta.get("keypoints")
    if kp is None or len(kp.get("body", [])) != t:
        errs.append(f"{key}: json keypoints missing or not {t} frames")
    boxes = meta.get("face_boxes")
    if meta.get("keypoints_available", True) and (boxes is None or len(boxes) != t):
        errs.append(f"{key}: json face_boxes has {len(boxes or [])} rows, want {t}")
    if len(meta.get("frame_indices", [])) != t:
        errs.append(f"{key}: json frame_indices has {len(meta.get('frame_indices', []))} entries, want {t}")
    if "mask" in d and set(np.unique(d["mask"].numpy()).tolist()) - {0.0, 1.0}:
        errs.append(f"{key}: mask is not binary")
    return errs


def contact_row(d: dict, num_frames: int = 4, height: int = 128) -> np.ndarray:
    """reference | frames | pose | face for one decoded sample, uint8 [height, W, 3]."""
    t = d["video"].shape[1]
    picks = np.linspace(0, t - 1, num_frames).round().astype(int)
    video, pose, face = (tensor_to_frames(d[k]) for k in ("video", "pose", "face"))
    ref = tensor_to_frames(d["ref"][:, None])[0]

    def fit(img):
        scale = height / img.shape[0]
        return cv2.resize(img, (max(int(round(img.shape[1] * scale)), 1), height), interpolation=cv2.INTER_AREA)

    gap = np.full((height, 6, 3), 255, np.uint8)
    parts = [fit(ref), gap]
    for group in (video, pose, face):
        parts += [fit(group[i]) for i in picks] + [gap]
    return np.concatenate(parts[:-1], 1)


def _label(img: np.ndarray, text: str) -> np.ndarray:
    bar = np.full((18, img.shape[1], 3), 32, np.uint8)
    cv2.putText(bar, text, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([bar, img], 0)


def inspect_dir(directory, *, sheet: str | None = None, rows: int = 4, frames: int = 4,
                max_samples: int | None = None) -> InspectReport:
    directory = Path(directory)
    rep = InspectReport()
    shards = list_shards(directory)
    rep.shards = len(shards)
    if not shards:
        rep.errors.append(f"{directory}: no shard-*.tar files")
    for tmp in directory.glob("*.tar.tmp"):
        rep.errors.append(f"{tmp.name}: a partial shard is left over (rerun prepare to resume, which removes it)")
    seen: dict[str, str] = {}
    sheet_rows = []
    for shard in shards:
        try:
            samples = read_shard(shard)
        except Exception as e:
            rep.errors.append(f"{shard.name}: not a readable tar ({e})")
            continue
        for raw in samples:
            if max_samples is not None and rep.samples >= max_samples:
                break
            key = raw["__key__"]
            if key in seen:
                rep.errors.append(f"{key}: duplicate sample (in {seen[key]} and {shard.name})")
            seen[key] = shard.name
            rep.samples += 1
            try:
                d = decode_sample(raw)
            except SampleDecodeError as e:
                rep.errors.append(f"{shard.name}: {e}")
                continue
            rep.errors += [f"{shard.name}: {e}" for e in check_sample(d)]
            if len(sheet_rows) < rows:
                sheet_rows.append(_label(contact_row(d, frames), f"{key}  ref | frames | pose | face"))
    manifest = directory / "manifest.json"
    if manifest.is_file() and max_samples is None:
        m = json.loads(manifest.read_text())
        want = m.get("counts", {}).get("clips_written", m.get("counts", {}).get("samples"))
        if want is not None and want != rep.samples:
            rep.errors.append(f"manifest.json counts {want} samples but the shards hold {rep.samples}")
    elif not manifest.is_file():
        rep.warnings.append("no manifest.json")
    if sheet_rows:
        width = max(r.shape[1] for r in sheet_rows)
        sheet_rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in sheet_rows]
        path = Path(sheet) if sheet else directory / "contact_sheet.png"
        cv2.imwrite(str(path), np.concatenate(sheet_rows, 0)[..., ::-1])
        rep.sheet = str(path)
    return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_tools.inspect", description=__doc__.split("\n\n")[0])
    ap.add_argument("directory")
    ap.add_argument("--sheet", default=None, help="contact sheet PNG path (default DIR/contact_sheet.png)")
    ap.add_argument("--rows", type=int, default=4, help="samples on the contact sheet")
    ap.add_argument("--frames", type=int, default=4, help="frames per stream on the contact sheet")
    ap.add_argument("--max-samples", type=int, default=None, help="check only the first N samples")
    args = ap.parse_args(argv)
    rep = inspect_dir(args.directory, sheet=args.sheet, rows=args.rows, frames=args.frames,
                      max_samples=args.max_samples)
    for w in rep.warnings:
        print(f"warning: {w}")
    for e in rep.errors:
        print(f"error: {e}")
    print(f"{'OK' if rep.ok else 'FAILED'}: {rep.samples} samples in {rep.shards} shards, {len(rep.errors)} errors"
          + (f"; contact sheet: {rep.sheet}" if rep.sheet else ""))
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
