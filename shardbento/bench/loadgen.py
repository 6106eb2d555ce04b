"""A closed-loop OpenAI streaming load generator: N clients, each sending its next request when one ends.

It runs on aiohttp, as vLLM's serving benchmark does: on a small machine the load generator shares the
CPU with the server it measures, and aiohttp's streaming costs about half of httpx's per chunk
(measured here: ~65 vs ~115 us of client CPU per streamed token).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

# Short common words: most tokenizers give each one or two tokens.
PROMPT_WORDS = [
    "time",
    "year",
    "people",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
]


class ProbeFailed(RuntimeError):
    """The first request to the server did not succeed, so no level is run."""


@dataclass(slots=True)
class RequestResult:
    """One request as the client saw it; times in seconds from the request's start."""

    ok: bool
    error: str = ""
    ttft_s: float | None = None
    e2e_s: float = 0.0
    output_tokens: int = 0
    chunk_times_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    text: str = ""  # the answer (a multi-turn conversation sends it back in the next turn)


@dataclass(frozen=True, slots=True)
class Target:
    """Where and what to send: the chat endpoint, the model name, and whether fixed lengths are accepted."""

    url: str
    model: str
    fixed_length: bool
    headers: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)  # sent with every request (a response_format)


def chat_url(base: str) -> str:
    base = base.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    return f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"


def make_prompt(num_words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(PROMPT_WORDS) for _ in range(num_words))


def picture_uri(seed: int, width: int = 64, height: int = 48) -> str:
    """A PNG of seeded random pixels as a data URI (a vision model's mixed load)."""
    from PIL import Image

    rng = random.Random(seed)
    pixels = bytes(rng.randrange(256) for _ in range(width * height * 3))
    buffer = io.BytesIO()
    Image.frombytes("RGB", (width, height), pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_body(
    target: Target,
    prompt: str,
    output_tokens: int,
    system: str = "",
    history: list[dict[str, Any]] | None = None,
    image: str | None = None,
) -> dict[str, Any]:
    """One streamed chat request: an optional shared system prompt, earlier turns, then `prompt` (after
    `image`, a data URI, when one is given)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    content: Any = prompt
    if image is not None:
        content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": prompt}]
    messages += [*(history or []), {"role": "user", "content": content}]
    body: dict[str, Any] = {
        "model": target.model,
        "messages": messages,
        "max_tokens": output_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.fixed_length:  # vLLM's extensions, accepted by shardbento and vllm; not by every server
        body.update(ignore_eos=True, min_tokens=output_tokens)
    return {**body, **target.extra}


async def send(session: aiohttp.ClientSession, target: Target, body: dict[str, Any]) -> RequestResult:
    """Stream one chat completion; TTFT is the first chunk with content, tokens from usage if given."""
    result = RequestResult(ok=False)
    start = time.perf_counter()
    num_chunks = 0
    try:
        async with session.post(target.url, json=body, headers=target.headers) as response:
            if response.status != 200:
                text = (await response.read()).decode(errors="replace")
                result.error = f"HTTP {response.status}: {text[:200]}"
                return result
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"])[:200]
                    return result
                usage = event.get("usage")
                if usage:
                    result.output_tokens = usage.get("completion_tokens") or 0
                    result.prompt_tokens = usage.get("prompt_tokens")
                for choice in event.get("choices") or []:
                    if content := (choice.get("delta") or {}).get("content"):
                        result.text += content
                        now = time.perf_counter() - start
                        result.ttft_s = now if result.ttft_s is None else result.ttft_s
                        result.chunk_times_s.append(now)
                        num_chunks += 1
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # ValueError: bad JSON, overlong line
        result.error = f"{type(exc).__name__}: {exc}"[:200]
        return result
    result.e2e_s = time.perf_counter() - start
    result.output_tokens = result.output_tokens or num_chunks
    result.ok = True
    return result


async def probe(client: aiohttp.ClientSession, target: Target) -> tuple[Target, int | None]:
    """One small request: drops the fixed-length fields if the server refuses them; prompt tokens per word."""
    words = 50
    body = request_body(target, make_prompt(words, random.Random(0)), 2)
    result = await send(client, target, body)
    if not result.ok and target.fixed_length and result.error.startswith(("HTTP 400", "HTTP 422")):
        target = Target(target.url, target.model, False, target.headers, target.extra)
        result = await send(client, target, request_body(target, make_prompt(words, random.Random(0)), 2))
    if not result.ok:
        raise ProbeFailed(f"the probe request failed: {result.error}")
    return target, result.prompt_tokens


async def run_level(
    client: aiohttp.ClientSession,
    target: Target,
    concurrency: int,
    num_requests: int,
    words: int,
    output_tokens: int,
    seed: int,
    system_words: int = 0,
    turns: int = 1,
    image_every: int = 0,
) -> tuple[list[RequestResult], float]:
    """`concurrency` clients share `num_requests` requests; each level gets its own prompts (no reuse
    across levels). `system_words`: every request of the level starts with the same system prompt of
    that many words (a shared prefix). `turns`: requests come as conversations of that many turns, each
    turn's prompt carrying the earlier turns and their answers; a client runs one conversation at a time.
    `image_every`: every that-many-th conversation opens with a picture of its own (a vision load)."""
    rng = random.Random(seed)
    system = make_prompt(system_words, random.Random(seed + 7919)) if system_words else ""
    conversations = [
        [make_prompt(words, rng) for _ in range(turns)] for _ in range(max(1, -(-num_requests // turns)))
    ]
    queue: asyncio.Queue[tuple[int, list[str]]] = asyncio.Queue()
    for index, conversation in enumerate(conversations):
        queue.put_nowait((index, conversation))
    results: list[RequestResult] = []

    async def worker() -> None:
        while not queue.empty():
            index, prompts = queue.get_nowait()
            image = picture_uri(seed * 100003 + index) if image_every and index % image_every == 0 else None
            history: list[dict[str, Any]] = []
            for prompt in prompts:
                body = request_body(target, prompt, output_tokens, system, history, image)
                result = await send(client, target, body)
                results.append(result)
                first = body["messages"][-1]
                history += [first, {"role": "assistant", "content": result.text}]
                image = None  # the picture stays in the first turn

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - start
