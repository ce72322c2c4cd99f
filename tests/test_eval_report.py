"""eval.report on hand-made cells: categorical and numeric sweeps, inf / undefined values, failed
cells, metrics not computed, self-contained HTML, and the offline wandb table."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser

import numpy as np
from PIL import Image

from eval.report import build_report, main
from eval.records import json_safe, loads_record


def write_cell(root, name, overrides, status="ok", metrics=None, error=None):
    d = root / name
    (d / "frames").mkdir(parents=True)
    Image.fromarray(np.full((16, 40, 3), 120, np.uint8)).save(d / "frames" / "clip0.png")
    rec = {"cell": name, "overrides": overrides, "status": status, "seconds_total": 1.0,
           "seconds_per_sample": {"generate": 0.5, "psnr": 0.01}, "metrics": metrics or {},
           "not_computed": {"fvd": "not requested (add it to metrics.names)"}}
    if error:
        rec["error"] = error
    (d / "metrics.json").write_text(json.dumps(json_safe(rec)))


def _no_constant(name):
    raise ValueError(f"non-strict JSON constant {name}")


def strict_json_files(root) -> dict:
    """Every .json / .jsonl file under ``root`` parsed strictly (NaN / Infinity raise); {path: [objects]}."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file()):
        text = path.read_text()
        lines = text.splitlines() if path.suffix == ".jsonl" else [text]
        out[path] = [json.loads(x, parse_constant=_no_constant) for x in lines if x.strip()]
    return out


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.bad = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag in ("script", "link", "iframe"):
            self.bad.append(tag)


