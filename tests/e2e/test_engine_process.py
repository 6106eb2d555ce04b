"""The engine in its own process: the API worker never holds the weights, and tensor-parallel ranks wait
for work on their control queues, never inside a collective, so an idle world outlives its timeout."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import psutil
import pytest
from reliability.scenarios import write_catalog
from servers import Server, serve
from test_openai_errors_vision import data_uri, image_message, png_bytes

COLLECTIVE_TIMEOUT_S = 15


def mapped_shards(pid: int) -> set[str]:
    """The safetensors files a process has mapped (torch keeps loaded weights as views of them)."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split()[-1] for line in lines if line.endswith(".safetensors")}


def test_engine_process_holds_the_weights_the_api_worker_does_not(text_server: Server) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    assert httpx.post(f"{text_server.url}/chat", json=body, timeout=60).status_code == 200
    children = psutil.Process(text_server.process.pid).children(recursive=True)
    workers = [p for p in children if "worker.service" in " ".join(p.cmdline())]
    ranks = [p for p in children if "multiprocessing.spawn" in " ".join(p.cmdline())]
    assert len(workers) == 1 and len(ranks) == 1
    assert mapped_shards(ranks[0].pid)  # the rank holds the model's shards
    assert not mapped_shards(workers[0].pid)  # the worker that serves HTTP holds none


@pytest.fixture(scope="module")
def vision_tp_server(log_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    fields = {"gpus": 2, "device": "cpu", "parallel": "tensor"}
    catalog = write_catalog(
        tmp_path_factory.mktemp("glm4v-idle"), "tiny-glm4v-idle", base="tiny-glm4v", **fields
    )
    env = {"SHARDBENTO_CATALOG": str(catalog), "SHARDBENTO_COLLECTIVE_TIMEOUT_S": str(COLLECTIVE_TIMEOUT_S)}
    with serve("tiny-glm4v-idle", log_dir, env=env, ready_timeout_s=300) as server:
        yield server


def test_tensor_parallel_vision_idle_past_the_collective_timeout_is_served(vision_tp_server: Server) -> None:
    """Two CPU ranks with a 15 s collective timeout: an image request, the world idle for longer than
    the timeout (a follower waiting in a collective would have failed by then), another image request."""
    body = {
        "model": "tiny-glm4v-idle",
        "messages": image_message(data_uri(png_bytes())),
        "max_tokens": 6,
        "temperature": 0,
    }
    url = f"{vision_tp_server.url}/v1/chat/completions"
    first = httpx.post(url, json=body, timeout=120)
    assert first.status_code == 200, first.text
    time.sleep(COLLECTIVE_TIMEOUT_S + 5)  # idle: what is tested is outliving the timeout
    second = httpx.post(url, json=body, timeout=120)
    assert second.status_code == 200, second.text
    assert second.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
