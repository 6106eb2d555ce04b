"""Bench report arithmetic: percentiles, TPOT/ITL from chunk times, throughput, the table; and the CLI's
one-line failure when no server answers."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys

import numpy as np
import pytest

from shardbento.bench.loadgen import RequestResult, chat_url
from shardbento.bench.report import percentile, summarize, table


def test_bench_report_percentile_matches_numpy() -> None:
    rng = random.Random(3)
    values = [rng.random() for _ in range(37)]
    for q in (0, 50, 90, 99, 100):
        assert abs(percentile(values, q) - float(np.percentile(values, q))) < 1e-12
    assert percentile([], 50) is None


def test_bench_report_summarize_derives_latencies_and_throughput() -> None:
    chunks = [0.1, 0.3, 0.6, 1.0]
    ok = RequestResult(
        ok=True, ttft_s=0.1, e2e_s=1.0, output_tokens=4, chunk_times_s=chunks, prompt_tokens=20
    )
    failed = RequestResult(ok=False, error="HTTP 429: busy")
    level = summarize([ok, ok, failed], wall_s=2.0, concurrency=2)
    assert (level["requests"], level["errors"], level["error_samples"]) == (3, 1, ["HTTP 429: busy"])
    assert level["output_tokens_received"] == 8
    assert level["output_token_throughput_per_s"] == 4.0
    assert level["tpot_ms"]["p50"] == round((1.0 - 0.1) / 3 * 1000, 3)
    gaps = [b - a for a, b in zip(chunks, chunks[1:], strict=False)] * 2
    assert level["itl_ms"]["p50"] == round(float(np.percentile(gaps, 50)) * 1000, 3)
    assert level["ttft_ms"]["p99"] == 100.0 and level["mean_prompt_tokens"] == 20
    rows = table([level]).splitlines()
    assert len(rows) == 3 and rows[2].startswith("| 2 | 3 | 1 | 4.0 |")


def test_bench_loadgen_chat_url_accepts_base_or_full_path() -> None:
    full = "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1") == chat_url("http://h:1/v1/") == chat_url(full) == full


@pytest.mark.slow  # a subprocess
def test_bench_cli_says_why_when_nothing_answers() -> None:
    with socket.socket() as sock:  # a port nothing listens on once this closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for model in (["--model", "m"], []):  # the probe fails, or the /v1/models lookup before it
        command = [sys.executable, "-m", "shardbento", "bench", "--url", f"http://127.0.0.1:{port}", *model]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1
        assert done.stderr.startswith(f"bench: http://127.0.0.1:{port}: ") and "Traceback" not in done.stderr


def test_bench_loadgen_probe_drops_fixed_lengths_a_strict_server_refuses() -> None:
    """A server that 400s on vLLM's ignore_eos/min_tokens still gets benchmarked, without them."""
    from aiohttp import ClientSession, web

    from shardbento.bench.loadgen import Target, probe

    seen: list[dict] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body)
        if "ignore_eos" in body:
            return web.json_response({"error": {"message": "unknown field ignore_eos"}}, status=400)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for word in ("a", "b"):
            await response.write(f'data: {{"choices": [{{"delta": {{"content": "{word}"}}}}]}}\n\n'.encode())
        usage = {"choices": [], "usage": {"prompt_tokens": 17, "completion_tokens": 2}}
        await response.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        return response

    async def main() -> tuple[Target, int | None]:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with ClientSession() as session:
                return await probe(session, Target(chat_url(f"http://127.0.0.1:{port}"), "m", True, {}))
        finally:
            await runner.cleanup()

    target, prompt_tokens = asyncio.run(main())
    assert target.fixed_length is False and prompt_tokens == 17
    assert ["ignore_eos" in body for body in seen] == [True, False]


def test_bench_loadgen_image_every_opens_every_nth_conversation_with_its_own_picture() -> None:
    """--image-every 2: conversations 0, 2, 4 open with a picture (each its own PNG), later turns carry
    it in their history, and the others are text only."""
    from aiohttp import ClientSession, web

    from shardbento.bench.loadgen import Target, run_level

    seen: list[dict] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        seen.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [{"delta": {"content": "x"}}]}\n\ndata: [DONE]\n\n')
        return response

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        target = Target(chat_url(f"http://127.0.0.1:{port}"), "m", True, {})
        try:
            async with ClientSession() as session:
                await run_level(session, target, 1, 10, 5, 2, seed=3, turns=2, image_every=2)
        finally:
            await runner.cleanup()

    asyncio.run(main())

    def pictures(body: dict) -> list[str]:
        parts = [p for m in body["messages"] if isinstance(m["content"], list) for p in m["content"]]
        return [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]

    firsts, seconds = seen[0::2], seen[1::2]
    assert [len(pictures(b)) for b in firsts] == [1, 0, 1, 0, 1]
    assert [pictures(b) for b in seconds] == [pictures(b) for b in firsts]  # in the history
    opening = [pictures(b)[0] for b in firsts if pictures(b)]
    assert len(set(opening)) == 3 and all(u.startswith("data:image/png;base64,") for u in opening)
