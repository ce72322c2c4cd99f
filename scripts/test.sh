#!/usr/bin/env bash
# Install the project (CPU torch first, so the project's install keeps that build) and run the suite.
set -euo pipefail
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev,pose]"
python -m pytest -q -p no:cacheprovider tests "$@"
