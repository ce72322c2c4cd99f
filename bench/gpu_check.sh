#!/usr/bin/env bash
# The first checks on a one-GPU machine (bench/gpu_check.py; docs/gpu.md), ~8 min on one H100:
#
#   bash bench/gpu_check.sh [--json FILE] [--only NAME ...] [--cpu-all]
#
# When the project's dependencies are not importable and .whl/ (scripts/gpu_wheelhouse.sh) holds
# wheels, they are installed offline into a folder put first on PYTHONPATH. Runs on the CPU too.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.whl}
SITE=${GPU_CHECK_SITE:-/tmp/wan-animate-site}

missing=$("$PY" -c 'import importlib.util as u; print(*[m for m in ("diffusers", "deepspeed", "hydra", "omegaconf",
    "webdataset", "peft", "torchao", "av", "ftfy") if u.find_spec(m) is None])')
if [[ -n "$missing" ]]; then
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "missing: $missing; build the wheels with scripts/gpu_wheelhouse.sh and carry .whl (docs/gpu.md)" >&2
        exit 2
    fi
    echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE (missing: $missing)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
exec "$PY" bench/gpu_check.py "$@"
