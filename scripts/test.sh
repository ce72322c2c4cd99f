#!/usr/bin/env bash
# Install the project (CPU torch first, so the project's install keeps that build) and run the suite.
set -euo pipefail
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev,pose]"
# Two workers, one test file each at a time (module fixtures stay in one process), files handed out
# in collection order (tests/conftest.py puts the longest first): the whole suite, slow tests included
# (~9 min of pytest on 2 cores, measured; README.md; three workers measured slower than two).
python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --no-loadscope-reorder tests "$@"
