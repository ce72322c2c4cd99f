"""Raw videos -> validated webdataset shards.

    python -m data_tools.prepare input=PATH output=DIR [preset=cpu] [fps=30 clip_len=77 target_area=921600
        pose_backend=mediapipe reference_policy=outside replace=false shard_size=32 workers=1 ...]

Per input video ``data_tools.clips.process_input`` does the work. Bad inputs and clips are skipped,
counted and listed with their reasons in ``manifest.json``; a worker killed by the out-of-memory
killer fails only its input; a missing input path stops the job before anything is written. Shards
are written as ``*.tar.tmp`` and renamed when complete; a rerun resumes without duplicating a sample.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import cv2
from tqdm import tqdm

from data_tools.clips import InputResult, estimate_clips, process_input
from data_tools.config import PrepareConfig
from data_tools.pose import get_pose_backend
from data_tools.segment import get_segmenter
from data_tools.shards import ShardWriter
from data_tools.workers import WorkerDied, run_in_workers
from wan_animate.cli import UsageError
from wan_animate.files import atomic_write_json, dumps_strict
from wan_animate.samples import list_shards, shard_index, shard_keys

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
STATE_FILE = "prepare_state.jsonl"


# ---------------------------------------------------------------------------- inputs
class PrepareError(UsageError):
    """A job that cannot start (bad input path, output of another job): one line, exit status 2."""


def list_inputs(path: str | os.PathLike) -> list[Path]:
    """A video file, a folder (searched recursively for video extensions) or a list file
    (.txt/.lst, one path per line, relative to the list's folder; '#' comments). A missing path or
    one with no videos is a ``PrepareError`` (raised before anything is written)."""
    p = Path(path)
    if not p.exists():
        raise PrepareError(f"input={path} does not exist: give a video, a folder of videos or a .txt list of paths")
    if p.is_dir():
        out = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in VIDEO_EXTENSIONS)
        if not out:
            raise PrepareError(f"input={path} holds no videos (searched recursively for {', '.join(VIDEO_EXTENSIONS)})")
        return out
    if p.suffix.lower() in (".txt", ".lst"):
        lines = [line.strip() for line in p.read_text().splitlines()]
        out = [p.parent / line for line in lines if line and not line.startswith("#")]  # an absolute path stays
        if not out:
            raise PrepareError(f"input={path} is a list file with no paths (one video path per line)")
        return out
    return [p]


# ---------------------------------------------------------------------------- workers
_WORKER: dict = {}


def _make_tools(cfg: PrepareConfig):
    backend = get_pose_backend(cfg.pose_backend, **dict(cfg.pose_options))
    segmenter = None
    if cfg.replace or cfg.driving == "appearance":  # both need the character mask
        own = {"path": cfg.sam2_path} if cfg.segmenter == "sam2" else {"threshold": cfg.mask_threshold}
        segmenter = get_segmenter(cfg.segmenter, **own, **dict(cfg.segmenter_options))
    return backend, segmenter


def _worker_init(cfg_dict: dict) -> None:
    # Nothing here may raise: a failing Pool initializer makes the pool respawn workers forever.
    cv2.setNumThreads(1)
    _WORKER["cfg"] = cfg_dict


def _worker_run(args, progress=None) -> InputResult:
    path, done_keys = args
    try:
        if "backend" not in _WORKER:  # created lazily so that a failure is reported, not retried
            _WORKER["cfg"] = PrepareConfig(**_WORKER["cfg"])
            _WORKER["backend"], _WORKER["segmenter"] = _make_tools(_WORKER["cfg"])
        return process_input(path, _WORKER["cfg"], _WORKER["backend"], _WORKER["segmenter"], done_keys, progress)
    except Exception as e:  # never lose the whole job to one input
        return InputResult(input=str(path), reason=f"internal error: {type(e).__name__}: {e}")


# ---------------------------------------------------------------------------- resumable job
def _config_fingerprint(cfg: PrepareConfig) -> str:
    d = {k: v for k, v in asdict(cfg).items() if k not in ("output", "workers", "input")}  # where, not what
    if d.get("driving") == "none":  # outputs made before the option existed stay resumable
        d.pop("driving")
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _read_state(path: Path) -> list[dict]:
    records = []
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill; everything before it is valid
    return records


def _append_state(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(dumps_strict(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def build_manifest(out: Path, cfg: PrepareConfig, records: list[dict], seconds: float, clips_this_run: int) -> dict:
    inputs = [r for r in records if r.get("type") == "input"]
    skipped = [{"input": r["input"], "reason": r["reason"]} for r in inputs if r.get("reason")]
    skipped_clips = [dict(input=r["input"], **c) for r in inputs for c in r.get("skipped_clips", [])]
    totals: dict = {}
    buckets: dict = {}
    for r in inputs:
        for k, v in r.get("stats", {}).items():
            if k == "bucket":
                buckets[v] = buckets.get(v, 0) + len(r.get("keys", []))
            else:
                totals[k] = totals.get(k, 0) + v
    frames = max(totals.get("frames", 0), 1)
    shards = list_shards(out)
    shard_info = [{"name": p.name, "samples": len(shard_keys(p))} for p in shards]
    shares = {"person_frame_share": "person_frames", "face_frame_share": "face_frames",
              "face_box_from_landmarks_share": "face_box_landmarks", "face_box_from_head_points_share": "face_box_head",
              "face_box_filled_share": "face_box_filled", "hand_frame_share": "hand_frames"}
    stats = {
        "frames": totals.get("frames", 0),
        **{name: round(totals.get(count, 0) / frames, 4) for name, count in shares.items()},
        "reference_fallbacks": totals.get("reference_fallbacks", 0),
        "pose_quality_mean": (round(totals["pose_quality_sum"] / totals["pose_quality_clips"], 4)
                              if totals.get("pose_quality_clips") else None),
        "pose_flagged_clips": totals.get("pose_flagged_clips", 0),
        "buckets": buckets,
    }
    if cfg.replace:
        stats["mask_coverage_mean"] = round(totals.get("mask_coverage_sum", 0.0) / frames, 4)
    return {
        "schema_version": 1, "kind": "prepare", "config": asdict(cfg),
        "counts": {
            "inputs": len(inputs), "inputs_processed": len(inputs) - len(skipped), "inputs_skipped": len(skipped),
            "clips_written": sum(s["samples"] for s in shard_info), "clips_skipped": len(skipped_clips),
            "shards": len(shards),
        },
        "skipped_inputs": skipped, "skipped_clips": skipped_clips, "stats": stats, "shards": shard_info,
        "pose_quality": {k: v for r in inputs for k, v in r.get("pose_quality", {}).items()},
        "last_run": {"seconds": round(seconds, 2), "clips": clips_this_run,
                     "clips_per_second": round(clips_this_run / max(seconds, 1e-9), 3)},
    }


def _open_state(out: Path, cfg: PrepareConfig) -> list[dict]:
    """The job's state records (creating the header on a first run); refuses another job's output."""
    state_path = out / STATE_FILE
    fingerprint = _config_fingerprint(cfg)
    records = _read_state(state_path)
    if records and records[0].get("fingerprint") != fingerprint:
        raise PrepareError(f"{out} holds shards made with different options (fingerprint "
                           f"{records[0].get('fingerprint')} != {fingerprint}); use a new output= folder or delete it")
    if not records:
        if list_shards(out):
            raise PrepareError(f"{out} has shards but no {STATE_FILE}; use a new output= folder")
        state_path.write_text("")
        _append_state(state_path, {"type": "header", "fingerprint": fingerprint, "schema_version": 1})
        return _read_state(state_path)
    # Keep only the valid prefix (drop a line cut by a kill).
    state_path.write_text("".join(dumps_strict(r) + "\n" for r in records))
    return records


def prepare(cfg: PrepareConfig, *, progress: bool = True, _worker_fn=None) -> dict:
    """Run (or resume) a prepare job; returns the manifest dict (also written to manifest.json).

    A missing input, or one without videos, raises ``PrepareError`` before anything is written.
    With ``workers`` > 0 each input runs in a spawned worker; a worker that dies (out-of-memory
    killer) fails only the input it was processing. ``_worker_fn`` replaces the worker function
    (tests wrap it to kill a worker)."""
    inputs = [str(p) for p in list_inputs(cfg.input)]
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob("shard-*.tar.tmp"):  # partial shards of a killed run
        tmp.unlink()
    records = _open_state(out, cfg)
    state_path = out / STATE_FILE
    done_inputs = {r["input"] for r in records if r.get("type") == "input"}
    shards = list_shards(out)
    done_keys = frozenset(k for p in shards for k in shard_keys(p))
    start_index = max((shard_index(p) for p in shards), default=-1) + 1
    todo = [p for p in inputs if p not in done_inputs]
    if len(todo) < len(inputs):
        print(f"resuming: {len(inputs) - len(todo)} inputs already done, {len(shards)} shards kept")

    pending: list[tuple[dict, set]] = []  # input records waiting for their samples' shards to complete

    def flush_pending() -> None:
        while pending and not pending[0][1]:
            _append_state(state_path, pending.pop(0)[0])

    def on_shard_done(_path, keys) -> None:
        for _, remaining in pending:
            remaining.difference_update(keys)
        flush_pending()

    started = time.time()
    clips = 0
    writer = ShardWriter(out, shard_size=cfg.shard_size, start_index=start_index, on_shard_done=on_shard_done)
    # Progress in clips (the unit of work), estimated from the headers and corrected per input.
    expected = [estimate_clips(p, cfg) for p in todo] if progress else [0] * len(todo)
    reported = [0] * len(todo)
    bar = tqdm(total=sum(expected), desc="prepare", unit="clip", disable=not progress, dynamic_ncols=True)

    def on_progress(i: int, n: int) -> None:
        reported[i] += n
        bar.update(n)
        bar.set_postfix(clips_written=clips, inputs_done=f"{i}/{len(todo)}")

    def consume(i: int, res: InputResult) -> None:
        nonlocal clips
        record = {"type": "input", "input": res.input, "reason": res.reason, "keys": res.keys,
                  "skipped_clips": res.skipped_clips, "stats": res.stats, "pose_quality": res.pose_quality}
        pending.append((record, {s["__key__"] for s in res.samples}))
        for sample in res.samples:
            writer.write(sample)
            clips += 1
        flush_pending()
        bar.total += reported[i] - expected[i]  # skipped inputs give no clips; estimates are estimates
        bar.set_postfix(clips_written=clips, clips_per_s=f"{clips / max(time.time() - started, 1e-9):.2f}")
        bar.refresh()

    try:
        backend, segmenter = _make_tools(cfg)  # with workers: bad backend options fail here, before any starts
        if cfg.workers == 0:
            for i, p in enumerate(todo):
                try:
                    res = process_input(Path(p), cfg, backend, segmenter, done_keys,
                                        progress=lambda n, i=i: on_progress(i, n))
                except Exception as e:
                    res = InputResult(input=p, reason=f"internal error: {type(e).__name__}: {e}")
                consume(i, res)
        else:
            backend.close()
            if segmenter is not None:
                segmenter.close()
            tasks = [(Path(p), done_keys) for p in todo]
            for i, res in run_in_workers(_worker_fn or _worker_run, tasks, cfg.workers, initializer=_worker_init,
                                         initargs=(asdict(cfg),), on_progress=on_progress):
                if isinstance(res, WorkerDied):
                    res = InputResult(input=todo[i], reason=res.reason)
                elif not isinstance(res, InputResult):  # an exception the worker function let through
                    res = InputResult(input=todo[i], reason=f"internal error: {res}")
                consume(i, res)
        writer.close()
        flush_pending()
    finally:
        bar.close()
    manifest = build_manifest(out, cfg, _read_state(state_path), time.time() - started, clips)
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def _main(cfg: PrepareConfig) -> None:
    m = prepare(cfg)  # a PrepareError is one line and exit status 2 (run_hydra)
    c = m["counts"]
    print(f"{c['clips_written']} clips in {c['shards']} shards at {cfg.output}; inputs: {c['inputs_processed']} "
          f"processed, {c['inputs_skipped']} skipped; clips skipped: {c['clips_skipped']}; "
          f"person on {m['stats']['person_frame_share']:.1%} of frames, face on {m['stats']['face_frame_share']:.1%}")
    for s in m["skipped_inputs"]:
        print(f"  skipped {s['input']}: {s['reason']}")


if __name__ == "__main__":
    from data_tools.config import run_hydra

    run_hydra("prepare", PrepareConfig, _main)
