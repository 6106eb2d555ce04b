"""A flood far past the KV pool against a real server: everything completes, sequences are preempted and
recomputed, memory stays bounded, and greedy texts equal those of a server with room for all of them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from reliability.scenarios import write_catalog
from reliability.soak import worker_rss_mib
from servers import Server, metric_total, serve

from shardbento.catalog import load_spec
from shardbento.plan.memory import budget, load_config, model_shape
from shardbento.plan.source import resolve_source

MODEL = "tiny-llama"
POOL_TOKENS = 4096
REQUESTS = 64
OUTPUT_TOKENS = 300
WORDS = "sharded bento layers serve every token across many devices and " * 60


@pytest.fixture(scope="module")
def pool_server(log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    catalog = write_catalog(
        tmp_path_factory.mktemp("pool-catalog"), MODEL, limits={"kv_cache_tokens": POOL_TOKENS}
    )
    with serve(MODEL, log_dir, env={"SHARDBENTO_CATALOG": str(catalog)}) as server:
        yield server


def prompts(server: Server) -> list[str]:
    """64 different prompts of about 600 tokens (counted by the server's own /tokenize)."""
    words = WORDS.split()
    count = httpx.post(f"{server.url}/tokenize", json={"prompt": " ".join(words)}, timeout=30).json()["count"]
    take = round(len(words) * 600 / count)
    return [f"{i}: " + " ".join(words[:take]) for i in range(REQUESTS)]


async def flood(server: Server, texts: list[str]) -> list[str]:
    async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:

        async def one(prompt: str) -> str:
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": OUTPUT_TOKENS,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            }
            for _ in range(20):  # a 429 past the waiting bound is retried after its Retry-After
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    if response.status_code == 429:
                        await asyncio.sleep(float(response.headers["retry-after"]))
                        continue
                    assert response.status_code == 200, await response.aread()
                    parts = []
                    async for line in response.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            event = json.loads(line[6:])
                            assert "error" not in event, event
                            parts += [c["delta"].get("content") or "" for c in event["choices"]]
                    return "".join(parts)
            raise AssertionError("still refused after 20 retries")

        return await asyncio.gather(*(one(p) for p in texts))


def test_kv_pool_flood_completes_preempts_and_keeps_the_greedy_text(
    pool_server: Server, text_server: Server
) -> None:
    texts = prompts(pool_server)
    counts = [
        httpx.post(f"{pool_server.url}/tokenize", json={"messages": [{"role": "user", "content": t}]}).json()[
            "count"
        ]
        for t in texts[:2]
    ]
    assert all(550 <= c <= 650 for c in counts), counts
    asyncio.run(flood(pool_server, texts[:1]))  # warm-up: the first request's one-time costs
    before = worker_rss_mib(pool_server)
    squeezed = asyncio.run(flood(pool_server, texts))
    grown = worker_rss_mib(pool_server) - before
    assert metric_total(pool_server, "num_preemptions_total") > 0
    assert metric_total(pool_server, "request_success_total") >= REQUESTS
    shape = model_shape(load_config(Path(resolve_source(load_spec(MODEL))) / "config.json"))
    per_token = budget(shape, dtype="float32", max_model_len=1).kv_bytes_per_token
    assert grown < (POOL_TOKENS * per_token) / 2**20 + 0.10 * before, (before, grown)
    roomy = asyncio.run(flood(text_server, texts))
    assert squeezed == roomy
