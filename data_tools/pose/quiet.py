"""Keep mediapipe's native log lines out of the terminal (64 of 75 lines of an eval
log were mediapipe / TFLite / absl lines inside progress bars).

Mediapipe's C++ side logs through absl before ``absl::InitializeLog`` (so everything goes to the
process's stderr, fd 2, with no Python switch to turn it off) and TFLite prints its delegate
banner there too. ``import_mediapipe()`` sets the switches that older builds honour
(``GLOG_minloglevel``, ``TF_CPP_MIN_LOG_LEVEL``, Python absl verbosity) before the first import;
``native_stderr_filtered()`` redirects fd 2 around mediapipe calls and afterwards writes back
every line that is not known info/warning noise, so real errors (``E``/``F`` lines, tracebacks,
anything unknown) still reach the user.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

# Info / warning lines of mediapipe's absl/glog logging and TFLite's banner; E and F lines stay.
NOISE = re.compile(
    r"^(?:[IW]\d{4} \S+ +\d+ \S+:\d+\] "
    r"|INFO: Created TensorFlow Lite"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR)"
)


def import_mediapipe(what: str = "the mediapipe pose backend"):
    """``import mediapipe`` with its log switches set first (only where the user has not); without
    the ``[pose]`` extra a ``PoseBackendError`` saying that ``what`` needs it."""
    from data_tools.pose.base import PoseBackendError

    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import mediapipe
    except ImportError as e:
        raise PoseBackendError(f"{what}: mediapipe is not installed; pip install -e '.[pose]'") from e
    from absl import logging as absl_logging  # a dependency of mediapipe

    absl_logging.set_verbosity(absl_logging.ERROR)
    return mediapipe


@contextlib.contextmanager
def native_stderr_filtered():
    """Capture fd 2 (native code writes there directly) and re-emit all but the noise lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not NOISE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
