"""Mixed load against a running server: good, streamed, cancelled, malformed, oversized and faulty requests.

Each kind of request declares the statuses the design promises for it; anything else (a 5xx that was
not injected, a hang, a 429 without Retry-After, an error not in OpenAI's shape) is a failure.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import psutil

CHAT = {"messages": [{"role": "user", "content": "Tell me something."}], "max_tokens": 6}
OVERLOAD = 429  # any request past the auth check may be refused while the server is full
MAX_RETRIES = 30


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str
    status: int | None  # None: no response (the client timed out: a hang)
    result: str  # completed | cancelled | rejected | failed
    problem: str | None = None
    retry_after_s: float = 0.0


@dataclass(slots=True)
class Figures:
    requests: int = 0
    attempts: int = 0
    accepted: int = 0
    gave_up: int = 0  # logical requests still refused (429) after MAX_RETRIES retries
    by_kind: Counter = field(default_factory=Counter)
    by_status: Counter = field(default_factory=Counter)
    by_result: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    unexpected_5xx: int = 0
    injected_faults: int = 0
    in_flight_after: float | None = None
    rss_before_mib: float = 0.0
    rss_after_mib: float = 0.0
    seconds: float = 0.0

    @property
    def rss_growth_mib(self) -> float:
        return self.rss_after_mib - self.rss_before_mib


def _error_shaped(response: httpx.Response) -> bool:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)


class Traffic:
    """The request kinds; each returns an Outcome and never raises."""

    def __init__(
        self, client: httpx.AsyncClient, model: str, api_key: str, max_body_bytes: int, faults: bool
    ) -> None:
        self.client = client
        self.model = model
        self.auth = {"authorization": f"Bearer {api_key}"}
        self.max_body_bytes = max_body_bytes
        self.kinds: dict[str, Callable[[], Awaitable[Outcome]]] = {
            "chat": self.chat,
            "chat_stream": self.chat_stream,
            "v1_stream": self.v1_stream,
            "cancelled_stream": self.cancelled_stream,
            "malformed_json": self.malformed_json,
            "wrong_types": self.wrong_types,
            "oversized_body": self.oversized_body,
            "too_many_stops": self.too_many_stops,
            "context_overflow": self.context_overflow,
            "image_to_text_model": self.image_to_text_model,
            "no_api_key": self.no_api_key,
        }
        if faults:
            self.kinds["fault_error"] = lambda: self.fault("error")
            self.kinds["fault_oom"] = lambda: self.fault("oom")

    def _judge(self, kind: str, response: httpx.Response, allowed: tuple[int, ...]) -> Outcome:
        status = response.status_code
        if status == OVERLOAD and kind != "no_api_key":
            ok = "retry-after" in response.headers and _error_shaped(response)
            problem = None if ok else "429 without Retry-After or error shape"
            return Outcome(kind, status, "rejected", problem, float(response.headers.get("retry-after", 1)))
        if status not in allowed:
            return Outcome(kind, status, "failed", f"{kind}: status {status}: {response.text[:200]}")
        if status >= 400 and not _error_shaped(response):
            return Outcome(kind, status, "failed", f"{kind}: {status} not in OpenAI's error shape")
        return Outcome(kind, status, "completed" if status == 200 else "rejected")

    async def chat(self) -> Outcome:
        response = await self.client.post("/chat", json=CHAT, headers=self.auth)
        outcome = self._judge("chat", response, (200,))
        if response.status_code == 200 and response.json().get("finish_reason") not in ("stop", "length"):
            return Outcome("chat", 200, "failed", "chat: 200 without a finish_reason")
        return outcome

    async def chat_stream(self) -> Outcome:
        async with self.client.stream("POST", "/chat_stream", json=CHAT, headers=self.auth) as response:
            await response.aread()
            return self._judge("chat_stream", response, (200,))

    async def v1_stream(self) -> Outcome:
        body = {"model": self.model, **CHAT, "stream": True}
        async with self.client.stream(
            "POST", "/v1/chat/completions", json=body, headers=self.auth
        ) as response:
            text = (await response.aread()).decode(errors="replace")
            outcome = self._judge("v1_stream", response, (200,))
            if response.status_code == 200 and "data: [DONE]" not in text:
                return Outcome(
                    "v1_stream", 200, "failed", f"v1_stream: 200 without data: [DONE]: {text[-300:]!r}"
                )
            return outcome

    async def cancelled_stream(self) -> Outcome:
        body = {**CHAT, "max_tokens": 200}
        async with self.client.stream("POST", "/chat_stream", json=body, headers=self.auth) as response:
            if response.status_code != 200:
                await response.aread()
                return self._judge("cancelled_stream", response, (200,))
            async for _ in response.aiter_raw():
                break  # the client goes away after the first chunk
        return Outcome("cancelled_stream", 200, "cancelled")

    async def malformed_json(self) -> Outcome:
        headers = {**self.auth, "content-type": "application/json"}
        response = await self.client.post("/chat", content=b'{"messages": [', headers=headers)
        return self._judge("malformed_json", response, (400,))

    async def wrong_types(self) -> Outcome:
        response = await self.client.post(
            "/chat", json={"messages": "hi", "max_tokens": -3}, headers=self.auth
        )
        return self._judge("wrong_types", response, (400,))

    async def oversized_body(self) -> Outcome:
        body = {"messages": [{"role": "user", "content": "x" * (self.max_body_bytes + 1)}]}
        response = await self.client.post("/chat", json=body, headers=self.auth)
        return self._judge("oversized_body", response, (413,))

    async def too_many_stops(self) -> Outcome:
        body = {"model": self.model, **CHAT, "stop": [f"s{i}" for i in range(40)]}
        response = await self.client.post("/v1/chat/completions", json=body, headers=self.auth)
        return self._judge("too_many_stops", response, (400,))

    async def context_overflow(self) -> Outcome:
        response = await self.client.post("/chat", json={**CHAT, "max_tokens": 10**6}, headers=self.auth)
        return self._judge("context_overflow", response, (400,))

    async def image_to_text_model(self) -> Outcome:
        files = {"image": ("x.png", random.randbytes(512), "image/png")}
        response = await self.client.post("/vision", files=files, data={"prompt": "what?"}, headers=self.auth)
        return self._judge("image_to_text_model", response, (400,))

    async def no_api_key(self) -> Outcome:
        response = await self.client.post("/chat", json=CHAT)
        return self._judge("no_api_key", response, (401,))

    async def fault(self, kind: str) -> Outcome:
        headers = {**self.auth, "x-shardbento-fault": kind}
        response = await self.client.post("/chat", json=CHAT, headers=headers)
        outcome = self._judge(f"fault_{kind}", response, (500,))
        if response.status_code == 500 and response.json()["error"]["code"] != "generation_failed":
            return Outcome(outcome.kind, 500, "failed", f"fault_{kind}: 500 that is not generation_failed")
        return outcome


def server_rss_mib(pid: int) -> float:
    """Resident memory of the server and every process it started (the BentoML workers)."""
    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


def in_flight(url: str, api_key: str) -> float:
    """BentoML's own gauge of requests in progress, summed over endpoints (the scrape itself left out)."""
    text = httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {api_key}"}, timeout=10).text
    pattern = re.compile(r"^bentoml_service_request_in_progress\{([^}]*)\} ([0-9.e+-]+)$", re.M)
    return sum(float(value) for labels, value in pattern.findall(text) if 'endpoint="/metrics"' not in labels)


