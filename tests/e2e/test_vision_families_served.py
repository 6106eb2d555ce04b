"""Mllama and Qwen2.5-VL behind `bentoml serve`: image and text requests batched through /v1 and
/vision as each gets alone and as generate() gives them, 2 CPU tensor-parallel ranks as one process
(each rank's local shapes checked in its log), image requests running together in /metrics, and the
one-at-a-time generate() path (SHARDBENTO_FORCE_GENERATE) giving the batch's tokens."""

from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import Server, metric_total, serve, wait_for
from vision_cases import QUESTIONS, TEXTS, data_uri, generate_tokens, picture, png

from shardbento.engine.base import ChatMessage

FAMILIES = {"tiny-mllama": "mllama_model", "tiny-qwen2.5-vl": "qwen_vl_model"}


@dataclass
class Family:
    name: str
    server: Server
    loaded: Any  # the same checkpoint loaded in this process: generate()'s reference


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, log_dir: Path):
    with serve(request.param, log_dir, ready_timeout_s=300) as server:
        yield Family(request.param, server, request.getfixturevalue(FAMILIES[request.param]))


def chat(model: str, content: Any, max_tokens: int = 10, **sampling: Any) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    return {**body, "temperature": 0, **sampling}


def image_content(seed: int, question: str, width: int = 40, height: int = 56) -> list[dict]:
    url = data_uri(seed, width, height)
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]


def bodies(model: str, **sampling: Any) -> list[dict]:
    """Two image chats (different shapes) and two text chats."""
    images = [chat(model, image_content(s, QUESTIONS[s], 40 + 24 * s), **sampling) for s in (0, 1)]
    return images + [chat(model, text, **sampling) for text in TEXTS[:2]]


def answer(reply: dict) -> str:
    return reply["choices"][0]["message"]["content"]


