"""Bench report arithmetic: percentiles, TPOT/ITL from chunk times, throughput, the table."""

from __future__ import annotations

import random

import numpy as np

from shardbento.bench.loadgen import RequestResult, chat_url
from shardbento.bench.report import percentile, summarize, table


def test_report_percentile_matches_numpy() -> None:
    rng = random.Random(3)
    values = [rng.random() for _ in range(37)]
    for q in (0, 50, 90, 99, 100):
        assert abs(percentile(values, q) - float(np.percentile(values, q))) < 1e-12
    assert percentile([], 50) is None


def test_report_summarize_derives_latencies_and_throughput() -> None:
    chunks = [0.1, 0.3, 0.6, 1.0]
    ok = RequestResult(
        ok=True, ttft_s=0.1, e2e_s=1.0, output_tokens=4, chunk_times_s=chunks, prompt_tokens=20
    )
    failed = RequestResult(ok=False, error="HTTP 429: busy")
    level = summarize([ok, ok, failed], wall_s=2.0, concurrency=2)
    assert (level["requests"], level["errors"], level["error_samples"]) == (3, 1, ["HTTP 429: busy"])
    assert level["output_tokens_received"] == 8
    assert level["output_token_throughput_per_s"] == 4.0
    assert level["tpot_ms"]["p50"] == round((1.0 - 0.1) / 3 * 1000, 3)
    gaps = [b - a for a, b in zip(chunks, chunks[1:], strict=False)] * 2
    assert level["itl_ms"]["p50"] == round(float(np.percentile(gaps, 50)) * 1000, 3)
    assert level["ttft_ms"]["p99"] == 100.0 and level["mean_prompt_tokens"] == 20
    rows = table([level]).splitlines()
    assert len(rows) == 3 and rows[2].startswith("| 2 | 3 | 1 | 4.0 |")


def test_loadgen_chat_url_accepts_base_or_full_path() -> None:
    full = "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1") == chat_url("http://h:1/v1/") == chat_url(full) == full