def test_report_from_hand_made_cells(tmp_path, monkeypatch):
    for solver in ("unipc", "euler"):
        for steps in (2, 4):
            write_cell(tmp_path, f"solver={solver},steps={steps}", [f"solver={solver}", f"steps={steps}", "seed=0"],
                       metrics={"psnr": 20.0 + steps + (solver == "euler"), "ssim": 0.5 + steps / 10,
                                "body_pck@0.1": float("nan"), "identity": 0.9})
    write_cell(tmp_path, "solver=unipc,steps=8", ["solver=unipc", "steps=8", "seed=0"], metrics={"psnr": math.inf})
    write_cell(tmp_path, "solver=bogus,steps=2", ["solver=bogus", "steps=2", "seed=0"], status="failed",
               error="ValueError: solver='bogus'; choose one of ['unipc', 'dpm++', 'euler']")

    monkeypatch.setenv("WANDB_MODE", "offline")
    summary = build_report(tmp_path, wandb_cfg={"enabled": True, "mode": "offline", "project": "t"})
    assert summary == {"cells": 6, "ok": 5, "failed": 1, "cached": 0, "swept": ["solver", "steps"]}
    assert list((tmp_path / "wandb").glob("offline-run-*")), "wandb offline run not written"

    lines = [loads_record(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    by_cell = {x["cell"]: x for x in lines}
    assert by_cell["solver=unipc,steps=8"]["metrics"]["psnr"] == math.inf
    assert by_cell["solver=unipc,steps=2"]["metrics"]["body_pck@0.1"] is None  # NaN -> null
    md = (tmp_path / "report.md").read_text()
    assert "6 cells: 5 ok, 1 failed" in md and "solver='bogus'" in md
    assert "**fvd**: not requested" in md and "| inf |" in md and "n/a" in md

    page = (tmp_path / "report.html").read_text()
    tags = Tags()
    tags.feed(page)
    assert tags.bad == [] and all(s.startswith("data:image/png;base64,") for s in tags.imgs)
    assert len(tags.imgs) == 2 + 5  # a plot per swept parameter + one strip per ok cell
    assert "<td class='best'>25</td>" in page  # best psnr among finite values is bold (euler, 4 steps)

    main([str(tmp_path)])  # the CLI rebuilds the same report
    assert (tmp_path / "report.html").read_text().count("<img") == 7


def test_cell_names_are_short_safe_and_deterministic():
    from eval.main import cell_name

    n1 = cell_name(["seed=0", "checkpoint=/runs/a/checkpoints/step-10", "guide_scale=2", "metrics.names=[psnr,ssim]"])
    n2 = cell_name(["checkpoint=/runs/b/checkpoints/step-10", "guide_scale=2", "seed=0"])
    assert n1.startswith("checkpoint=checkpoints_step-10-") and n1.endswith(",guide_scale=2,seed=0")
    assert n1 != n2 and "/" not in n1 and "metrics" not in n1  # same tail, different runs: hash differs
    assert cell_name(["checkpoint=/runs/a/checkpoints/step-10", "guide_scale=2", "seed=0"]) == n1
    assert cell_name([]) == "default" and cell_name(["metrics.fvd_clip_frames=0", "+out_dir=x", "wandb.project=p"]) == "default"
    assert len(cell_name([f"k{i}=" + "v" * 20 for i in range(20)])) <= 120


def test_every_top_level_field_is_overridable_from_the_command_line():
    """Top-level eval fields must not collide with config groups in the shared conf/ folder
    (e.g. `lora=` would select the trainer's lora group)."""
    import dataclasses
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import eval.main  # noqa: F401  (registers the schema and the cell-name resolver)
    from eval.config import EvalConfig

    values = {"str": "x", "Optional[str]": "x", "int": "1", "float": "1.5", "bool": "true", "dict": "{a:1}"}
    overrides = []
    for f in dataclasses.fields(EvalConfig):
        if f.name in ("metrics", "wandb"):
            continue
        overrides.append(f"{f.name}={values[str(f.type)]}")
    conf = Path(__file__).resolve().parents[1] / "conf" / "eval"  # eval's own config root
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[*overrides, "metrics.names=[psnr]", "lora_path=/a/b.safetensors"])
    assert cfg.lora_path == "/a/b.safetensors" and cfg.checkpoint == "x" and cfg.steps == 1
    assert dict(cfg.preprocess) == {"a": 1}
    assert OmegaConf.select(cfg, "lora") is None


def test_plot_labels_keep_path_tails():
    from eval.report import short_label

    assert short_label("/runs/a/checkpoints/step-2000") == "checkpoints/step-2000"
    assert short_label("unipc") == "unipc" and len(short_label("x" * 50)) == 22


def test_records_and_results_are_strict_json_that_keep_inf(tmp_path):
    """metrics.json written by the cell runner and results.jsonl are strict JSON; inf comes back
    as inf through the project's reader, NaN as null, numpy numbers as numbers."""
    import pytest

    from eval.records import read_record, write_record

    cell = tmp_path / "seed=0"
    write_cell(tmp_path, "seed=0", ["seed=0"])  # frames/ for the report
    rec = {"cell": "seed=0", "overrides": ["seed=0"], "status": "ok", "prompt": "inf",
           "metrics": {"psnr": math.inf, "body_error": -math.inf, "ssim": float("nan"), "fvd": np.float32(3.5)},
           "per_sample": {"a": {"psnr": math.inf}}}
    write_record(cell / "metrics.json", rec)
    build_report(tmp_path)
    files = strict_json_files(tmp_path)
    assert {p.name for p in files} == {"metrics.json", "results.jsonl"}
    back = read_record(cell / "metrics.json")
    assert back["metrics"] == {"psnr": math.inf, "body_error": -math.inf, "ssim": None, "fvd": 3.5}
    assert back["per_sample"]["a"]["psnr"] == math.inf and back["prompt"] == "inf"  # text stays text
    # Negative control: Python's default json.dumps writes Infinity, which the strict check refuses.
    (tmp_path / "loose.json").write_text(json.dumps({"psnr": math.inf}))
    with pytest.raises(ValueError, match="Infinity"):
        strict_json_files(tmp_path)
