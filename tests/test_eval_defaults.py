"""eval defaults and first-day behaviour: dtype=auto and the eval set's own clip length, cached
shards named as such, distinct plot labels with plain y ticks, Ctrl-C in a sweep writes the report
of the finished cells."""

from __future__ import annotations

import io
import json
import sys
import tarfile

import numpy as np
import pytest

from eval.config import EvalConfig, MetricsConfig
from eval.data import EvalSample, EvalSet, EvalSetError, load_eval_set
from eval.resources import clear_cache, resolve_dtype_device
from eval.runner import eval_set_clip_len, run_cell


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from data_tools.synthetic_data import make_synthetic_dataset
    from wan_animate.testing import make_tiny_model_folder

    root = tmp_path_factory.mktemp("eval_defaults")
    return {"model": make_tiny_model_folder(root / "model"),
            "data": make_synthetic_dataset(root / "data", num_clips=1, clip_len=5, height=32, width=32)}


def _sample(frames: int) -> EvalSample:
    pose = np.zeros((frames, 16, 16, 3), np.uint8)
    return EvalSample(key=f"s{frames}", ref=pose[0], pose=pose, face=pose)


def test_defaults_are_cpu_honest():
    cfg = EvalConfig(model_dir="m", eval_set="e")
    assert cfg.dtype == "auto" and cfg.clip_len == 0
    import torch

    dtype, device = resolve_dtype_device(EvalConfig(model_dir="m", eval_set="e", device="cpu"))
    assert (dtype, device.type) == (torch.float32, "cpu")  # not bfloat16 (~5x slower on CPUs)
    for spelling, want in (("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp32", torch.float32)):
        assert resolve_dtype_device(EvalConfig(model_dir="m", eval_set="e", device="cpu", dtype=spelling))[0] == want
    with pytest.raises(ValueError, match="dtype='float64'"):
        EvalConfig(model_dir="m", eval_set="e", dtype="float64")
    with pytest.raises(ValueError, match="clip_len=8 must be 0 .* or 4n\\+1"):
        EvalConfig(model_dir="m", eval_set="e", clip_len=8)


def test_clip_len_zero_is_the_eval_sets_own_length():
    assert eval_set_clip_len(EvalSet("shards", [_sample(17), _sample(17)], [])) == 17
    assert eval_set_clip_len(EvalSet("shards", [_sample(17), _sample(9)], [])) == 9  # the shortest sample
    assert eval_set_clip_len(EvalSet("pairs", [_sample(20)], [])) == 17  # floored to 4n+1
    assert eval_set_clip_len(EvalSet("pairs", [_sample(300)], [])) == 77  # long: official segments
    assert eval_set_clip_len(EvalSet("pairs", [_sample(2)], [])) == 5


def test_cell_at_defaults_generates_at_the_samples_length(assets, tmp_path, monkeypatch):
    """At the defaults a 5-frame eval set is generated as one 5-frame segment, not padded to 77."""
    from wan_animate import pipeline

    seen = []
    real = pipeline.AnimatePipeline.generate

    def spy(self, *a, **kw):
        seen.append(kw["clip_len"])
        return real(self, *a, **kw)

    monkeypatch.setattr(pipeline.AnimatePipeline, "generate", spy)
    clear_cache()
    cfg = EvalConfig(model_dir=str(assets["model"]), eval_set=str(assets["data"]), device="cpu", steps=1,
                     skip_finished=False, metrics=MetricsConfig(names=["psnr"]))
    rec = run_cell(cfg, tmp_path / "cell")
    clear_cache()
    assert rec["status"] == "ok", rec.get("traceback")
    assert rec["resolved"] == {"clip_len": 5, "dtype": "float32", "device": "cpu"}
    assert seen == [5] and rec["config"]["clip_len"] == 0
    json.loads((tmp_path / "cell" / "metrics.json").read_text())


def _write_tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_cached_shards_are_named_as_such(assets, tmp_path):
    cached = tmp_path / "cached"
    cached.mkdir()
    _write_tar(cached / "shard-000000.tar", {"clip0.latents.safetensors": b"x", "clip0.face.mp4": b"x",
                                             "clip0.json": b"{}"})
    with pytest.raises(EvalSetError, match="these are cached shards .*use the raw shards for eval"):
        load_eval_set(cached)
    rec = run_cell(EvalConfig(model_dir=str(assets["model"]), eval_set=str(cached), device="cpu",
                              skip_finished=False), tmp_path / "cell")
    assert rec["status"] == "failed" and "these are cached shards" in rec["error"]
    assert "missing field" not in rec["error"]
    # negative control: the raw shards they would come from load
    assert len(load_eval_set(assets["data"]).samples) == 1