async def _one(traffic: Traffic, kind: str, gate: asyncio.Semaphore, timeout_s: float) -> list[Outcome]:
    """One logical request: a 429 is retried after its Retry-After (scaled down, jittered), like a
    well-behaved client, at most MAX_RETRIES times; every attempt is an outcome."""
    outcomes: list[Outcome] = []
    for _ in range(MAX_RETRIES + 1):
        async with gate:
            try:
                outcome = await asyncio.wait_for(traffic.kinds[kind](), timeout=timeout_s)
            except TimeoutError:
                outcome = Outcome(kind, None, "failed", f"{kind}: no answer in {timeout_s} s (hang)")
            except httpx.HTTPError as exc:
                outcome = Outcome(kind, None, "failed", f"{kind}: {type(exc).__name__}: {exc}")
        outcomes.append(outcome)
        if outcome.status != OVERLOAD or kind == "no_api_key":
            break
        await asyncio.sleep(outcome.retry_after_s * random.uniform(0.5, 1.5))
    return outcomes


async def run_load(
    url: str,
    *,
    model: str,
    api_key: str,
    max_body_bytes: int,
    num_requests: int = 300,
    concurrency: int = 48,
    faults: bool = True,
    timeout_s: float = 120.0,
    seed: int = 0,
) -> list[list[Outcome]]:
    """Every logical request's attempts (all but the last were 429s)."""
    # Idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them under our feet.
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=2
    )
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        traffic = Traffic(client, model, api_key, max_body_bytes, faults)
        names = sorted(traffic.kinds)
        weights = [
            6 if name in ("chat", "chat_stream", "v1_stream", "cancelled_stream") else 1 for name in names
        ]
        kinds = random.Random(seed).choices(names, weights=weights, k=num_requests)
        gate = asyncio.Semaphore(concurrency)
        return list(await asyncio.gather(*(_one(traffic, kind, gate, timeout_s) for kind in kinds)))


