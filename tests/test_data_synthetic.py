"""Synthetic set: determinism, the schema, and that targets follow reference + pose + face."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wan_animate.samples import SampleDecodeError, decode_sample
from data_tools.inspect import inspect_dir
from wan_animate.samples import list_shards, read_shard
from data_tools.synthetic_data import (
    REST,
    EXPRESSION_LIGHT,
    animation_state,
    character_keypoints,
    draw_character,
    light,
    make_synthetic_dataset,
    random_character,
    synthesize_clip,
)

ROOT = Path(__file__).resolve().parents[1]


def _decoded(d):
    out = []
    for p in list_shards(d):
        for raw in read_shard(p):
            x = decode_sample(raw)
            out.append((x["key"], raw["json"], raw["ref.png"], x["video"], x["pose"], x["face"]))
    return out


def _same(a, b):
    return len(a) == len(b) and all(
        x[:3] == y[:3] and all(bool((u == v).all()) for u, v in zip(x[3:], y[3:])) for x, y in zip(a, b))


def test_synthetic_is_deterministic_by_seed(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", num_clips=3, clip_len=9, seed=7, shard_size=2)
    b = make_synthetic_dataset(tmp_path / "b", num_clips=3, clip_len=9, seed=7, shard_size=2)
    c = make_synthetic_dataset(tmp_path / "c", num_clips=3, clip_len=9, seed=8, shard_size=2)
    assert len(list_shards(a)) == 2
    # Identical decoded streams and metadata. (Videos are lossless H.264, so decoded frames are
    # exact even though multi-threaded x264 may order its bitstream differently run to run.)
    assert _same(_decoded(a), _decoded(b))
    assert not _same(_decoded(a), _decoded(c))
    m = json.loads((a / "manifest.json").read_text())
    assert m["counts"]["samples"] == 3 and m["face_size"] == 64


def test_synthetic_schema_and_inspect(tmp_path):
    out = make_synthetic_dataset(tmp_path / "s", num_clips=4, clip_len=17, height=64, width=96, face_size=32,
                                 shard_size=3, replace=True)
    rep = inspect_dir(out)
    assert rep.ok, rep.errors
    assert rep.samples == 4 and rep.shards == 2
    d = decode_sample(read_shard(list_shards(out)[0])[0])
    assert d["video"].shape == (3, 17, 64, 96) and d["pose"].shape == d["video"].shape
    assert d["face"].shape == (3, 17, 32, 32) and d["ref"].shape == (3, 64, 96)
    assert d["mask"].shape == (1, 17, 64, 96) and 0.03 < d["mask"].mean() < 0.6
    assert d["video"].min() >= -1 and d["video"].max() <= 1
    assert d["meta"]["schema_version"] == 1 and d["meta"]["face_size"] == 32
    assert len(d["meta"]["face_boxes"]) == 17 and d["caption"]


def test_target_is_a_function_of_reference_pose_and_face():
    frames, pose, ref, masks, ch = synthesize_clip(0, 0, 17, 64, 64)
    # frames move (pose changes) ...
    assert np.abs(frames[0].astype(int) - frames[8].astype(int)).mean() > 1.0
    # ... and redrawing from the keypoints + appearance reproduces them exactly
    for t in (0, 5, 16):
        body, _, _, _, geo = character_keypoints(ch, animation_state(ch, t, 17), 64, 64)
        np.testing.assert_allclose(body, pose.body[t])
        unlit, _ = draw_character(ch, body, geo, 64, 64)
        np.testing.assert_array_equal(light(unlit, animation_state(ch, t, 17)), frames[t])
    # the reference shows the same character (same colours) in its rest pose, unlit (mouth closed)
    assert set(map(tuple, ref.reshape(-1, 3))) & set(map(tuple, unlit.reshape(-1, 3))) >= {ch.background}
    assert REST.mouth_open == 0 and np.array_equal(light(ref, REST), ref)
    # the light follows the mouth: every pixel moves by EXPRESSION_LIGHT x the opening (clipped to 0..255)
    mouth = [animation_state(ch, t, 17).mouth_open for t in range(17)]
    lo, hi = int(np.argmin(mouth)), int(np.argmax(mouth))
    assert mouth[hi] - mouth[lo] > 0.5
    red = frames[..., 0].astype(float).mean(axis=(1, 2))
    assert red[hi] - red[lo] > 0.3 * EXPRESSION_LIGHT[0] * (mouth[hi] - mouth[lo])
    # eyes blink: the eye landmarks close on blink frames
    blink = [t for t in range(17) if animation_state(ch, t, 17).eye_open == 0]
    open_ = [t for t in range(17) if animation_state(ch, t, 17).eye_open == 1]
    eye_h = lambda t: np.ptp(pose.face[t, 36:42, 1])  # noqa: E731
    assert blink and max(eye_h(t) for t in blink) < 0.5 * min(eye_h(t) for t in open_)
    # different seeds give different characters
    assert random_character(np.random.default_rng([0, 0])) != random_character(np.random.default_rng([1, 0]))
    assert REST.eye_open == 1


def test_synthetic_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "data_tools.synthetic", f"output={tmp_path / 'x'}", "num_clips=2",
                        "clip_len=5", "shard_size=2"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(list_shards(tmp_path / "x")) == 1
    bad = subprocess.run([sys.executable, "-m", "data_tools.synthetic", f"output={tmp_path / 'y'}", "height=50"],
                         cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert bad.returncode == 2 and "multiples of 16" in bad.stderr


def test_decode_sample_errors_name_the_key(tmp_path):
    out = make_synthetic_dataset(tmp_path / "s", num_clips=2, clip_len=9, shard_size=2)
    a, b = read_shard(list_shards(out)[0])
    broken = dict(a, **{"pose.mp4": b"not a video"})
    with pytest.raises(SampleDecodeError, match=a["__key__"] + ".*pose.mp4"):
        decode_sample(broken)
    short = make_synthetic_dataset(tmp_path / "t", num_clips=1, clip_len=5, shard_size=1)
    other = read_shard(list_shards(short)[0])[0]
    mixed = dict(a, **{"face.mp4": other["face.mp4"]})
    with pytest.raises(SampleDecodeError, match="face.mp4 has 5 frames but mp4 has 9"):
        decode_sample(mixed)
    missing = {k: v for k, v in a.items() if k != "ref.png"}
    with pytest.raises(SampleDecodeError, match="missing field 'ref.png'"):
        decode_sample(missing)
    # a valid sample decodes
    assert decode_sample(b)["video"].shape[1] == 9


def test_inspect_cli_flags_broken_shards(tmp_path, capsys):
    from data_tools.inspect import main
    from data_tools.shards import ShardWriter

    good = make_synthetic_dataset(tmp_path / "good", num_clips=2, clip_len=5, shard_size=2)
    assert main([str(good), "--rows", "1"]) == 0
    assert (good / "contact_sheet.png").is_file()
    # negative controls: a stream that does not decode, a duplicate key, a partial shard
    bad = tmp_path / "bad"
    a, b = read_shard(list_shards(good)[0])
    with ShardWriter(bad, shard_size=3) as w:
        w.write(dict(a, **{"mp4": b"garbage"}))
        w.write(b)
    with ShardWriter(bad, shard_size=1, start_index=1) as w:
        w.write(b)
    (bad / "shard-000002.tar.tmp").write_bytes(b"")
    capsys.readouterr()
    assert main([str(bad)]) == 1
    out = capsys.readouterr().out
    assert "does not decode" in out and "duplicate sample" in out and "partial shard" in out


# ---------------------------------------------------------------------------------------------
# cached shards in inspect / decode, json faults, paged contact sheets
# ---------------------------------------------------------------------------------------------
def _cached_set(root, n=3, broken=None):
    """A hand-made cached set (the layout cache_latents writes): latents + face.mp4 + json per
    sample, text embeddings at the root. ``broken``: index of a sample with wrong ref latents."""
    import torch
    from safetensors.torch import save, save_file

    from data_tools.shards import ShardWriter
    from wan_animate.video_io import encode_video_bytes

    root.mkdir(parents=True)
    save_file({"t0": torch.zeros(8, 4), "t1": torch.ones(8, 4)}, str(root / "text_embeds.safetensors"),
              metadata={"captions": json.dumps({"t0": "", "t1": "a person"})})
    with ShardWriter(root, shard_size=2, mtime=0) as w:
        for i in range(n):
            lat = {"target": torch.randn(16, 3, 4, 6), "pose": torch.randn(16, 3, 4, 6),
                   "ref": torch.randn(16, 1, 4, 6 if i != broken else 5), "clip": torch.randn(257, 8),
                   "cond_r0": torch.randn(16, 3, 4, 6)}
            meta = {"schema_version": 1, "num_frames": 9, "height": 32, "width": 48, "face_size": 16,
                    "text_key": "t1", "empty_text_key": "t0", "caption": "a person", "replace": False}
            w.write({"__key__": f"c{i}", "latents.safetensors": save(lat),
                     "face.mp4": encode_video_bytes(np.full((9, 16, 16, 3), 40 * i, np.uint8), 30),
                     "json": json.dumps(meta).encode()})
    return root


def test_cached_shards_are_detected_and_validated(tmp_path):
    from wan_animate.samples import decode_cached_sample, shard_kind

    good = _cached_set(tmp_path / "good")
    rep = inspect_dir(good, rows=2)
    assert rep.ok and rep.kind == "cached" and rep.samples == 3, rep.errors
    assert len(rep.sheets) == 2  # 3 samples, 2 per page: every sample is drawn
    bad = _cached_set(tmp_path / "bad", broken=1)
    rep = inspect_dir(bad)
    assert rep.errors == ["shard-000000.tar: c1: ref latents (16, 1, 4, 5), want (16, 1, 4, 6)"]
    # the raw reader names the fix instead of "missing field 'mp4'", and the reverse
    cached_raw = read_shard(list_shards(good)[0])[0]
    with pytest.raises(SampleDecodeError, match="these are cached shards.*use data=cached"):
        decode_sample(cached_raw)
    raw = read_shard(list_shards(make_synthetic_dataset(tmp_path / "raw", num_clips=1, clip_len=5))[0])[0]
    with pytest.raises(SampleDecodeError, match="raw schema-v1 shards.*use data=shards"):
        decode_cached_sample(raw, {})
    assert shard_kind(list_shards(good)[0]) == "cached" and shard_kind(list_shards(tmp_path / "raw")[0]) == "raw"


def test_json_faults_are_decode_errors(tmp_path):
    d = make_synthetic_dataset(tmp_path / "s", num_clips=1, clip_len=5)
    raw = read_shard(list_shards(d)[0])[0]
    meta = json.loads(raw["json"])
    cases = {b"[1, 2]": "is a list, not an object", b"{not json": "not valid JSON",
             json.dumps(dict(meta, num_frames="5")).encode(): "'num_frames' is '5' \\(str\\), expected int"}
    for data, msg in cases.items():
        with pytest.raises(SampleDecodeError, match=msg):
            decode_sample(dict(raw, json=data))
    with pytest.raises(SampleDecodeError, match="missing field 'json'"):
        decode_sample({k: v for k, v in raw.items() if k != "json"})
    assert decode_sample(raw)["meta"]["num_frames"] == 5  # negative control


def test_contact_sheet_covers_every_sample_in_pages(tmp_path):
    from PIL import Image

    d = make_synthetic_dataset(tmp_path / "s", num_clips=5, clip_len=5, shard_size=2)
    rep = inspect_dir(d, rows=2)
    assert rep.ok and rep.samples == 5
    assert [Path(p).name for p in rep.sheets] == ["contact_sheet.png", "contact_sheet-2.png", "contact_sheet-3.png"]
    heights = [np.asarray(Image.open(p)).shape[0] for p in rep.sheets]
    row = heights[-1]  # the last page holds the fifth sample alone
    assert heights == [2 * row, 2 * row, row]
