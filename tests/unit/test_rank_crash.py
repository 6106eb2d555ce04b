"""A rank that crashes in native code leaves its Python stack in the log, not only an exit code."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CRASHING_RANK = """
import ctypes
from shardbento.engine.core.rank import report_crashes

def sample_step():
    ctypes.string_at(0)  # reads address 0: a segfault, as a faulty kernel or extension would

report_crashes()
sample_step()
"""


def test_rank_crash_in_native_code_prints_the_python_stack() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CRASHING_RANK], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in done.stderr
    assert "sample_step" in done.stderr  # the frame that crashed is named