def _cell(root, name, overrides, psnr):
    d = root / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"cell": name, "overrides": overrides, "status": "ok",
                                                "metrics": {"psnr": psnr}}))


def test_plot_labels_are_distinct_and_y_ticks_plain(tmp_path):
    import matplotlib.pyplot as plt

    from eval.report import collect, plot_figure, short_label, swept_keys

    a, b = "/runs/a/export/lora.safetensors", "/runs/b/export/lora.safetensors"
    assert short_label(a) == short_label(b)  # the old labels: both "…port/lora.safetensors"
    _cell(tmp_path, "a", [f"lora_path={a}", "seed=0"], 10.26440)
    _cell(tmp_path, "b", [f"lora_path={b}", "seed=0"], 10.26441)
    records = collect(tmp_path)
    fig = plot_figure(records, "lora_path", swept_keys(records), ["psnr"])
    fig.canvas.draw()
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["a/export/lora.safetensors", "b/export/lora.safetensors"]
    assert ax.yaxis.get_offset_text().get_text() == ""  # no "1e-5+1.02644e1"
    assert all("e" not in t.get_text() for t in ax.get_yticklabels())
    plt.close(fig)

    # a given name= labels the cell instead
    _cell(tmp_path / "named", "a", [f"lora_path={a}", "name=styleA"], 10.0)
    _cell(tmp_path / "named", "b", [f"lora_path={b}", "name=styleB"], 11.0)
    records = collect(tmp_path / "named")
    fig = plot_figure(records, "lora_path", swept_keys(records), ["psnr"])
    fig.canvas.draw()
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["styleA", "styleB"]
    plt.close(fig)


def test_plot_puts_the_base_model_first_and_steps_in_natural_order(tmp_path):
    import matplotlib.pyplot as plt

    from eval.report import collect, plot_figure, swept_keys

    for i, ckpt in enumerate(("runs/ft/step-1000", "null", "runs/ft/step-200")):
        _cell(tmp_path, f"c{i}", [f"checkpoint={ckpt}", "seed=0"], float(i))
    records = collect(tmp_path)
    fig = plot_figure(records, "checkpoint", swept_keys(records), ["psnr"])
    fig.canvas.draw()
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["null", "step-200", "step-1000"]
    plt.close(fig)


# Runs `python eval/main.py -m ...` in a fresh interpreter whose cells are a stand-in (no model):
# the second cell raises KeyboardInterrupt from inside the cell, as Ctrl-C does. A fresh
# interpreter keeps Hydra's logging set-up away from pytest's captured streams.
CTRL_C_SCRIPT = """
import json, sys
import eval.main, eval.runner
calls, calls_file, out_dir = [], sys.argv[1], sys.argv[2]
def fake_run(cfg, cell_dir):
    calls.append(cell_dir.name)
    json.dump(calls, open(calls_file, "w"))
    if len(calls) == 2:
        raise KeyboardInterrupt
    return {"metrics": {"psnr": 20.0 + cfg.seed}, "seconds_per_sample": {"generate": 1.0}}
eval.runner._run = fake_run
sys.argv = ["eval/main.py", "-m", "model_dir=m", "eval_set=e", "out_dir=" + out_dir, "seed=0,1,2"]
eval.main.main()
"""


def test_ctrl_c_in_a_sweep_writes_the_report_of_finished_cells(tmp_path):
    import subprocess

    out = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-c", CTRL_C_SCRIPT, str(tmp_path / "calls.json"), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 130, r.stdout[-2000:] + r.stderr[-2000:]
    assert json.loads((tmp_path / "calls.json").read_text()) == ["seed=0", "seed=1"]  # the third never ran
    assert "interrupted (Ctrl-C) during cell seed=1" in r.stderr and "Traceback" not in r.stderr
    md = (out / "report.md").read_text()
    assert "1 cells: 1 ok, 0 failed" in md and "interrupted (Ctrl-C)" in md
    assert json.loads((out / "seed=0" / "metrics.json").read_text())["status"] == "ok"
    assert not (out / "seed=1" / "metrics.json").exists()  # unfinished: a rerun computes it
    assert [json.loads(x)["cell"] for x in (out / "results.jsonl").read_text().splitlines()] == ["seed=0"]
