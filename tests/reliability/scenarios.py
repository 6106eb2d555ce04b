"""Fault scenarios against real `bentoml serve` processes, each returning what a client saw."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import yaml
from servers import REPO, Server, serve

CHAT = {"messages": [{"role": "user", "content": "Tell me something."}], "max_tokens": 6}


@dataclass(frozen=True, slots=True)
class Guarded:
    """How the guarded test server is configured: small limits so overload and 413s are reachable."""

    api_key: str
    max_body_bytes: int = 64 * 1024
    max_num_seqs: int = 4
    max_waiting: int = 4
    request_timeout_s: float = 20.0

    @property
    def max_in_flight(self) -> int:
        return self.max_num_seqs + self.max_waiting

    def env(self, catalog: Path) -> dict[str, str]:
        return {
            "SHARDBENTO_CATALOG": str(catalog),
            "SHARDBENTO_API_KEY": self.api_key,
            "SHARDBENTO_FAULT_INJECTION": "1",
            "SHARDBENTO_MAX_BODY_BYTES": str(self.max_body_bytes),
            "SHARDBENTO_REQUEST_TIMEOUT_S": str(self.request_timeout_s),
        }


def write_catalog(directory: Path, name: str, base: str = "tiny-llama", **fields: object) -> Path:
    """A catalog dir holding one entry: the shipped `base` entry with `fields` replaced."""
    directory.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load((REPO / "models" / f"{base}.yaml").read_text())
    (directory / f"{name}.yaml").write_text(yaml.safe_dump({**data, **fields}))
    return directory


def guarded_config() -> Guarded:
    return Guarded(api_key=secrets.token_urlsafe(24))


def guarded_catalog(directory: Path, config: Guarded) -> Path:
    limits = {"max_num_seqs": config.max_num_seqs, "max_waiting": config.max_waiting}
    return write_catalog(directory, "tiny-llama", limits=limits)


def corrupt_shard(log_dir: Path, work_dir: Path) -> dict[str, object]:
    """A truncated weight shard: the server never gets ready; probes and requests name the file."""
    from shardbento.tiny.models import ensure_generated

    model_dir = work_dir / "broken-model"
    shutil.copytree(ensure_generated("tiny-llama"), model_dir)
    shard = sorted(model_dir.glob("*.safetensors"))[-1]
    os.truncate(shard, shard.stat().st_size // 2)
    catalog = write_catalog(work_dir / "broken-catalog", "broken", source=str(model_dir))
    with serve("broken", log_dir, env={"SHARDBENTO_CATALOG": str(catalog)}, wait=False) as server:
        livez = _wait_status(server, "/livez", 503, timeout_s=120)
        chat = httpx.post(f"{server.url}/chat", json=CHAT, timeout=10)
        return {
            "shard": str(shard),
            "livez": livez,
            "readyz": httpx.get(f"{server.url}/readyz", timeout=10).status_code,
            "chat_status": chat.status_code,
            "chat_error": chat.json()["error"],
            "log_names_shard": str(shard) in server.log(),
        }


def _wait_status(server: Server, path: str, status: int, timeout_s: float) -> int | None:
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        try:
            seen = httpx.get(f"{server.url}{path}", timeout=5).status_code
        except httpx.HTTPError:
            seen = None
        if seen == status:
            return seen
        time.sleep(0.5)
    return seen


def sigterm_drain(log_dir: Path, grace_s: int = 2, num_long: int = 16) -> dict[str, object]:
    """SIGTERM with one short stream and `num_long` endless ones in flight (EOS ignored, 2,000 tokens
    each, the whole context: far more work than the grace period holds): the short one ends whole, the
    endless ones are cut at the grace period, and the server exits cleanly soon after."""
    args = ["--timeout-graceful-shutdown", str(grace_s)]
    results: dict[str, object] = {}
    short = ("/chat_stream", {**CHAT, "max_tokens": 24})
    # 1,000 tokens were not always enough: the stream that started first once finished 1,000 while
    # the others, begun later, were cut at 600-750
    catalog = write_catalog(log_dir / f"drain-{secrets.token_hex(4)}", "tiny-llama", max_model_len=2048)
    endless = {"model": "tiny-llama", **CHAT, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with serve("tiny-llama", log_dir, args=args, env={"SHARDBENTO_CATALOG": str(catalog)}) as server:
        started = {name: threading.Event() for name in ["short", *(f"long{i}" for i in range(num_long))]}
        threads = [
            threading.Thread(target=_stream, args=(server.url, *short, "short", results, started["short"]))
        ]
        threads += [
            threading.Thread(
                target=_stream,
                args=(server.url, "/v1/chat/completions", endless, name, results, started[name]),
            )
            for name in started
            if name != "short"
        ]
        for thread in threads:
            thread.start()
        for event in started.values():
            event.wait(60)  # every stream is under way when the signal comes
        signalled = time.monotonic()
        os.killpg(server.process.pid, signal.SIGTERM)
        server.process.wait(timeout=grace_s + 60)
        results["exit_after_s"] = round(time.monotonic() - signalled, 1)
        results["exit_code"] = server.process.returncode
        for thread in threads:
            thread.join(timeout=30)
        results["grace_s"] = grace_s
        longs = [results[name] for name in started if name != "short"]
        results["long_cut"] = sum(1 for r in longs if not r["done"])
        results["long_count"] = len(longs)
    return results


def _stream(url: str, path: str, body: dict, name: str, results: dict, started: threading.Event) -> None:
    """Read a stream to its end; record its chunks, whether the body ended cleanly, and whether an SSE
    stream said [DONE] (a /v1 stream cut by the server does not)."""
    chunks, done = 0, False
    try:
        with httpx.stream("POST", f"{url}{path}", json=body, timeout=120) as response:
            for line in response.iter_lines() if path.startswith("/v1") else response.iter_raw():
                chunks += 1
                done = done or line == "data: [DONE]"
                started.set()
        results[name] = {"status": response.status_code, "chunks": chunks, "complete": True, "done": done}
    except httpx.HTTPError as exc:
        results[name] = {"chunks": chunks, "complete": False, "done": done, "error": type(exc).__name__}
    finally:
        started.set()


def dead_rank(log_dir: Path) -> dict[str, object]:
    """Kill one tensor-parallel rank: /readyz fails and a request gets a 503 at once."""
    with serve("tiny-llama-tp2", log_dir, ready_timeout_s=300) as server:
        ok = httpx.post(f"{server.url}/chat", json=CHAT, timeout=60).status_code
        ranks = _engine_processes(server)
        ranks[-1].kill()
        readyz = _wait_status(server, "/readyz", 503, timeout_s=30)
        started = time.monotonic()
        chat = httpx.post(f"{server.url}/chat", json=CHAT, timeout=60)
        chat_after_s = round(time.monotonic() - started, 2)
        return {
            "ranks": len(ranks),
            "chat_before": ok,
            "readyz_after": readyz,
            "chat_after": chat.status_code,
            "chat_after_s": chat_after_s,
            "retry_after": chat.headers.get("retry-after"),
            "chat_error": json.loads(chat.text).get("error"),
            "log_names_rank": "engine rank" in server.log(),
            "ranks_reaped": _reaped(ranks, timeout_s=30),
        }


def dead_engine(log_dir: Path) -> dict[str, object]:
    """Kill the one engine process while a stream is open: the stream ends with an error event, later
    requests get a 503 at once, /readyz and /livez answer 503 (the service asks to be restarted)."""
    with serve("tiny-llama", log_dir, ready_timeout_s=300) as server:
        engine = _engine_processes(server)
        body = {**CHAT, "max_tokens": 900, "ignore_eos": True, "stream": True, "model": "tiny-llama"}
        events: list[str] = []
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as stream:
            status = stream.status_code
            lines = stream.iter_lines()
            while len(events) < 3:  # the stream is under way: its first chunks arrived
                line = next(lines)
                if line.startswith("data: "):
                    events.append(line[6:])
            engine[0].kill()
            events.extend(line[6:] for line in lines if line.startswith("data: "))
        livez = _wait_status(server, "/livez", 503, timeout_s=30)
        started = time.monotonic()
        chat = httpx.post(f"{server.url}/chat", json=CHAT, timeout=60)
        return {
            "engine_processes": len(engine),
            "stream_status": status,
            "last_event": json.loads(events[-1]) if events[-1] != "[DONE]" else "[DONE]",
            "livez_after": livez,
            "readyz_after": httpx.get(f"{server.url}/readyz", timeout=10).status_code,
            "chat_after": chat.status_code,
            "chat_after_s": round(time.monotonic() - started, 2),
            "chat_error": json.loads(chat.text).get("error"),
        }


def _engine_processes(server: Server) -> list[psutil.Process]:
    """The engine's rank processes: the service's spawned children."""
    return [
        p
        for p in psutil.Process(server.process.pid).children(recursive=True)
        if "multiprocessing.spawn" in " ".join(p.cmdline())
        and "resource_tracker" not in " ".join(p.cmdline())
    ]


def _reaped(processes: list[psutil.Process], timeout_s: float) -> bool:
    """Whether every process is gone (or a zombie awaiting its parent) within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in processes):
            return True
        time.sleep(0.2)
    return False
