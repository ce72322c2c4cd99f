"""eval.generate --driving on a first day: the cost is printed before any work, --clip-len is
checked before preprocessing, and the temporary wan_animate_src_* folder is removed after
success, error and Ctrl-C (preprocessing and the model are stand-ins: this tests the CLI)."""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import pytest
from PIL import Image

from eval import generate as cli
from wan_animate.video_io import write_video

T, SIZE = 7, 32


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from wan_animate.testing import make_tiny_model_folder

    return make_tiny_model_folder(tmp_path_factory.mktemp("gen") / "model")


@pytest.fixture
def env(tmp_path, monkeypatch, model):
    """Temporary folders go to tmp/temp; preprocessing writes fixed streams; no model loads."""
    import data_tools.driving
    from wan_animate import pipeline

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    frames = np.random.default_rng(0).integers(0, 255, (T, SIZE, SIZE, 3), dtype=np.uint8)
    write_video(tmp_path / "dance.mp4", frames, 30)
    Image.fromarray(frames[0]).save(tmp_path / "ref.png")
    state = {"calls": [], "behaviour": "ok"}

    def fake_preprocess(video, ref, out, **kw):
        state["calls"].append(out)
        out.mkdir(parents=True, exist_ok=True)  # as the real one does
        (out / "partial.bin").write_bytes(b"x")
        if kw.get("progress") is not None:  # pose estimation reports each frame
            for done in range(1, T + 1):
                kw["progress"](done, T)
        if state["behaviour"] == "error":
            raise ValueError("pose backend found nobody")
        if state["behaviour"] == "ctrl-c":
            raise KeyboardInterrupt
        Image.fromarray(frames[0]).save(out / "src_ref.png")
        write_video(out / "src_pose.mp4", frames, 30)
        write_video(out / "src_face.mp4", frames, 30)

    class FakePipe:
        def generate(self, pose_video, **kw):
            return np.zeros((len(pose_video), SIZE, SIZE, 3), np.uint8)

    monkeypatch.setattr(data_tools.driving, "preprocess_driving", fake_preprocess)
    monkeypatch.setattr(pipeline.AnimatePipeline, "from_pretrained", lambda *a, **k: FakePipe())
    args = ["--model", str(model), "--ref", str(tmp_path / "ref.png"), "--driving", str(tmp_path / "dance.mp4"),
            "--out", str(tmp_path / "out.mp4"), "--clip-len", "5", "--steps", "2", "--no-progress",
            "--target-area", str(SIZE * SIZE)]
    return {"temp": temp, "args": args, "state": state, "tmp": tmp_path}


def leftovers(env) -> list:
    return sorted(p.name for p in env["temp"].glob("wan_animate_src_*"))


def test_success_removes_the_temp_folder_and_prints_the_cost_first(env, capsys):
    assert cli.main(env["args"]) == 0
    err = capsys.readouterr().err
    work = env["state"]["calls"][0]
    assert work.name.startswith("wan_animate_src_") and work.parent == env["temp"]
    assert leftovers(env) == []
    assert (env["tmp"] / "out.mp4").is_file()
    cost = err.index("cost: ")
    assert cost < err.index("preprocessing ")
    assert f"{T} frames at {SIZE}x{SIZE} -> 2 segment(s) of 5 frames x 2 steps = 4 DiT calls" in err
    assert "roughly" in err and "TFLOP" in err


def test_error_and_ctrl_c_remove_the_temp_folder(env, capsys):
    env["state"]["behaviour"] = "error"
    assert cli.main(env["args"]) == 2
    assert "pose backend found nobody" in capsys.readouterr().err
    assert leftovers(env) == []
    env["state"]["behaviour"] = "ctrl-c"
    with pytest.raises(KeyboardInterrupt):
        cli.main(env["args"])
    assert leftovers(env) == [] and len(env["state"]["calls"]) == 2


def test_work_dir_is_kept(env):
    """Negative control: a folder the user names with --work-dir stays."""
    keep = env["tmp"] / "keep"
    assert cli.main(env["args"] + ["--work-dir", str(keep)]) == 0
    assert (keep / "src_pose.mp4").is_file() and leftovers(env) == []


