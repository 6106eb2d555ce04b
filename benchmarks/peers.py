"""The benchmark scripts' shared parts: a server started in its own process group, ready when it answers a
one-token chat completion, stopped with everything it spawned; one concurrency level of
`python -m shardbento bench` against it; and docs/benchmarks.md's sections each script owns."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Peer:
    label: str
    command: list[str]
    env: dict[str, str]
    model: str
    program: Path
    ready_timeout_s: float = 300.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_args(peer: Peer, port: int) -> list[str]:
    return ["--host", "127.0.0.1", "--port", str(port)]


def wait_ready(url: str, model: str, process: subprocess.Popen, timeout_s: float) -> None:
    """Ready when a one-token chat completion answers 200 (every peer has that endpoint)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).status_code == 200:
                return
        time.sleep(1)
    raise TimeoutError(f"not ready after {timeout_s} s")


def stop(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """Stop a server's whole process group and wait until every process in it is gone (vLLM's engine
    and worker processes outlive the API server by seconds, and would load the next measurement)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _group_alive(process) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _group_alive(process: subprocess.Popen) -> bool:
    process.poll()  # reaps the leader once it exits, so only live members answer the signal below
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Running:
    peer: Peer
    process: subprocess.Popen
    url: str
    log_path: Path


def start_peer(peer: Peer, work: Path) -> Running | str:
    """A started, ready server, or why not (a missing program or a failed start is reported, not fatal)."""
    if not peer.program.exists():
        return f"skipped: {peer.program} not found"
    port = free_port()
    log_path = work / f"{peer.label.replace(' ', '_').replace('-', '')}.log"
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", **peer.env}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*peer.command, *port_args(peer, port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
    running = Running(peer, process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_ready(running.url, peer.model, process, peer.ready_timeout_s)
    except Exception as exc:  # noqa: BLE001 - one peer failing must not lose the others' figures
        stop(process)
        return f"failed to start: {type(exc).__name__}: {exc} (log: {log_path})"
    return running


def bench_level(
    running: Running,
    level: int,
    args: argparse.Namespace,
    work: Path,
    extra: list[str] | None = None,
    tag: str = "",
    seed: int | None = None,
) -> dict | str:
    """One concurrency level of `python -m shardbento bench` against a running server (`extra`: more
    bench arguments, e.g. a response format). `seed` picks the prompts (default: the level); a script
    that measures one server more than once gives each measurement a seed of its own, or the later
    ones find the earlier prompts in the server's prefix cache and skip their prefill."""
    name = f"{running.log_path.stem}-c{level}-{tag}".replace(" ", "_").replace(",", "")
    report_path = work / f"{name}.json"
    command = [
        sys.executable,
        "-m",
        "shardbento",
        "bench",
        "--url",
        running.url,
        "--model",
        running.peer.model,
    ]
    command += [
        "--concurrency",
        str(level),
        "--input-tokens",
        str(args.input_tokens),
        "--seed",
        str(level if seed is None else seed),
    ]
    command += ["--output-tokens", str(args.output_tokens), "--label", running.peer.label]
    command += ["--requests-per-client", str(args.requests_per_client)]
    command += ["--min-requests", str(args.min_requests), "--json", str(report_path), *(extra or [])]
    try:
        subprocess.run(command, cwd=REPO, check=True, timeout=3600)
    except Exception as exc:  # noqa: BLE001
        return f"failed: {type(exc).__name__}: {exc}"
    return json.loads(report_path.read_text())


SECTION_MARK = "<!-- section:"  # sections other scripts own (benchmarks/constrained.py), kept on rewrite


def keep_sections(path: Path) -> str:
    """The file's text from the first section another script owns, to be written back after ours."""
    text = path.read_text() if path.exists() else ""
    at = text.find(SECTION_MARK)
    return "\n" + text[at:] if at >= 0 else ""


def replace_section(path: Path, name: str, body: str) -> None:
    """Write `body` as section `name` of the file (replacing that section, keeping the rest)."""
    begin, end = f"{SECTION_MARK} {name} -->", f"<!-- end: {name} -->"
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) + 1 :]
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text)


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
