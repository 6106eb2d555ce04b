"""deploy/ray/wait_for_nodes.py against a real single-node Ray cluster (skipped where Ray is not installed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "ray" / "wait_for_nodes.py"


def test_wait_for_nodes_single_node_cluster_is_complete() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "1", "--address", "local", "--timeout-s", "60"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Ray cluster has 1 nodes" in done.stdout


def test_wait_for_nodes_missing_workers_times_out() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "2", "--address", "local", "--timeout-s", "3"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 1
    assert "only 1 of 2 Ray nodes" in done.stderr
