"""Generate one Wan-Animate video from the command line.

    python -m eval.generate --model DIR --ref IMAGE --pose POSE.mp4 --face FACE.mp4 --out OUT.mp4
    python -m eval.generate --model DIR --preprocessed SRC_DIR --out OUT.mp4      # src_ref.png, src_pose.mp4, ...
    python -m eval.generate --model DIR --ref IMAGE --driving RAW.mp4 --out OUT.mp4 [--replace] [--retarget]
    python -m eval.generate --model A2_DIR --ref IMAGE --driving-video RAW.mp4 --out OUT.mp4 [--distilled]

The model family is detected from the folder's DiT tensor names: Wan-Animate-14B takes pose + face
streams (``--pose/--face``, ``--preprocessed`` or ``--driving`` with pose preprocessing);
Wan-Animate-2 takes the raw driving video (``--driving-video``, resized to ``--target-area``; no pose
or face extraction) and its own sampling defaults (81-frame segments, Euler, 40 steps, CFG 3.0 with
the official block skip; ``--distilled``: 10 steps, no CFG, the distilled score modification).

Replace mode: add ``--bg BG.mp4 --mask MASK.mp4`` (or a preprocessed folder with ``src_bg.mp4`` and
``src_mask.mp4``). Every input is read and checked before any model weight is loaded. The output
is H.264 at the driving video's fps with exactly as many frames as the driving video.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from wan_animate.cli import run_tool
from wan_animate.config import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, dit_forward_flops
from wan_animate.family import family_of, get_family
from wan_animate.geometry import area_bucket
from wan_animate.lora import LoraError, RELIGHT_FILE, apply_relighting_lora, read_lora
from wan_animate.options import DTYPE_CHOICES, SOLVERS, parse_dtype, resolve_device
from wan_animate.pipeline import InputError, NonFiniteOutputError, check_sampling, num_segments
from wan_animate.video_io import VideoDecodeError, probe_video, write_video
from wan_animate.weights.files import WeightsFileError


class CliError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (diffusers or official layout)")
    p.add_argument("--out", required=True, help="output .mp4")
    src = p.add_argument_group("inputs")
    src.add_argument("--ref", help="reference (character) image")
    src.add_argument("--pose", help="pose skeleton video")
    src.add_argument("--face", help="face crop video (same length as --pose)")
    src.add_argument("--bg", help="background video (replace mode)")
    src.add_argument("--mask", help="character mask video, white on the character (replace mode)")
    src.add_argument("--preprocessed", help="folder with src_ref.png, src_pose.mp4, src_face.mp4 "
                     "[, src_bg.mp4, src_mask.mp4]")
    src.add_argument("--driving", help="raw driving video, preprocessed with data_tools.preprocess_driving")
    src.add_argument("--replace", action="store_true", help="with --driving: replace mode")
    src.add_argument("--retarget", action="store_true", help="with --driving: retarget the pose")
    src.add_argument("--work-dir", help="with --driving: keep the preprocessed streams here")
    src.add_argument("--driving-fps", type=float, default=30.0, help="with --driving: resample to this fps "
                     "(official 30; -1 keeps the source)")
    src.add_argument("--pose-backend", default="mediapipe", help="with --driving: pose estimator")
    src.add_argument("--max-frames", type=int, default=None, help="with --driving: keep the first N frames")
    src.add_argument("--target-area", type=int, default=1280 * 720,
                     help="with --driving / --driving-video: output pixel area (official 1280*720; sides floored to x16)")
    src.add_argument("--driving-video", help="Animate-2 models: the raw driving video (attended in context, "
                     "no preprocessing)")
    g = p.add_argument_group("sampling")
    g.add_argument("--prompt", default=None, help="text prompt (default: the official one)")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--steps", type=int, default=None, help="default 20 (Animate-2: 40, distilled 10)")
    g.add_argument("--shift", type=float, default=5.0)
    g.add_argument("--guide-scale", type=float, default=None, help="default 1.0 (Animate-2: 3.0, distilled 1.0)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--solver", default=None, choices=list(SOLVERS), help="default unipc (Animate-2: euler)")
    g.add_argument("--clip-len", type=int, default=None, help="default 77 (Animate-2: 81)")
    g.add_argument("--refert-num", type=int, default=1)
    g.add_argument("--distilled", action="store_true",
                   help="Animate-2 distilled checkpoint: 10 steps, no CFG, log_scale -1.3 on the first frame's keys")
    m = p.add_argument_group("model")
    m.add_argument("--lora", action="append", default=[], help="LoRA file (repeatable)")
    m.add_argument("--lora-scale", type=float, action="append", default=[], help="scale per --lora (default 1.0)")
    m.add_argument("--relight", nargs="?", const="", default=None, metavar="PATH",
                   help="replace mode: apply the official relighting LoRA (default PATH: MODEL/relighting_lora.ckpt)")
    m.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_CHOICES],
                   help="DiT/encoder dtype; auto = bfloat16 on CUDA, float32 on CPU")
    m.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto = cuda if available)")
    m.add_argument("--offload", action="store_true", help="park the encoders on the CPU between uses")
    m.add_argument("--vae-tiling", action="store_true", help="tiled VAE decode (720p on small GPUs)")
    m.add_argument("--no-progress", action="store_true")
    m.add_argument("--debug", action="store_true", help="show the traceback of an expected error (bad input, LoRA, checkpoint)")
    m.add_argument("--sequence-parallel", type=int, default=1, metavar="N",
                   help="split every denoising step over N processes (torchrun --nproc_per_node N); "
                        "same video as 1 process, rank 0 writes it")
    return p


# ---------------------------------------------------------------------------- the model family's inputs

# The flags that give each ``generate`` input video (the pose preprocessing gives pose and face; --replace
# and --relight belong to replace mode's bg); a flag of a video the family's pipeline does not take is refused.
FLAGS = {"pose": ("pose", "preprocessed", "driving", "retarget"), "face": ("face",), "bg": ("bg", "replace", "relight"),
         "mask": ("mask",), "driving": ("driving_video",)}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _flag_error(e: Exception) -> CliError:
    """A library error ("clip_len=8 ...") in command-line spelling ("--clip-len 8 ...")."""
    return CliError(re.sub(r"\b(steps|shift|guide_scale|solver|clip_len|refert_num|device)=",
                           lambda m: _flag(m.group(1)) + " ", str(e)))


def _need_file(path: str | Path, what: str) -> Path:
    if not Path(path).is_file():
        raise CliError(f"{what} {path} does not exist.")
    return Path(path)


def _model_family(model: str) -> str:
    """The ``model.family`` of the model folder, from its DiT's tensor names (headers only)."""
    return family_of(model).name