def test_clip_len_checked_before_preprocessing(env, capsys):
    args = [a if a != "5" else "8" for a in env["args"]]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "--clip-len 8 must be 4n+1" in err and "--clip-len 5" in err
    assert env["state"]["calls"] == [] and "preprocessing" not in err and leftovers(env) == []


def test_device_checked_before_preprocessing(env, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert cli.main(env["args"] + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda but CUDA is not available" in err and "--device cpu" in err
    assert env["state"]["calls"] == [] and leftovers(env) == []


def test_cost_estimate_counts_segments_steps_and_guidance():
    from wan_animate.config import WanAnimateConfig

    args = argparse.Namespace(clip_len=77, refert_num=1, steps=20, guide_scale=2.0, device="cpu")
    text = cli.estimate_cost(args, 300, 720, 1280, WanAnimateConfig())
    # (300 - 1) / 76 -> 4 segments; x 20 steps x 2 (guidance) = 160 calls of (20 + 1 reference) x 45 x 80 tokens
    assert "4 segment(s) of 77 frames x 20 steps x 2 (guidance) = 160 DiT calls of 75,600 tokens" in text
    assert " h of DiT compute on cpu" in text


def test_preprocessing_shows_frames_done_of_total(env, capsys):
    assert cli.main([a for a in env["args"] if a != "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "pose (mediapipe): 100%" in err and f"{T}/{T}" in err
    # Negative control: --no-progress shows no bar.
    assert cli.main(env["args"]) == 0
    assert f"{T}/{T}" not in capsys.readouterr().err


def test_preprocess_driving_calls_progress_once_per_frame_as_frames_finish(tmp_path, wan_example, monkeypatch):
    """The real preprocessing with mediapipe on 3 frames of the sample clip: one progress call per
    frame, each right after that frame's pose estimate (not all at the end)."""
    from data_tools.driving import preprocess_driving
    from data_tools.pose.mediapipe_backend import MediapipeBackend

    events = []
    holistic = MediapipeBackend._holistic

    def spy_holistic(self, static):
        tracker = holistic(self, static)

        class Spy:
            def __enter__(self):
                tracker.__enter__()
                return self

            def __exit__(self, *exc):
                return tracker.__exit__(*exc)

            def process(self, image):
                events.append("frame")
                return tracker.process(image)

        return Spy()

    monkeypatch.setattr(MediapipeBackend, "_holistic", spy_holistic)
    preprocess_driving(wan_example / "video.mp4", wan_example / "image.jpeg", tmp_path / "job", max_frames=3,
                       target_area=128 * 72, face_size=32, pose_options={"max_side": 128},
                       progress=lambda done, total: events.append((done, total)))
    assert events == ["frame", (1, 3), "frame", (2, 3), "frame", (3, 3)]


def test_batched_backends_still_report_each_frame(tmp_path):
    """A backend that reports a batch at once (precomputed keypoints: one file read) still gives
    one progress call per frame."""
    from data_tools.driving import preprocess_driving
    from data_tools.pose.format import PoseSequence

    frames = np.random.default_rng(1).integers(0, 255, (6, SIZE, SIZE, 3), dtype=np.uint8)
    write_video(tmp_path / "clip.mp4", frames, 30)
    Image.fromarray(frames[0]).save(tmp_path / "ref.png")
    pose = PoseSequence.empty(6, SIZE, SIZE)
    pose.body[:, :8] = (SIZE / 2, SIZE / 2, 1.0)  # a (tiny) person: a video without one is refused
    pose.save_npz(tmp_path / "clip.npz")
    calls = []
    preprocess_driving(tmp_path / "clip.mp4", tmp_path / "ref.png", tmp_path / "job", max_frames=5,
                       target_area=SIZE * SIZE, face_size=16, pose_backend="precomputed",
                       pose_options={"path": str(tmp_path / "clip.npz")}, progress=lambda *a: calls.append(a))
    assert calls == [(i, 5) for i in range(1, 6)]


# ---------------------------------------------------------------------------- silent wrong results


@pytest.mark.parametrize("flag, value, message", [
    ("--shift", "nan", "--shift nan must be a finite number > 0"),
    ("--guide-scale", "nan", "--guide-scale nan must be a finite number >= 0"),
    ("--lora-scale", "nan", "--lora-scale nan must be a finite number"),
    ("--lora-scale", "inf", "--lora-scale inf must be a finite number"),
])
def test_non_finite_sampling_flags_are_refused_in_one_line(env, capsys, flag, value, message):
    """NaN passes every comparison: these sampled an all-black video and exited 0."""
    assert cli.main([*env["args"], flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {message}" + err[len(f"error: {message}"):] and "\n" not in err
    assert env["state"]["calls"] == []  # refused before preprocessing and before any model loads


def _tiny_inputs(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (5, SIZE, SIZE, 3), dtype=np.uint8)
    write_video(tmp_path / "pose.mp4", frames, 30)
    write_video(tmp_path / "face.mp4", frames, 30)
    Image.fromarray(frames[0]).save(tmp_path / "ref.png")
    return ["--ref", str(tmp_path / "ref.png"), "--pose", str(tmp_path / "pose.mp4"), "--face", str(tmp_path / "face.mp4")]


def _lora_file(model, path, alpha: float):
    """A LoRA of the tiny model with non-zero factors and the given alpha."""
    import torch

    from wan_animate.weights.load import load_dit
    from wan_animate.lora import add_lora, save_lora

    dit = load_dit(model / "transformer", dtype=torch.float32, device="cpu")
    add_lora(dit, rank=4, alpha=alpha)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    save_lora(dit, path)
    return path


def test_lora_alpha_that_blows_up_the_output_is_refused_not_written(model, tmp_path, capsys):
    """A LoRA with alpha 1e30 turned every frame black (NaN latents) and exited 0."""
    out = tmp_path / "out.mp4"
    lora = _lora_file(model, tmp_path / "huge.safetensors", alpha=1e30)
    args = ["--model", str(model), *_tiny_inputs(tmp_path), "--out", str(out), "--clip-len", "5", "--steps", "2",
            "--no-progress", "--lora", str(lora)]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "error: segment 1 of 1: the denoised latents hold NaN/Inf values; nothing was written" in err
    assert not out.exists()
    # negative control: the same LoRA at alpha 4 (scale 1) generates
    _lora_file(model, tmp_path / "fine.safetensors", alpha=4)
    assert cli.main([*args[:-1], str(tmp_path / "fine.safetensors")]) == 0 and out.exists()


def test_lora_file_with_a_nan_alpha_is_refused_before_loading(model, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    lora = _lora_file(model, tmp_path / "l.safetensors", alpha=4)
    tensors = load_file(str(lora))
    key = next(k for k in tensors if k.endswith(".alpha"))
    tensors[key] = tensors[key] * float("nan")
    save_file(tensors, str(lora))
    args = ["--model", str(model), *_tiny_inputs(tmp_path), "--out", str(tmp_path / "o.mp4"), "--clip-len", "5",
            "--lora", str(lora)]
    assert cli.main(args) == 2
    assert "alpha nan must be a finite number > 0" in capsys.readouterr().err


def test_driving_video_without_a_person_is_refused_in_one_line(model, tmp_path, monkeypatch, capsys):
    """Preprocessing used to go on silently and the generation then ran for minutes on nothing."""
    import data_tools.driving
    from data_tools.pose.format import PoseSequence
    from wan_animate import pipeline

    class Nobody:
        def extract(self, frames, **kw):
            return PoseSequence.empty(len(frames), frames.shape[1], frames.shape[2])

    monkeypatch.setattr(data_tools.driving, "get_pose_backend", lambda *a, **k: Nobody())
    monkeypatch.setattr(pipeline.AnimatePipeline, "from_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("a model was loaded")))
    frames = np.full((T, SIZE, SIZE, 3), 90, np.uint8)  # an empty room
    write_video(tmp_path / "room.mp4", frames, 30)
    Image.fromarray(frames[0]).save(tmp_path / "ref.png")
    args = ["--model", str(model), "--ref", str(tmp_path / "ref.png"), "--driving", str(tmp_path / "room.mp4"),
            "--out", str(tmp_path / "out.mp4"), "--clip-len", "5", "--no-progress", "--target-area", str(SIZE * SIZE)]
    assert cli.main(args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no person found in" in lines[0] and "no body in any of its" in lines[0]
