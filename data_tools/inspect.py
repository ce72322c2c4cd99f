"""Validate shards (raw schema v1 / v2 or cached latents) and draw contact sheets a person can look at.

    python -m data_tools.inspect DIR [--sheet PATH] [--rows 12] [--frames 4] [--max-samples N]
        [--min-pose-quality 0.8]

What is checked (docs/data.md): every stream decodes and agrees in frames and size with the json
(raw), the latents agree with each other and the json and the prompt embeddings exist (cached);
unique keys, no partial ``*.tar.tmp``, the manifest's count. Raw keypoints get a pose-quality score
(a warning when flagged, an error below ``--min-pose-quality``). The contact sheet draws every
sample, ``--rows`` per page. Exit status 1 when anything is wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from data_tools.pose.format import PoseSequence
from data_tools.pose.quality import describe_pose_quality, pose_quality
from wan_animate.samples import (TEXT_EMBEDS, SampleDecodeError, decode_cached_sample, decode_sample, list_shards,
                                 load_text_embeds, read_shard, shard_kind)
from wan_animate.video_io import tensor_to_frames
from wan_animate.cli import run_tool


@dataclass
class InspectReport:
    samples: int = 0
    shards: int = 0
    kind: str = "raw"  # raw | cached
    errors: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    sheet: str | None = None  # the first page
    sheets: list = field(default_factory=list)  # every page
    pose_scores: dict = field(default_factory=dict)  # sample key -> pose-quality score (raw samples)

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


# A driving video this close to its target (mean absolute difference, in [-1, 1] pixel units) is a
# copy: trained on it, a model learns to copy the driving frames instead of animating the reference.
DRIVING_COPY_THRESHOLD = 0.02


def check_driving(d: dict) -> list[str]:
    """Warnings about the version-2 driving stream of one decoded raw sample (its shape is checked
    by the decoder): a driving video that equals the target."""
    if "driving" not in d:
        return []
    diff = float((d["driving"] - d["video"]).abs().mean())
    if diff < DRIVING_COPY_THRESHOLD:
        return [f"{d['key']}: driving.mp4 is nearly the target clip (mean |difference| {diff:.4f}); training on it "
                f"teaches copying: make the driving video with another appearance (docs/data.md)"]
    return []


def check_cached_sample(d: dict) -> list[str]:
    """Shape agreement of one decoded cached sample (``decode_cached_sample`` output)."""
    key, meta = d["key"], d["meta"]
    errs = []
    target = d["target"]
    if target.ndim != 4:
        return [f"{key}: target latents {tuple(target.shape)} are not [C, T, h, w]"]
    c, t_lat, lh, lw = target.shape
    t = meta.get("num_frames")
    if t is not None and t_lat != (t - 1) // 4 + 1:
        errs.append(f"{key}: {t_lat} latent frames for {t} pixel frames, want {(t - 1) // 4 + 1}")
    if meta.get("height") is not None and (lh * 8, lw * 8) != (meta["height"], meta["width"]):
        errs.append(f"{key}: latents {lh}x{lw} do not match json size {meta['height']}x{meta['width']} (/8)")
    if tuple(d["ref"].shape) != (c, 1, lh, lw):
        errs.append(f"{key}: ref latents {tuple(d['ref'].shape)}, want {(c, 1, lh, lw)}")
    for name, v in d.items():
        if name.startswith("cond_") and tuple(v.shape)[-2:] != (lh, lw):
            errs.append(f"{key}: {name} latents {tuple(v.shape)} differ in size from target {lh}x{lw}")
    _, tf, fh, fw = d["face"].shape
    if fh != fw or (t is not None and tf != t):
        errs.append(f"{key}: face video {tf} frames of {fh}x{fw}, want {t} square frames")
    if meta.get("replace") and "char_mask" not in d:
        errs.append(f"{key}: replace-mode sample without char_mask")
    if meta.get("schema_version") == 2 and "driving" not in d:
        errs.append(f"{key}: a version-2 sample cached without driving latents (re-run cache_latents)")
    return errs


def _fit(img: np.ndarray, height: int) -> np.ndarray:
    scale = height / img.shape[0]
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST
    return cv2.resize(img, (max(int(round(img.shape[1] * scale)), 1), height), interpolation=interp)


def _strip(groups: list[list[np.ndarray]], height: int) -> np.ndarray:
    gap = np.full((height, 6, 3), 255, np.uint8)
    parts = [part for group in groups for part in (*(_fit(img, height) for img in group), gap)]
    return np.concatenate(parts[:-1], 1)  # a gap between groups


def contact_row(d: dict, num_frames: int = 4, height: int = 128) -> np.ndarray:
    """reference | frames | pose | face [| driving] for one decoded raw sample, uint8 [height, W, 3]."""
    t = d["video"].shape[1]
    picks = np.linspace(0, t - 1, num_frames).round().astype(int)
    streams = ("video", "pose", "face", "driving") if "driving" in d else ("video", "pose", "face")
    ref = tensor_to_frames(d["ref"][:, None])[0]
    return _strip([[ref], *(list(tensor_to_frames(d[k])[picks]) for k in streams)], height)


def _latent_image(lat) -> np.ndarray:
    """Channels 0-2 of one latent frame ``[C, h, w]`` as an RGB image (each channel min-max scaled)."""
    x = lat[:3].float().numpy()
    lo, hi = x.min(axis=(1, 2), keepdims=True), x.max(axis=(1, 2), keepdims=True)
    return np.ascontiguousarray(((x - lo) / np.maximum(hi - lo, 1e-6) * 255).round().astype(np.uint8).transpose(1, 2, 0))


def cached_contact_row(d: dict, num_frames: int = 4, height: int = 128) -> np.ndarray:
    """target latents | pose latents | face for one decoded cached sample."""
    t_lat, t = d["target"].shape[1], d["face"].shape[1]
    lat_picks = np.linspace(0, t_lat - 1, min(num_frames, t_lat)).round().astype(int)
    picks = np.linspace(0, t - 1, num_frames).round().astype(int)
    face = tensor_to_frames(d["face"])
    return _strip([[_latent_image(d["target"][:, j]) for j in lat_picks],
                   [_latent_image(d["pose"][:, j]) for j in lat_picks], [face[i] for i in picks]], height)


def _label(img: np.ndarray, text: str) -> np.ndarray:
    bar = np.full((18, img.shape[1], 3), 32, np.uint8)
    cv2.putText(bar, text, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([bar, img], 0)


class _Sheets:
    """Pages of ``rows`` labelled rows: ``base``, then ``base-2``, ``base-3``, ..."""

    def __init__(self, base: Path, rows: int):
        self.base, self.rows, self.page, self.paths = base, max(rows, 1), [], []

    def add(self, row: np.ndarray) -> None:
        self.page.append(row)
        if len(self.page) >= self.rows:
            self.flush()

    def flush(self) -> None:
        if not self.page:
            return
        n = len(self.paths) + 1
        path = self.base if n == 1 else self.base.with_name(f"{self.base.stem}-{n}{self.base.suffix}")
        width = max(r.shape[1] for r in self.page)
        rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in self.page]
        cv2.imwrite(str(path), np.concatenate(rows, 0)[..., ::-1])
        self.paths.append(str(path))
        self.page = []


def _pose_check(d: dict, rep: InspectReport, where: str, min_quality: float) -> str:
    """Score the sample's keypoints; returns the contact-sheet label part."""
    meta = d["meta"]
    if not meta.get("keypoints_available", True) or not meta.get("keypoints"):
        return ""
    try:
        q = pose_quality(PoseSequence.from_dict(meta["keypoints"]))
    except Exception as e:  # malformed keypoints are reported by check_sample's length checks too
        rep.errors.append(f"{where}: {d['key']}: keypoints do not load ({type(e).__name__}: {e})")
        return ""
    rep.pose_scores[d["key"]] = q["score"]
    if q["score"] < min_quality:
        rep.errors.append(f"{where}: {d['key']}: {describe_pose_quality(q)} < --min-pose-quality {min_quality}")
    elif q["flags"]:
        rep.warnings.append(f"{where}: {d['key']}: {describe_pose_quality(q)}")
    return f"  pose {q['score']:.2f}"


