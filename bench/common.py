"""What the CPU bench scripts share: the sample clip, the command line they print, the report output."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The real sample clip kept in the repo (Wan2.2 examples, Apache-2.0; tests/fixtures/wan_examples/README.md).
SAMPLE_VIDEO = REPO_ROOT / "tests" / "fixtures" / "wan_examples" / "replace" / "video.mp4"


def command_line(script: str) -> str:
    """``python bench/<script>.py <args>`` as it was run, for the report's header."""
    return "python " + " ".join([os.path.relpath(script, REPO_ROOT)] + sys.argv[1:])


def write_report(lines: list[str], out: str | None) -> None:
    """Print the markdown report and, with ``--out``, also write it to that file."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).write_text(text)
