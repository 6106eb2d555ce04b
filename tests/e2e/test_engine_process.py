"""The engine in its own process: the API worker never holds the weights, and tensor-parallel ranks wait
for work on their control queues, never inside a collective, so an idle world outlives its timeout."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import psutil
import pytest
from reliability.scenarios import write_catalog
from servers import Server, serve
from test_openai_errors_vision import data_uri, image_message, png_bytes

from shardbento.engine.core.affinity import USER_SETTINGS

COLLECTIVE_TIMEOUT_S = 15
BINDS = pytest.mark.skipif(  # where the service binds a CPU rank's threads
    len(os.sched_getaffinity(0)) < 2 or bool(set(USER_SETTINGS) & set(os.environ)),
    reason="needs 2 CPUs and no OpenMP placement of the user's",
)


def mapped_shards(pid: int) -> set[str]:
    """The safetensors files a process has mapped (torch keeps loaded weights as views of them)."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split()[-1] for line in lines if line.endswith(".safetensors")}


def test_engine_process_holds_the_weights_the_api_worker_does_not(text_server: Server) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    assert httpx.post(f"{text_server.url}/chat", json=body, timeout=60).status_code == 200
    children = psutil.Process(text_server.process.pid).children(recursive=True)
    workers = [p for p in children if "worker.service" in " ".join(p.cmdline())]
    ranks = rank_processes(text_server)
    assert len(workers) == 1 and len(ranks) == 1
    assert mapped_shards(ranks[0].pid)  # the rank holds the model's shards
    assert not mapped_shards(workers[0].pid)  # the worker that serves HTTP holds none


def rank_processes(server: Server) -> list[psutil.Process]:
    children = psutil.Process(server.process.pid).children(recursive=True)
    return [p for p in children if "multiprocessing.spawn" in " ".join(p.cmdline())]


def main_thread_cpus(process: psutil.Process) -> set[int]:
    return set(os.sched_getaffinity(process.pid))


@BINDS
def test_served_cpu_rank_keeps_its_openmp_threads_on_cores_of_their_own(text_server: Server) -> None:
    """The service's CPU rank was spawned bound: its main thread keeps to one core and an OpenMP
    worker to another (the service process itself is not bound)."""
    (rank,) = rank_processes(text_server)
    main = main_thread_cpus(rank)
    assert main < set(os.sched_getaffinity(0))
    assert any(set(os.sched_getaffinity(t.id)).isdisjoint(main) for t in rank.threads())
    workers = [p for p in psutil.Process(text_server.process.pid).children(recursive=True) if p not in [rank]]
    assert all(set(os.sched_getaffinity(p.pid)) == set(os.sched_getaffinity(0)) for p in workers)


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


@BINDS
def test_tensor_parallel_cpu_ranks_each_keep_a_cpu_of_their_own(vision_tp_server: Server) -> None:
    ranks = rank_processes(vision_tp_server)
    assert len(ranks) == 2
    first, second = (main_thread_cpus(rank) for rank in ranks)
    assert len(first) == len(second) == 1 and first != second