def measure(url: str, pid: int, api_key: str, **load: object) -> Figures:
    """Warm up, then run the load and collect the figures (memory and in-flight before and after)."""
    warm_up = {**load, "num_requests": 16, "concurrency": 4, "faults": False}
    asyncio.run(run_load(url, api_key=api_key, **warm_up))  # type: ignore[arg-type]
    figures = Figures(rss_before_mib=server_rss_mib(pid))
    started = time.monotonic()
    outcomes = asyncio.run(run_load(url, api_key=api_key, **load))  # type: ignore[arg-type]
    figures.seconds = time.monotonic() - started
    figures.requests = len(outcomes)
    figures.by_kind.update(request[0].kind for request in outcomes)
    figures.gave_up = sum(request[-1].status == OVERLOAD for request in outcomes)
    for outcome in (attempt for request in outcomes for attempt in request):
        figures.attempts += 1
        figures.accepted += outcome.status == 200
        figures.by_status[str(outcome.status)] += 1
        figures.by_result[outcome.result] += 1
        injected = outcome.kind.startswith("fault_") and outcome.status == 500
        figures.injected_faults += injected
        if outcome.status is not None and outcome.status >= 500 and not injected:
            figures.unexpected_5xx += 1
        if outcome.problem:
            figures.problems.append(outcome.problem)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        figures.in_flight_after = in_flight(url, api_key)
        if figures.in_flight_after == 0:
            break
        time.sleep(0.5)
    figures.rss_after_mib = server_rss_mib(pid)
    return figures


def report(figures: Figures) -> str:
    lines = [
        f"requests tried        {figures.requests} ({figures.attempts} HTTP attempts, 429s retried) "
        f"in {figures.seconds:.1f} s",
        f"accepted (200)        {figures.accepted}: every one completed or cancelled by its client"
        if not figures.problems
        else f"accepted (200)        {figures.accepted}",
        f"still 429 after {MAX_RETRIES} retries: {figures.gave_up} (overload answered, nothing lost)",
        f"kinds of request      {len(figures.by_kind)}: {json.dumps(dict(sorted(figures.by_kind.items())))}",
        f"statuses              {json.dumps(dict(sorted(figures.by_status.items())))}",
        f"outcomes              {json.dumps(dict(sorted(figures.by_result.items())))}",
        f"faults injected       {figures.injected_faults} (each a 500 generation_failed for that request only)",
        f"unexpected 5xx        {figures.unexpected_5xx}",
        f"in flight after       {figures.in_flight_after}",
        f"server RSS            {figures.rss_before_mib:.0f} MiB -> {figures.rss_after_mib:.0f} MiB "
        f"({figures.rss_growth_mib:+.0f} MiB)",
        f"problems              {len(figures.problems)}",
        *(f"  - {problem}" for problem in figures.problems[:20]),
    ]
    return "\n".join(lines)
