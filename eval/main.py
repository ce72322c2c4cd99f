"""Evaluate a Wan-Animate model (plus optional trained checkpoint / LoRA) on an eval set.

    python eval/main.py model_dir=MODEL eval_set=SHARDS out_dir=runs/eval steps=20
    python eval/main.py -m model_dir=MODEL eval_set=SHARDS out_dir=runs/sweep \
        guide_scale=1,2 seed=0,1 checkpoint=ckpts/step-1000,ckpts/step-2000

Every cell (one combination of overrides) writes ``OUT_DIR/<cell>/`` with ``videos/``,
``frames/`` and ``metrics.json``; finished cells are skipped on a rerun, a failed cell is recorded
and the sweep goes on. At the end ``OUT_DIR/report.{md,html}`` and ``results.jsonl`` are (re)built
(also by hand: ``python -m eval.report OUT_DIR``). The exit status is 1 when any cell failed.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from wan_animate.quiet import quiet_third_party

quiet_third_party()  # an entry point: before the libraries whose start-up lines it drops are imported

from eval.config import CONF_ROOT, UNNAMED_KEYS, EvalConfig, register_configs  # noqa: E402
from eval.report import build_report  # noqa: E402
from eval.runner import SKIPPED_THIS_PROCESS, run_cell  # noqa: E402
from wan_animate.cli import check_overrides, skip_collection_at_exit, take_debug_flag  # noqa: E402
from wan_animate.options import HYDRA_VERSION_BASE  # noqa: E402

# `python eval/main.py` puts eval/ first on sys.path; the project is installed (`pip install -e .`),
# so `eval` still resolves to this package, and no module here shares a name with a dependency.

_SAFE = re.compile(r"[^A-Za-z0-9._=,+@-]")


# Keys that never name a cell: eval.config.UNNAMED_KEYS, metric settings (a change recomputes the
# cell in place, see eval.runner.run_cell) and logging.
_UNNAMED_PREFIXES = ("metrics.", "wandb.", "hydra.")


def cell_name(overrides: list[str]) -> str:
    """A short, filesystem-safe, deterministic folder name for a cell's command-line overrides."""
    parts = []
    for item in sorted(overrides):
        key, eq, value = item.partition("=")
        name = key.lstrip("+~")
        if name in UNNAMED_KEYS or name.startswith(_UNNAMED_PREFIXES):
            continue
        if "/" in value or "\\" in value:  # a path: keep its tail, disambiguate with a hash
            tail = "_".join(p for p in re.split(r"[\\/]", value.rstrip("/\\"))[-2:] if p)
            value = f"{tail}-{hashlib.sha1(value.encode()).hexdigest()[:6]}"
        parts.append(key + eq + value)
    if not parts:
        return "default"
    name = _SAFE.sub("_", ",".join(parts))
    if len(name) > 120:
        name = name[:110] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


if not OmegaConf.has_resolver("eval_cell_name"):
    OmegaConf.register_new_resolver("eval_cell_name", cell_name)
register_configs()


@hydra.main(config_path=str(CONF_ROOT), config_name="eval", version_base=HYDRA_VERSION_BASE)
def main(cfg: DictConfig) -> dict:
    hc = HydraConfig.get()
    try:
        record = run_cell(cfg, hc.runtime.output_dir, list(hc.overrides.task))
    except KeyboardInterrupt:
        report_interrupted(hc.sweep.dir if hc.mode == RunMode.MULTIRUN else cfg.out_dir, Path(hc.runtime.output_dir).name)
        raise SystemExit(130) from None
    status = "skipped (finished before)" if record.get("skipped") else record["status"]
    print(f"[eval] cell {record['cell']}: {status}" + (f" - {record['error']}" if record.get("error") else ""))
    return record


def report_interrupted(sweep_dir: str, cell: str) -> None:
    """Ctrl-C: the report of the cells that finished, instead of a traceback (the interrupted cell
    wrote no metrics.json, so a rerun computes it and skips the finished ones)."""
    note = f"interrupted (Ctrl-C) during cell {cell}: it and the cells after it did not run"
    summary = build_report(sweep_dir, skipped=set(SKIPPED_THIS_PROCESS), note=note)
    print(f"\n[eval] {note}. Report of the {summary['cells']} finished cells ({summary['ok']} ok, "
          f"{summary['failed']} failed): {Path(sweep_dir) / 'report.html'}; rerun the same command to finish "
          "(finished cells are skipped)", file=sys.stderr)


def cli() -> None:
    """``--debug`` / ``HYDRA_FULL_ERROR=1`` keep tracebacks; a key that is not in the schema is refused
    with the closest one before Hydra composes anything; third-party start-up noise is dropped."""
    skip_collection_at_exit()
    take_debug_flag(sys.argv)
    check_overrides("error: ", sys.argv[1:], EvalConfig, ["preset"])
    main()


if __name__ == "__main__":
    cli()
