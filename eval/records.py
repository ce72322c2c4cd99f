"""A cell's record (``metrics.json``) and the sweep's ``results.jsonl``: strict JSON in and out,
and the cell config as a record stores it.

JSON has no NaN or Infinity, and strict readers refuse them. A metric can be infinite, though
(PSNR of a perfect reconstruction), and the report must show ``inf`` rather than ``n/a``. So
records are written with non-finite numbers as ``null`` (NaN: undefined) or the strings ``"inf"``
/ ``"-inf"``, and ``loads_record`` turns those strings back into floats inside the numeric
sections (``metrics``, ``per_sample``) only, so a prompt or override that reads "inf" stays text.
"""

from __future__ import annotations

import dataclasses
import json
import math
from omegaconf.errors import MissingMandatoryValue
from pathlib import Path

from eval.config import NON_RESULT_FIELDS, EvalConfig
from wan_animate.files import atomic_write_json, atomic_write_text, dumps_strict, strict_json
from wan_animate.options import to_dataclass

METRICS_FILE = "metrics.json"
RESULTS_FILE = "results.jsonl"
# Record sections whose leaves are numbers: "inf" / "-inf" there are decoded back to floats.
NUMERIC_SECTIONS = ("metrics", "per_sample")
INFINITIES = {"inf": math.inf, "-inf": -math.inf}


def json_safe(x):
    """A copy of ``x`` that strict JSON holds: NaN -> null, +-inf -> "inf" / "-inf" (read back
    by ``loads_record``), numpy scalars -> Python numbers, keys -> str."""
    return strict_json(x, inf_as_text=True)


def _numbers(x):
    if isinstance(x, dict):
        return {k: _numbers(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_numbers(v) for v in x]
    return INFINITIES.get(x, x) if isinstance(x, str) else x


def loads_record(text: str) -> dict:
    """One record (``metrics.json`` or a ``results.jsonl`` line) with the ``"inf"`` / ``"-inf"`` of
    its numeric sections restored to float infinities."""
    rec = json.loads(text)
    for key in NUMERIC_SECTIONS:
        if isinstance(rec.get(key), dict):
            rec[key] = _numbers(rec[key])
    return rec


def read_record(path: str | Path) -> dict:
    return loads_record(Path(path).read_text())


def write_record(path: str | Path, rec: dict) -> Path:
    """``metrics.json``: strict JSON, written atomically."""
    return atomic_write_json(path, json_safe(rec))


def write_results(path: str | Path, lines: list[dict]) -> Path:
    """``results.jsonl``: one strict JSON record per line, written atomically."""
    return atomic_write_text(path, "".join(dumps_strict(json_safe(x)) + "\n" for x in lines))


def to_eval_config(cfg) -> EvalConfig:
    """DictConfig (from Hydra) or EvalConfig -> validated EvalConfig (``wan_animate.options.to_dataclass``)."""
    try:
        return to_dataclass(cfg, EvalConfig)
    except MissingMandatoryValue as e:
        raise ValueError(f"{e.full_key} is required: python eval/main.py model_dir=MODEL_FOLDER "
                         "eval_set=SHARDS_OR_PAIRS_FOLDER [overrides]") from None


def result_config(cfg: EvalConfig) -> dict:
    """The config fields that decide a cell's numbers (compared to skip a finished cell)."""
    d = dataclasses.asdict(cfg)
    for k in NON_RESULT_FIELDS:
        d.pop(k, None)
    return d