def _apply_family(args, family) -> None:
    """Refuse the flags of another family's inputs; fill the sampling flags left unset with the
    family's defaults (the family's own extra ``generate`` settings go to ``args.family_settings``)."""
    pipe = family.pipeline_class
    given = [_flag(d) for video, dests in FLAGS.items() if video not in pipe.input_videos
             for d in dests if getattr(args, d)]
    if given:
        takes = " ".join(_flag(FLAGS[v][0]) for v in pipe.input_videos)
        raise CliError(f"{args.model} is a model.family={family.name} model: it takes --ref and {takes}, not "
                       f"{', '.join(given)}.")
    if args.sequence_parallel > 1 and not pipe.sequence_parallel:
        raise CliError(f"--sequence-parallel is not available for model.family={family.name} generation yet; "
                       "run one process.")
    try:
        defaults = pipe.sampling_defaults(args.distilled)
    except InputError as e:
        raise CliError(f"--distilled: {e}") from None
    args.family_settings = {k: v for k, v in defaults.items() if not hasattr(args, k)}
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def _check_sampling_args(args) -> None:
    """The sampling flags, checked before any preprocessing or model work."""
    try:
        check_sampling(steps=args.steps, shift=args.shift, guide_scale=args.guide_scale, solver=args.solver,
                       clip_len=args.clip_len, refert_num=args.refert_num)
    except InputError as e:
        raise _flag_error(e) from None
    if args.refert_num not in (1, 5):
        raise CliError(f"--refert-num {args.refert_num} must be 1 or 5 and below --clip-len {args.clip_len}.")
    bad = [v for v in args.lora_scale if not math.isfinite(v)]
    if bad:
        raise CliError(f"--lora-scale {bad[0]} must be a finite number (1.0: the LoRA as trained).")


