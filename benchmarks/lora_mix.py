"""16 concurrent streams over four LoRA adapters and the base model against the same load on the base
model alone, on one tiny-llama-lora server, rounds alternating; the medians go into docs/benchmarks.md
(section lora-mix). The goal: mixed output tok/s >= 0.8 x the base model's alone.

    .venv/bin/python benchmarks/lora_mix.py [--rounds 3] [--requests 64] [--output-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peers import free_port, replace_section, stop, wait_ready  # noqa: E402

from shardbento.bench.loadgen import Target, make_prompt, request_body, send  # noqa: E402
from shardbento.bench.report import summarize  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL = "tiny-llama-lora"
ADAPTERS = ("tiny-a", "tiny-b", "tiny-c", "tiny-d")
CONCURRENCY = 16


async def level(url: str, models: list[str], args: argparse.Namespace, seed: int) -> dict:
    """`CONCURRENCY` clients, client i always asking model models[i % len(models)]."""
    rng = random.Random(seed)
    prompts = [make_prompt(args.words, rng) for _ in range(args.requests)]
    results = []

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        target = Target(f"{url}/v1/chat/completions", models[i % len(models)], True, {})
        while prompts:
            results.append(
                await send(session, target, request_body(target, prompts.pop(), args.output_tokens))
            )

    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        start = loop.time()
        await asyncio.gather(*(client(i, session) for i in range(CONCURRENCY)))
        wall = loop.time() - start
    return summarize(results, wall, CONCURRENCY)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--words", type=int, default=48)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="lora-mix-")) / "serve.log"
    bentoml = Path(sys.executable).parent / "bentoml"
    command = [str(bentoml), "serve", "service:ShardBento", "--port", str(port), "--arg", f"model={MODEL}"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_ready(url, MODEL, process, 300)
        asyncio.run(level(url, [MODEL, *ADAPTERS], args, seed=0))  # warm-up: every adapter placed once
        runs: dict[str, list[dict]] = {"base model alone": [], "base + 4 adapters": []}
        for round_ in range(args.rounds):
            runs["base model alone"].append(asyncio.run(level(url, [MODEL], args, seed=round_ + 1)))
            runs["base + 4 adapters"].append(
                # prompts of its own: the base rows would find the first arm's in the prefix cache
                asyncio.run(level(url, [MODEL, *ADAPTERS], args, seed=round_ + 1001))
            )
    finally:
        stop(process)
    rows = [
        "| load (16 streams) | output tok/s | TPOT p50, ms | TTFT p50, ms | errors |",
        "|---|---|---|---|---|",
    ]
    medians = {}
    for name, levels in runs.items():
        medians[name] = statistics.median(lv["output_token_throughput_per_s"] for lv in levels)
        tpot = statistics.median(lv["tpot_ms"]["p50"] for lv in levels)
        ttft = statistics.median(lv["ttft_ms"]["p50"] for lv in levels)
        errors = sum(lv["errors"] for lv in levels)
        rows.append(f"| {name} | {medians[name]:.0f} | {tpot:.1f} | {ttft:.1f} | {errors} |")
    ratio = medians["base + 4 adapters"] / medians["base model alone"]
    verdict = "met" if ratio >= 0.8 else "missed"
    body = "\n".join(
        [
            "### LoRA adapters: a mixed load against the base model alone",
            "",
            f"tiny-llama-lora on this machine's CPU, {CONCURRENCY} concurrent streams, {args.requests} chat "
            f"requests of {args.words} words and {args.output_tokens} output tokens (greedy, fixed length) "
            f"per load; medians of {args.rounds} rounds, the two loads alternating on one server, each with "
            "prompts of its own. In the mixed load, client i asks the base model or one of four adapters "
            "(i mod 5).",
            "",
            *rows,
            "",
            f"Mixed / base alone: {ratio:.2f} (goal >= 0.8: {verdict}). Reproduce: "
            "`.venv/bin/python benchmarks/lora_mix.py`.",
        ]
    )
    print(body)
    replace_section(args.out, "lora-mix", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
