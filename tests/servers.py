"""Real `bentoml serve` subprocesses for tests: free ports, wait for /readyz, clean shutdown."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
BENTOML = Path(sys.executable).parent / "bentoml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check: Callable[[], object], what: str, timeout_s: float = 60, poll_s: float = 0.1) -> object:
    """Poll `check` until it returns something truthy (returned); fail naming `what` after `timeout_s`.

    Tests wait for the state they assert with this, never for a fixed time.
    """
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, f"{what}: not reached within {timeout_s:g} s"
        time.sleep(poll_s)
    return result


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_ready(server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"server not ready after {timeout_s} s:\n{server.log()[-4000:]}")


@contextlib.contextmanager
def serve(
    model: str,
    log_dir: Path,
    *,
    target: str = "service:ShardBento",
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    ready_timeout_s: float = 180,
    wait: bool = True,
    bentoml: Path = BENTOML,
) -> Iterator[Server]:
    """`bentoml serve` for a catalog model on a free port; stopped (SIGTERM, then SIGKILL) on exit.
    `bentoml` may be another venv's (the vLLM engine's), so a client venv can drive that server."""
    port = free_port()
    log_path = log_dir / f"serve-{model}-{port}.log"
    # Each server its own BENTOML_HOME: a BentoML server starting or stopping empties the Prometheus
    # multiprocess directory under it, which hides the metrics of every other server sharing it.
    home = {"BENTOML_HOME": str(tempfile.mkdtemp(prefix=f"bentoml-home-{port}-", dir=log_dir))}
    command = [str(bentoml), "serve", target, "--port", str(port), "--host", "127.0.0.1"]
    command += ["--arg", f"model={model}", *(args or [])]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "BENTOML_DO_NOT_TRACK": "true", **home, **(env or {})},
            start_new_session=True,
        )
    server = Server(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    try:
        if wait:
            wait_ready(server, ready_timeout_s)
        yield server
    finally:
        stop(process)


def stop(process: subprocess.Popen, timeout_s: float = 20) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def metric_total(server: Server, name: str) -> float:
    """A shardbento metric from the server's /metrics, summed over its label sets."""
    import httpx

    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    prefix = f"shardbento:{name}{{"
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))
