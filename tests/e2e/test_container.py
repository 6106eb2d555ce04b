"""`bentoml containerize` with podman: the image starts with `serve` and answers /readyz and /chat.

Opt-in (`make container`: minutes and GBs): runs only with SHARDBENTO_CONTAINER_TEST=1 and a podman
that can run containers, and needs the local base image of env/podman/base-image.sh.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from servers import free_port

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny-llama"
BASE_IMAGE = "docker.io/library/python:3.11-slim"


def _podman_problem(env: dict[str, str]) -> str | None:
    if os.environ.get("SHARDBENTO_CONTAINER_TEST") != "1":
        return "opt-in: run `make container` (SHARDBENTO_CONTAINER_TEST=1)"
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install podman runc)"
    probe = subprocess.run(["podman", "info"], env=env, capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        return f"podman cannot run here: {probe.stderr.strip()[-500:]}"
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE], env=env).returncode != 0:
        return f"no local base image {BASE_IMAGE}: run env/podman/base-image.sh (make container does)"
    return None


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = {
        **os.environ,
        "CONTAINERS_CONF": str(REPO / "env" / "podman" / "containers.conf"),
        "BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml-home")),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    problem = _podman_problem(env)
    if problem:
        pytest.skip(problem)
    return env


def _run(command: list[str], env: dict[str, str], timeout_s: float) -> str:
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, f"{command}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_container_serves_chat(env: dict[str, str], record_property) -> None:
    started = time.monotonic()
    tag = _run([sys.executable, "-m", "shardbento", "bento", MODEL], env, 300).strip().splitlines()[-1]
    image = f"localhost/{tag}"
    bentoml = str(Path(sys.executable).parent / "bentoml")
    build = [bentoml, "containerize", tag, "--backend", "podman", "-t", image, "--opt", "network=host"]
    _run(build, env, 3600)
    build_s = time.monotonic() - started
    size_bytes = json.loads(_run(["podman", "image", "inspect", image], env, 60))[0]["Size"]
    port = free_port()
    name = f"shardbento-test-{port}"
    run = ["podman", "run", "-d", "--rm", "--name", name, "--network", "host", "-e", f"PORT={port}"]
    _run([*run, "--shm-size", "1g", image, "serve"], env, 120)
    started = time.monotonic()
    try:
        _wait_ready(f"http://127.0.0.1:{port}", name, env, timeout_s=300)
        ready_s = time.monotonic() - started
        body = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}
        answer = httpx.post(f"http://127.0.0.1:{port}/chat", json=body, timeout=120).json()
        assert answer["model"] == MODEL and answer["usage"]["completion_tokens"] >= 1
    finally:
        subprocess.run(["podman", "rm", "-f", name], env=env, capture_output=True, timeout=120)
        subprocess.run(["podman", "rmi", "-f", image], env=env, capture_output=True, timeout=120)
    numbers = {
        "build_s": round(build_s),
        "image_gib": round(size_bytes / 2**30, 2),
        "ready_s": round(ready_s, 1),
    }
    record_property("container", numbers)
    print(f"container {image}: {numbers}")


def _wait_ready(url: str, name: str, env: dict[str, str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    logs = subprocess.run(["podman", "logs", name], env=env, capture_output=True, text=True).stdout
    raise TimeoutError(f"container not ready after {timeout_s} s:\n{logs[-4000:]}")