# Rough sustained DiT throughput for the cost estimate (FLOP/s): bf16 on a datacentre GPU at
# ~40 % utilisation, float32 on a few CPU cores. An order of magnitude, not a promise.
ASSUMED_FLOPS = {"cuda": 3e14, "cpu": 1e11}


def estimate_cost(args, num_frames: int, height: int, width: int, dit_config=None) -> str:
    """What generating ``num_frames`` frames at ``height`` x ``width`` will cost: segments x steps
    (x2 with guidance) DiT calls of ``tokens`` each, and a rough time from the DiT's FLOP count
    (``wan_animate.config.dit_forward_flops``) at ``ASSUMED_FLOPS``."""
    segments = num_segments(num_frames, args.clip_len, args.refert_num)
    calls = segments * args.steps * (2 if args.guide_scale > 1 else 1)
    latent_frames = (args.clip_len - 1) // 4 + 1 + 1  # + the reference latent
    tokens = latent_frames * (height // 16) * (width // 16)  # VAE /8, patch 2x2
    text = (f"{num_frames} frames at {width}x{height} -> {segments} segment(s) of {args.clip_len} frames x "
            f"{args.steps} steps{' x 2 (guidance)' if args.guide_scale > 1 else ''} = {calls} DiT calls of "
            f"{tokens:,} tokens")
    if dit_config is not None:
        flops = calls * dit_forward_flops(dit_config, (latent_frames, height // 8, width // 8))
        device = "cuda" if resolve_device(args.device).type == "cuda" else "cpu"  # _main checked --device
        seconds = flops / ASSUMED_FLOPS[device]
        duration = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 \
            else f"{seconds / 3600:.1f} h"
        text += (f"; roughly {duration} of DiT compute on {device} (~{flops / 1e12:,.0f} TFLOP at an "
                 f"assumed {ASSUMED_FLOPS[device] / 1e12:g} TFLOP/s; VAE and encoders extra)")
    return text


def _dit_config(family, model: str):
    """The DiT config from the model folder's config.json (no weights read), or None if unreadable."""
    try:
        return family.config(folder=family.dit_path(model))[0]
    except (OSError, ValueError, RuntimeError) as e:  # CheckpointError is a RuntimeError; no time then
        print(f"note: no time estimate ({e})", file=sys.stderr)
        return None


@contextlib.contextmanager
def _frames_bar(desc: str, total: int, enabled: bool):
    """A bar of pose-estimated frames; yields ``preprocess_driving``'s ``progress(done, total)`` hook
    (None when disabled); ``total`` starts as the header's estimate and becomes exact."""
    with tqdm(desc=desc, total=total, unit="frame", disable=not enabled) as bar:
        def progress(done: int, frames: int) -> None:
            bar.total = frames
            bar.update(done - bar.n)

        yield progress if enabled else None


def _run_preprocess(args, family, out: Path) -> Path:
    """``--driving``: raw video -> official src_* files in ``out`` via data_tools.driving."""
    try:
        from data_tools.driving import preprocess_driving
    except ImportError as e:
        raise CliError(f"--driving needs data_tools.driving, which failed to import ({e}); "
                       "preprocess the video yourself and pass --preprocessed DIR.") from None
    if not args.ref:
        raise CliError("--driving needs --ref IMAGE (the character to animate).")
    video, ref = _need_file(args.driving, "driving video"), _need_file(args.ref, "reference image")
    try:  # header and first frame only: fail on an undecodable file before any pose model starts
        info = probe_video(video)
    except VideoDecodeError as e:
        raise CliError(f"driving video: {e}") from None
    frames = info.num_frames if args.driving_fps == -1 else int(info.num_frames * args.driving_fps / info.fps)
    frames = max(1, min(frames, args.max_frames) if args.max_frames else frames)
    height, width = area_bucket(info.height, info.width, args.target_area)
    print(f"cost: {estimate_cost(args, frames, height, width, _dit_config(family, args.model))}. Smaller: "
          "--max-frames N, --target-area (e.g. 65536), --steps, --clip-len (docs/inference.md, CPU-sized "
          "settings).", file=sys.stderr)
    print(f"preprocessing {video} -> {out} (pose backend {args.pose_backend})", file=sys.stderr)
    try:
        with _frames_bar(f"preprocessing {video.name}: pose ({args.pose_backend})", frames,
                         not args.no_progress) as progress:
            preprocess_driving(video, ref, out, retarget=args.retarget, replace=args.replace,
                               fps=args.driving_fps, pose_backend=args.pose_backend,
                               max_frames=args.max_frames, target_area=args.target_area, progress=progress)
    except (OSError, ValueError, RuntimeError) as e:
        raise CliError(f"preprocessing {video} failed: {e}") from None
    return out


def gather_inputs(args, family, work_dir: str | None = None) -> dict:
    """Read and check every input through the family's pipeline; returns generate() kwargs plus
    the output fps. ``--driving`` writes its preprocessed streams to ``--work-dir`` (kept) or
    ``work_dir`` (the caller's temporary folder)."""
    pipe = family.pipeline_class
    streams = " ".join(_flag(FLAGS[s][0]) for s in family.streams)
    own = [getattr(args, FLAGS[v][0]) for v in pipe.input_videos]
    if sum([bool(args.preprocessed), bool(args.driving), any(own)]) != 1:
        raise CliError(f"give exactly one input source: {streams} (+ --ref)"
                       + (", --preprocessed DIR, or --driving VIDEO." if "pose" in pipe.input_videos else "."))
    if args.driving:
        args.preprocessed = str(_run_preprocess(args, family, Path(args.work_dir or work_dir)))
    if args.preprocessed:
        d = Path(args.preprocessed)
        if not d.is_dir():
            raise CliError(f"--preprocessed {d} is not a folder.")
        ref, videos = d / "src_ref.png", {k: d / f"src_{k}.mp4" for k in pipe.input_videos}
        videos = {k: p for k, p in videos.items() if k in family.streams or p.exists()}
        if ("bg" in videos) != ("mask" in videos):
            raise CliError(f"{d}: replace mode needs both src_bg.mp4 and src_mask.mp4.")
    else:
        ref, videos = args.ref, {v: path for v, path in zip(pipe.input_videos, own) if path}
        if not ref or any(s not in videos for s in family.streams):
            raise CliError(f"--ref and {streams} are all required"
                           + (" (or use --preprocessed DIR)." if "pose" in pipe.input_videos else "."))
        if bool(args.bg) != bool(args.mask):
            raise CliError("replace mode needs both --bg and --mask.")
    try:
        inputs, fps = pipe.read_inputs(ref, videos, clip_len=args.clip_len, refert_num=args.refert_num,
                                       max_frames=args.max_frames, target_area=args.target_area)
    except InputError as e:
        raise CliError(str(e)) from None
    if args.relight is not None and inputs.get("bg_video") is None:
        raise CliError("--relight applies to replace mode: add --replace (with --driving) or --bg and --mask.")
    if args.relight == "":
        args.relight = str(Path(args.model) / RELIGHT_FILE)
    _check_loras([*args.lora, *([args.relight] if args.relight else [])], args.lora_scale, n_scaled=len(args.lora))
    if args.driving_video:
        video = inputs["driving_video"]
        print(f"cost: {estimate_cost(args, len(video), *video.shape[1:3], _dit_config(family, args.model))}",
              file=sys.stderr)
    return dict(inputs, fps=fps)


def _check_loras(files: list[str], scales, *, n_scaled: int) -> None:
    """Read and check every LoRA file now, so a bad one fails before any model weight is loaded."""
    for lora in files:
        try:
            read_lora(_need_file(lora, "LoRA file"))
        except (LoraError, WeightsFileError) as e:
            raise CliError(str(e)) from None
    if scales and len(scales) != n_scaled:
        raise CliError(f"{len(scales)} --lora-scale values for {n_scaled} --lora files.")


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """``--debug`` / ``HYDRA_FULL_ERROR=1``: tracebacks for expected errors too (wan_animate.cli)."""
    return run_tool(lambda a: _main_in_work_dir(build_parser().parse_args(a)), argv, extra=(CliError,))


def _main_in_work_dir(args) -> int:
    # --driving without --work-dir: the preprocessed streams live in a temporary folder that is
    # removed when the run ends - after success, an error or Ctrl-C.
    temporary = args.driving and not args.work_dir
    with tempfile.TemporaryDirectory(prefix="wan_animate_src_") if temporary else contextlib.nullcontext() as work_dir:
        return _main(args, work_dir)


def _main(args, work_dir: str | None) -> int:
    try:
        if not str(args.out).lower().endswith(".mp4"):
            raise CliError(f"--out {args.out} must end in .mp4.")
        family = get_family(_model_family(args.model))  # from the DiT's tensor names (headers only)
        family.pipeline_class.detect_layout(args.model)  # the folder's layout, no weights read yet
        _apply_family(args, family)
        _check_sampling_args(args)
        try:  # before preprocessing: a bad --device fails now
            device = resolve_device(args.device, "device")
        except ValueError as e:
            raise _flag_error(e) from None
        device, dtype = str(device), parse_dtype(args.dtype, device)
        inputs = gather_inputs(args, family, work_dir)
        writer = True
        if args.sequence_parallel > 1:
            from wan_animate.parallel import start_generation_group

            device, writer = start_generation_group(args.sequence_parallel, device)
    except (CliError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    fps = inputs.pop("fps")
    pipe = family.pipeline_class.from_pretrained(args.model, dtype=dtype, device=device, offload=args.offload,
                                                 vae_tiling=args.vae_tiling)
    for lora, scale in zip(args.lora, args.lora_scale or [1.0] * len(args.lora)):
        merged = pipe.load_lora(lora, scale=scale)
        print(f"LoRA {lora}: merged into {len(merged)} layers at scale {scale}", file=sys.stderr)
    if args.relight:
        adapted = apply_relighting_lora(pipe.dit, args.relight)
        print(f"relighting LoRA {args.relight}: adapter on {len(adapted)} layers", file=sys.stderr)
    if args.sequence_parallel > 1:
        import torch.distributed as dist

        family.apply_sequence_parallel(pipe.dit, dist.group.WORLD)
    try:
        frames = pipe.generate(
            **inputs, prompt=args.prompt if args.prompt is not None else DEFAULT_PROMPT,
            negative_prompt=args.negative_prompt if args.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT,
            steps=args.steps, shift=args.shift, guide_scale=args.guide_scale, seed=args.seed, solver=args.solver,
            clip_len=args.clip_len, refert_num=args.refert_num, progress=not args.no_progress,
            **args.family_settings)
    except NonFiniteOutputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    driving = inputs[f"{family.pipeline_class.input_videos[0]}_video"]
    assert frames.shape[0] == len(driving), "generate() must return one frame per driving frame"
    if not writer:  # the other ranks of a sequence-parallel run hold the same frames
        return 0
    write_video(args.out, np.asarray(frames), fps)
    print(f"wrote {args.out}: {frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]} at {fps:g} fps "
          f"(model.family={family.name})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
