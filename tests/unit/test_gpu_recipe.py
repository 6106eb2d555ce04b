"""benchmarks/gpu_recipe.py, the GPU run of the throughput benchmark: its CPU smoke mode runs the real
scheduler end to end, so the script cannot rot while no GPU is lent."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_recipe.py"


def recipe_module():
    spec = importlib.util.spec_from_file_location("gpu_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # a subprocess
def test_gpu_recipe_smoke_run_reports_decode_rate_and_batched_throughput() -> None:
    command = [sys.executable, str(RECIPE), "--device", "cpu", "--tiny", "--bandwidth-gbps", "20"]
    command += ["--concurrency", "3", "--input-tokens", "12", "--output-tokens", "6"]
    report = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    assert report["device"] == "cpu" and report["bandwidth_gbps"] == 20.0
    assert report["batch1_decode_tok_s"] > 0 and report["concurrency_3_tok_s"] > 0
    limit = report["hbm_limit_tok_s"]
    assert abs(limit - 20e9 / (report["weight_gib"] * 2**30)) / limit < 0.05  # weight_gib is rounded
    assert abs(report["fraction_of_limit"] - report["batch1_decode_tok_s"] / limit) < 0.002


@pytest.mark.slow  # a subprocess
def test_gpu_recipe_needs_a_bandwidth_for_an_unknown_device() -> None:
    command = [sys.executable, str(RECIPE), "--device", "cpu", "--tiny"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2 and "--bandwidth-gbps" in result.stderr


def test_gpu_recipe_bandwidth_lookup_prefers_the_specific_name() -> None:
    recipe = recipe_module()
    assert recipe.bandwidth_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert recipe.bandwidth_gbps("NVIDIA H100 PCIe") == 2000.0
    assert recipe.bandwidth_gbps("NVIDIA H200") == 4800.0
    assert recipe.bandwidth_gbps("NVIDIA A100-SXM4-80GB") == 2039.0
    assert recipe.bandwidth_gbps("cpu") is None