async def post_all(server: Server, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
        return await asyncio.gather(*(send(client, path, body) for path, body in requests))


async def send(client: httpx.AsyncClient, path: str, body: dict) -> httpx.Response:
    if path == "/vision":
        files = {"image": ("picture.png", body["png"], "image/png")}
        fields = {k: str(v) for k, v in body.items() if k != "png"}
        return await client.post(path, files=files, data=fields)
    return await client.post(path, json=body)


def texts(responses: list[httpx.Response], paths: list[str]) -> list[str]:
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return [
        r.json()["text"] if p == "/vision" else answer(r.json())
        for r, p in zip(responses, paths, strict=True)
    ]


def test_vision_families_images_and_text_together_equal_alone_and_generate(family: Family) -> None:
    """Image and text chats through /v1 and pictures through /vision, all at once: each answer is the one
    it gets alone; with EOS held off (min_tokens), each /v1 answer is generate()'s text on the same
    checkpoint."""
    vision = [
        {"png": png(s, 56, 32 + 8 * s), "prompt": QUESTIONS[2], "max_tokens": 10, "temperature": 0}
        for s in (5, 6)
    ]
    requests = [("/v1/chat/completions", b) for b in bodies(family.name)] + [("/vision", v) for v in vision]
    paths = [p for p, _ in requests]
    together = texts(asyncio.run(post_all(family.server, requests)), paths)
    alone = [texts(asyncio.run(post_all(family.server, [r])), [r[0]])[0] for r in requests]
    assert together == alone
    held = bodies(family.name, min_tokens=10)
    replies = texts(
        asyncio.run(post_all(family.server, [("/v1/chat/completions", b) for b in held])), ["/v1"] * 4
    )
    prompts = family.loaded.prompts
    chats = [[ChatMessage("user", QUESTIONS[s], images=(picture(s, 40 + 24 * s, 56),))] for s in (0, 1)] + [
        [ChatMessage("user", text)] for text in TEXTS[:2]
    ]
    expected = [
        prompts.tokenizer.decode(
            generate_tokens(family.loaded, prompts.render_chat(c), 10), skip_special_tokens=True
        )
        for c in chats
    ]
    assert replies == expected


def test_vision_families_image_requests_run_together_in_metrics(family: Family) -> None:
    """Three long image requests at once: /metrics shows two or more running at the same time (waited
    for, not timed), then every one counted as finished with its prompt tokens."""
    finished = metric_total(family.server, "request_success_total")
    prompt_tokens = metric_total(family.server, "prompt_tokens_total")
    long = [
        chat(family.name, image_content(s, QUESTIONS[0]), max_tokens=400, min_tokens=400) for s in (7, 8, 9)
    ]
    done: list[list[httpx.Response]] = []
    worker = threading.Thread(
        target=lambda: done.append(
            asyncio.run(post_all(family.server, [("/v1/chat/completions", b) for b in long]))
        )
    )
    worker.start()
    try:
        wait_for(
            lambda: metric_total(family.server, "num_requests_running") >= 2, "two image rows running", 120
        )
    finally:
        worker.join(timeout=600)
    assert [r.status_code for r in done[0]] == [200] * 3
    assert metric_total(family.server, "request_success_total") == finished + 3
    usage = sum(r.json()["usage"]["prompt_tokens"] for r in done[0])
    assert metric_total(family.server, "prompt_tokens_total") == prompt_tokens + usage


def test_vision_families_video_parts_are_refused_by_name(family: Family) -> None:
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
    response = httpx.post(
        f"{family.server.url}/v1/chat/completions", json=chat(family.name, [video]), timeout=30
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "video_url" in error["message"] and error["param"].startswith("messages[0].content")


@pytest.fixture(scope="module")
def sharded(family: Family, log_dir: Path):
    """The family's -tp2 entry: 2 CPU ranks (gloo)."""
    with serve(f"{family.name}-tp2", log_dir, ready_timeout_s=300) as server:
        yield server


def test_vision_families_tensor_parallel_ranks_equal_one_process(family: Family, sharded: Server) -> None:
    """Two CPU ranks (the language model split, the vision tower whole on each, images reaching rank 1
    through its mirrored runner calls) answer image and text chats sent together as one process does;
    each rank logs its share: half the query and KV heads of every attention module."""
    name = family.name
    requests = [("/v1/chat/completions", {**b, "model": f"{name}-tp2"}) for b in bodies(name)]
    together = texts(asyncio.run(post_all(sharded, requests)), ["/v1"] * 4)
    single = [("/v1/chat/completions", b) for b in bodies(name)]
    assert together == texts(asyncio.run(post_all(family.server, single)), ["/v1"] * 4)
    card = httpx.post(f"{sharded.url}/models", json={}, timeout=10).json()
    assert card["parallel"] == "tensor x2"
    modules = 5 if name == "tiny-mllama" else 2  # Mllama: 3 self- and 2 cross-attention layers
    for rank in (0, 1):
        line = re.search(rf"rank {rank} INFO .*tensor-parallel shard: (.*)", sharded.log())
        assert line, sharded.log()[-3000:]
        assert line.group(1).startswith(
            f"{modules} attention modules split over 2 ranks (2 query and 1 KV heads"
        )
        assert "vision tower whole here" in line.group(1)


@pytest.fixture(scope="module")
def one_at_a_time(family: Family, log_dir: Path):
    """The family served through the one-at-a-time generate() path (the benchmark knob)."""
    env = {"SHARDBENTO_FORCE_GENERATE": "1"}
    with serve(family.name, log_dir, env=env, ready_timeout_s=300) as server:
        yield server


def test_vision_families_repetition_penalty_equals_the_generate_path(
    family: Family, one_at_a_time: Server
) -> None:
    """A repetition penalty over image prompts (Mllama's image id is past the logits' width) gives the
    batch's tokens and generate()'s (SHARDBENTO_FORCE_GENERATE) alike; the generate() path's metrics
    count every request."""
    name, batched, one = family.name, family.server, one_at_a_time
    requests = [("/v1/chat/completions", b) for b in bodies(name, repetition_penalty=3.0, min_tokens=10)]
    before = metric_total(one, "request_success_total")
    assert texts(asyncio.run(post_all(batched, requests)), ["/v1"] * 4) == texts(
        asyncio.run(post_all(one, requests)), ["/v1"] * 4
    )
    assert "one request at a time through generate() (SHARDBENTO_FORCE_GENERATE)" in one.log()
    assert metric_total(one, "request_success_total") == before + 4
    assert metric_total(one, "prompt_tokens_total") > 0