def inspect_dir(directory, *, sheet: str | None = None, rows: int = 12, frames: int = 4,
                max_samples: int | None = None, min_pose_quality: float = 0.0) -> InspectReport:
    directory = Path(directory)
    rep = InspectReport()
    shards = list_shards(directory)
    rep.shards = len(shards)
    if not shards:
        rep.errors.append(f"{directory}: no shard-*.tar files")
    for tmp in directory.glob("*.tar.tmp"):
        rep.errors.append(f"{tmp.name}: a partial shard is left over (rerun prepare to resume, which removes it)")
    if shards:
        try:
            rep.kind = "cached" if shard_kind(shards[0]) == "cached" else "raw"
        except Exception as e:
            rep.errors.append(f"{shards[0].name}: not a readable tar ({e})")
    if rep.kind == "cached":
        if (directory / TEXT_EMBEDS).is_file():
            embeds, _ = load_text_embeds(directory / TEXT_EMBEDS)
        else:
            rep.errors.append(f"cached shards without {TEXT_EMBEDS} at {directory}: copy it from the cache_latents "
                              f"output folder")
            embeds = {}
    sheets = _Sheets(Path(sheet) if sheet else directory / "contact_sheet.png", rows)
    seen: dict[str, str] = {}
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
                d = decode_cached_sample(raw, embeds) if rep.kind == "cached" else decode_sample(raw)
            except SampleDecodeError as e:
                rep.errors.append(f"{shard.name}: {e}")
                continue
            if rep.kind == "cached":
                rep.errors += [f"{shard.name}: {e}" for e in check_cached_sample(d)]
                sheets.add(_label(cached_contact_row(d, frames), f"{key}  target latents | pose latents | face"))
            else:
                rep.errors += [f"{shard.name}: {e}" for e in check_sample(d)]
                rep.warnings += [f"{shard.name}: {w}" for w in check_driving(d)]
                score = _pose_check(d, rep, shard.name, min_pose_quality)
                tail = " | driving" if "driving" in d else ""
                sheets.add(_label(contact_row(d, frames), f"{key}{score}  ref | frames | pose | face{tail}"))
    sheets.flush()
    rep.sheets = sheets.paths
    rep.sheet = sheets.paths[0] if sheets.paths else None
    _check_manifest(directory, rep, max_samples)
    return rep


