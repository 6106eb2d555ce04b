"""The soak: thousands of streamed /v1 chats, the service worker's RSS after each thousand (after warm-up).

Per-request state that outlives its request shows as RSS that climbs with the count and never levels
off; the verdict compares the growth over the second half with the level reached at the first half's end.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from servers import Server, serve

PROMPT_WORDS = 60
LEVEL_OFF_FRACTION = 0.01  # growth over the second half below 1 % of the first half's end


@dataclass(frozen=True, slots=True)
class Soak:
    per_thousand_mib: list[float]  # worker RSS after each 1,000 requests past warm-up
    failures: int

    @property
    def second_half_growth_mib(self) -> float:
        half = len(self.per_thousand_mib) // 2
        return self.per_thousand_mib[-1] - self.per_thousand_mib[half - 1]

    @property
    def levels_off(self) -> bool:
        half_end = self.per_thousand_mib[len(self.per_thousand_mib) // 2 - 1]
        return self.failures == 0 and self.second_half_growth_mib < LEVEL_OFF_FRACTION * half_end

    def report(self) -> str:
        rows = [
            f"  after {1000 * (i + 1):>6} requests  {mib:8.1f} MiB"
            for i, mib in enumerate(self.per_thousand_mib)
        ]
        return "\n".join(
            [
                "worker RSS (service worker, after warm-up):",
                *rows,
                f"second-half growth {self.second_half_growth_mib:.2f} MiB "
                f"({'levels off' if self.levels_off else 'does NOT level off'}), failures {self.failures}",
            ]
        )


def worker_rss_mib(server: Server) -> float:
    """RSS of the BentoML service workers (where requests live), the supervisor left out."""
    workers = [
        p
        for p in psutil.Process(server.process.pid).children(recursive=True)
        if "worker" in " ".join(p.cmdline())
    ]
    return sum(p.memory_info().rss for p in workers) / 2**20


async def _stream_batch(client: httpx.AsyncClient, count: int, concurrency: int) -> int:
    body = {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": "word " * PROMPT_WORDS}],
        "max_tokens": 16,
        "ignore_eos": True,
        "stream": True,
    }
    failures = 0

    async def one() -> None:
        nonlocal failures
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for _ in response.aiter_lines():
                pass
            failures += response.status_code != 200

    for _ in range(count // concurrency):
        await asyncio.gather(*(one() for _ in range(concurrency)))
    return failures


def soak(log_dir: Path, num_thousands: int = 4, warmup: int = 800, concurrency: int = 8) -> Soak:
    async def drive(server: Server) -> Soak:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            failures = await _stream_batch(client, warmup, concurrency)
            levels = []
            for _ in range(num_thousands):
                failures += await _stream_batch(client, 1000, concurrency)
                levels.append(worker_rss_mib(server))
            return Soak(levels, failures)

    with serve("tiny-llama", log_dir) as server:
        return asyncio.run(drive(server))
