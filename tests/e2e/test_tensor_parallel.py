"""A 2-rank CPU tensor-parallel service (gloo) against one process, through the real HTTP API."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest
from servers import Server, serve

PROMPTS = ["The quick brown fox", "Once upon a time", "1, 2, 3,"]


@pytest.fixture(scope="module")
def tp_server(log_dir: Path):
    with serve("tiny-llama-tp2", log_dir, ready_timeout_s=300) as server:
        yield server


def _generate(server: Server, prompt: str, **sampling: object) -> dict:
    response = httpx.post(
        f"{server.url}/generate", json={"prompt": prompt, "max_tokens": 24, **sampling}, timeout=120
    )
    assert response.status_code == 200, response.text
    return response.json()


def _rank_pids(server: Server) -> list[int]:
    """The spawned rank processes under the server (the resource tracker excluded)."""
    children = psutil.Process(server.process.pid).children(recursive=True)
    return [p.pid for p in children if "spawn_main" in " ".join(p.cmdline())]


def test_tensor_parallel_greedy_tokens_equal_single_process(tp_server: Server, text_server: Server) -> None:
    for prompt in PROMPTS:
        sharded, single = _generate(tp_server, prompt), _generate(text_server, prompt)
        assert sharded["text"] == single["text"]
        assert sharded["usage"] == single["usage"]


def test_tensor_parallel_seeded_sampling_equals_single_process(
    tp_server: Server, text_server: Server
) -> None:
    sampling = {"temperature": 0.8, "seed": 1234}
    assert (
        _generate(tp_server, PROMPTS[0], **sampling)["text"]
        == _generate(text_server, PROMPTS[0], **sampling)["text"]
    )


def test_tensor_parallel_models_reports_tensor_mode(tp_server: Server) -> None:
    card = httpx.post(f"{tp_server.url}/models", json={}, timeout=10).json()
    assert card["parallel"] == "tensor x2"
    assert len(card["devices"]) == 2


def test_tensor_parallel_dead_rank_fails_fast(log_dir: Path) -> None:
    with serve("tiny-llama-tp2", log_dir, ready_timeout_s=300) as server:
        ranks = _rank_pids(server)
        assert len(ranks) == 2
        os.kill(ranks[-1], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200:
            assert time.monotonic() < deadline, "/readyz still 200 after a rank died"
            time.sleep(0.2)
        started = time.monotonic()
        response = httpx.post(f"{server.url}/generate", json={"prompt": "hi", "max_tokens": 8}, timeout=30)
        assert response.status_code == 503
        assert "not serving" in response.json()["error"]["message"]
        assert "tensor-parallel rank" in server.log()
        assert time.monotonic() - started < 5
        assert all(
            not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            for pid in ranks
        )