def _check_manifest(directory: Path, rep: InspectReport, max_samples: int | None) -> None:
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        rep.warnings.append("no manifest.json")
        return
    if max_samples is not None:
        return
    m = json.loads(manifest.read_text())
    counts = m.get("counts", {})
    want = counts.get("clips_written", counts.get("samples"))
    if want is not None and want != rep.samples:
        rep.errors.append(f"manifest.json counts {want} samples but the shards hold {rep.samples}")


def main(argv=None) -> int:
    return run_tool(_main, argv)


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_tools.inspect", description=__doc__.split("\n\n")[0])
    ap.add_argument("directory")
    ap.add_argument("--sheet", default=None, help="first contact sheet page (default DIR/contact_sheet.png)")
    ap.add_argument("--rows", type=int, default=12, help="samples per contact sheet page (every sample is drawn)")
    ap.add_argument("--frames", type=int, default=4, help="frames per stream on the contact sheet")
    ap.add_argument("--max-samples", type=int, default=None, help="check only the first N samples")
    ap.add_argument("--min-pose-quality", type=float, default=0.0,
                    help="pose-quality score below which a sample is an error (flagged ones are always warnings)")
    args = ap.parse_args(argv)
    rep = inspect_dir(args.directory, sheet=args.sheet, rows=args.rows, frames=args.frames,
                      max_samples=args.max_samples, min_pose_quality=args.min_pose_quality)
    for w in rep.warnings:
        print(f"warning: {w}")
    for e in rep.errors:
        print(f"error: {e}")
    pages = f"; contact sheet: {rep.sheet}" + (f" (+{len(rep.sheets) - 1} pages)" if len(rep.sheets) > 1 else "")
    print(f"{'OK' if rep.ok else 'FAILED'}: {rep.samples} {rep.kind} samples in {rep.shards} shards, "
          f"{len(rep.errors)} errors" + (pages if rep.sheet else ""))
    if rep.pose_scores:
        scores = list(rep.pose_scores.values())
        print(f"pose quality: mean {np.mean(scores):.2f}, min {min(scores):.2f}, "
              f"{sum(s < 1.0 for s in scores)} of {len(scores)} samples with flagged frames")
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
