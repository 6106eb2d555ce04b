"""benchmarks/side_by_side.py's arithmetic: per-level model.generate runs merge into one ceiling."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "side_by_side.py"


def test_side_by_side_merges_per_level_generate_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("side_by_side", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    runs = [
        {"levels": {"1": 70.0}, "prefill_ms": 50.0, "tpot_ms": 12.5},
        {"levels": {"4": 200.0}, "prefill_ms": 47.0, "tpot_ms": 12.0},
        {"levels": {"16": 520.0}, "prefill_ms": 49.0, "tpot_ms": 13.0},
    ]
    merged = module.merge_levels(runs)
    assert merged["levels"] == {level: tok_s for run in runs for level, tok_s in run["levels"].items()}
    assert merged["prefill_ms"] == statistics.median(run["prefill_ms"] for run in runs)
    assert merged["tpot_ms"] == statistics.median(run["tpot_ms"] for run in runs)
