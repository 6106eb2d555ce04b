"""`python -m shardbento bench` against a real `bentoml serve`: fixed lengths, every level, the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from servers import REPO, Server, metric_total


def test_bench_cli_reports_on_the_service(text_server: Server, tmp_path: Path) -> None:
    report_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    command = [sys.executable, "-m", "shardbento", "bench", "--url", text_server.url]
    command += ["--concurrency", "1,3", "--input-tokens", "40", "--output-tokens", "6", "--warmup", "1"]
    command += ["--requests-per-client", "1", "--min-requests", "2", "--json", str(report_path)]
    command += ["--plot", str(plot_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["model"] == "tiny-llama" and report["fixed_length"] is True
    assert [level["concurrency"] for level in report["levels"]] == [1, 3]
    for level in report["levels"]:
        assert level["errors"] == 0
        assert level["output_tokens_received"] == level["requests"] * report["output_tokens"]
        assert level["ttft_ms"]["p50"] <= level["e2e_ms"]["p50"]
        assert level["tpot_ms"]["p50"] is not None and level["output_token_throughput_per_s"] > 0
    assert [level["requests"] for level in report["levels"]] == [2, 3]
    assert "| c | requests |" in done.stdout
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_cli_shared_prefix_and_turns_reach_the_prefix_cache(
    text_server: Server, tmp_path: Path
) -> None:
    """--shared-prefix-tokens and --turns: later turns carry the earlier ones (longer prompts) and the
    server reuses the shared system prompt and the earlier turns from its prefix cache."""
    report_path = tmp_path / "bench.json"
    command = [sys.executable, "-m", "shardbento", "bench", "--url", text_server.url, "--concurrency", "1"]
    command += ["--input-tokens", "20", "--output-tokens", "6", "--warmup", "0", "--min-requests", "6"]
    command += ["--requests-per-client", "1", "--shared-prefix-tokens", "200", "--turns", "3"]
    command += ["--json", str(report_path)]
    hits = metric_total(text_server, "prefix_cache_hits_total")
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    level = report["levels"][0]
    assert (report["shared_prefix_tokens"], report["turns"], level["requests"], level["errors"]) == (
        200,
        3,
        6,
        0,
    )
    assert level["mean_prompt_tokens"] > 200 + 20  # the system prompt, and the turns before
    reused = metric_total(text_server, "prefix_cache_hits_total") - hits
    assert reused >= 4 * 160  # five later requests each reuse most of the system prompt, at least
