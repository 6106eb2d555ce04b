"""`python -m shardbento bench`: load any OpenAI-compatible server at several concurrencies, report."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmark an OpenAI-compatible server (streaming chat)")
    parser.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:3000")
    parser.add_argument("--model", help="model name to send; default: the first of /v1/models")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    parser.add_argument(
        "--input-tokens", type=int, default=128, help="prompt tokens per request (approximate)"
    )
    parser.add_argument("--output-tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--requests-per-client", type=int, default=4, help="requests per client per level")
    parser.add_argument("--min-requests", type=int, default=8, help="at least this many requests per level")
    parser.add_argument("--warmup", type=int, default=2, help="requests sent (and not counted) first")
    parser.add_argument("--api-key", help="sent as a Bearer token")
    parser.add_argument(
        "--response-format",
        type=Path,
        help="a JSON file holding an OpenAI response_format, sent with every request (constrained load)",
    )
    parser.add_argument(
        "--shared-prefix-tokens",
        type=int,
        default=0,
        help="every request starts with the same system prompt of about this many tokens",
    )
    parser.add_argument(
        "--turns",
        type=int,
        default=1,
        help="conversations of this many turns, each carrying the earlier ones",
    )
    parser.add_argument(
        "--image-every",
        type=int,
        default=0,
        help="every Nth conversation opens with a picture (a vision model's mixed image and text load)",
    )
    parser.add_argument(
        "--extra-body",
        type=json.loads,
        default={},
        help='a JSON object merged into every request, e.g. \'{"temperature": 0.6, "top_p": 0.9}\'',
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--json", type=Path, help="write the report as JSON here")
    parser.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")
    parser.add_argument("--label", default="server", help="the server's name in the report and plot")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    try:
        levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        print(
            f"--concurrency must be integers separated by commas, got {args.concurrency!r}", file=sys.stderr
        )
        return 2
    if not levels or min(levels) < 1 or args.input_tokens < 1 or args.output_tokens < 1 or args.turns < 1:
        print("--concurrency, --input-tokens, --output-tokens and --turns must be positive", file=sys.stderr)
        return 2
    if not isinstance(args.extra_body, dict):
        print("--extra-body must be a JSON object", file=sys.stderr)
        return 2
    if args.shared_prefix_tokens < 0 or args.image_every < 0:
        print("--shared-prefix-tokens and --image-every must not be negative", file=sys.stderr)
        return 2
    import aiohttp

    from shardbento.bench.loadgen import ProbeFailed

    try:
        report = asyncio.run(run_bench(args, levels))
    except (aiohttp.ClientError, TimeoutError, ProbeFailed) as exc:
        print(f"bench: {args.url}: {exc}", file=sys.stderr)  # nothing was measured: say why, no traceback
        return 1
    from shardbento.bench.report import plot, table

    print(table(report["levels"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot({args.label: report["levels"]}, args.plot)
    return 1 if any(level["errors"] == level["requests"] for level in report["levels"]) else 0


async def run_bench(args: argparse.Namespace, levels: list[int]) -> dict[str, Any]:
    import aiohttp

    from shardbento.bench.loadgen import Target, chat_url, probe, request_body, run_level, send
    from shardbento.bench.report import summarize

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    connector = aiohttp.TCPConnector(limit=max(levels) + 4)
    timeout = aiohttp.ClientTimeout(total=600.0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        model = args.model or await _first_model(client, args.url, headers)
        extra = dict(args.extra_body)
        if args.response_format:
            extra["response_format"] = json.loads(args.response_format.read_text())
        target, probe_tokens = await probe(client, Target(chat_url(args.url), model, True, headers, extra))
        per_word = probe_tokens / 50 if probe_tokens else 1.0
        words = max(1, round(args.input_tokens / per_word))
        system_words = round(args.shared_prefix_tokens / per_word)
        if not target.fixed_length:
            logger.warning(
                "server refuses ignore_eos/min_tokens: outputs may end early (see tokens received)"
            )
        for _ in range(args.warmup):
            await send(client, target, request_body(target, "warm up " * 8, args.output_tokens))
        results = []
        for i, concurrency in enumerate(levels):
            num_requests = max(args.min_requests, concurrency * args.requests_per_client)
            seed = args.seed * 1000 + i
            records, wall_s = await run_level(
                client,
                target,
                concurrency,
                num_requests,
                words,
                args.output_tokens,
                seed,
                system_words=system_words,
                turns=args.turns,
                image_every=args.image_every,
            )
            results.append(summarize(records, wall_s, concurrency))
            logger.info(
                "c=%d: %.1f output tok/s", concurrency, results[-1]["output_token_throughput_per_s"] or 0
            )
    return {
        "label": args.label,
        "url": args.url,
        "model": model,
        "input_tokens": args.input_tokens,
        "output_tokens": args.output_tokens,
        "shared_prefix_tokens": args.shared_prefix_tokens,
        "turns": args.turns,
        "image_every": args.image_every,
        "fixed_length": target.fixed_length,
        "levels": results,
    }


async def _first_model(client: Any, url: str, headers: dict[str, str]) -> str:
    base = url.rstrip("/").removesuffix("/chat/completions").removesuffix("/v1")
    async with client.get(f"{base}/v1/models", headers=headers) as response:
        response.raise_for_status()
        return (await response.json())["data"][0]["id"]
