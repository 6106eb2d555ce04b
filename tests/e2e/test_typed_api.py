"""The typed APIs through a real `bentoml serve` and BentoML's own client."""

from __future__ import annotations

import asyncio
import io
import json
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import httpx
import pytest
import torch
from servers import REPO, Server, serve, wait_for

from shardbento.engine.base import ChatMessage, SamplingParams

MESSAGES = [{"role": "user", "content": "Say something about bentos."}]


def engine_text(engine, messages, max_tokens: int, image=None) -> str:
    chat_messages = [ChatMessage(role=m["role"], text=m["content"]) for m in messages]
    if image is not None:
        chat_messages[-1] = ChatMessage(role="user", text=messages[-1]["content"], images=(image,))
    prompt = engine.render_chat(chat_messages)

    async def collect():
        return "".join(
            [d.text async for d in engine.stream(prompt, SamplingParams(max_tokens=max_tokens), "t")]
        )

    return asyncio.run(collect())


@pytest.fixture(scope="module")
def client(text_server):
    with bentoml.SyncHTTPClient(text_server.url, timeout=120) as client:
        yield client


def test_typed_chat_matches_engine(client, text_engine) -> None:
    answer = client.chat(messages=MESSAGES, max_tokens=12)
    assert answer["text"] == engine_text(text_engine, MESSAGES, 12)
    assert answer["model"] == "tiny-llama"
    usage = answer["usage"]
    expected_prompt = text_engine.render_chat(
        [ChatMessage(role="user", text=MESSAGES[0]["content"])]
    ).num_tokens
    assert usage["prompt_tokens"] == expected_prompt
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert (answer["finish_reason"] == "length") == (usage["completion_tokens"] == 12)


def test_typed_chat_stream_concatenates_to_chat(client) -> None:
    whole = client.chat(messages=MESSAGES, max_tokens=16)["text"]
    deltas = list(client.chat_stream(messages=MESSAGES, max_tokens=16))
    assert "".join(deltas) == whole
    assert len(deltas) > 1


def test_typed_generate_raw_prompt(client, text_engine) -> None:
    answer = client.generate(prompt="Once upon a time", max_tokens=8)
    prompt = text_engine.encode("Once upon a time")
    assert answer["usage"]["prompt_tokens"] == prompt.num_tokens

    async def collect():
        return "".join([d.text async for d in text_engine.stream(prompt, SamplingParams(max_tokens=8), "g")])

    assert answer["text"] == asyncio.run(collect())


def test_typed_seeded_sampling_reproducible(client) -> None:
    kwargs = dict(messages=MESSAGES, max_tokens=12, temperature=1.0, top_p=0.9, seed=42)
    first = client.chat(**kwargs)["text"]
    assert client.chat(**kwargs)["text"] == first
    assert any(client.chat(**{**kwargs, "seed": s})["text"] != first for s in (1, 2, 3))


def test_typed_stop_string_from_request(client) -> None:
    full = client.chat(messages=MESSAGES, max_tokens=24)["text"]
    stop = full.strip()[len(full.strip()) // 2 :][:3]
    answer = client.chat(messages=MESSAGES, max_tokens=24, stop=[stop])
    assert answer["finish_reason"] == "stop"
    assert answer["text"] == full[: full.index(stop)]


def test_typed_concurrent_requests_all_correct(client, text_server) -> None:
    prompts = [[{"role": "user", "content": f"Question number {i}"}] for i in range(6)]
    sequential = [client.chat(messages=p, max_tokens=10)["text"] for p in prompts]

    def ask(messages):
        with bentoml.SyncHTTPClient(text_server.url, timeout=120) as own:
            return own.chat(messages=messages, max_tokens=10)["text"]

    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(ask, prompts)) == sequential


def test_typed_models_card(client) -> None:
    card = client.models()
    assert card["name"] == "tiny-llama"
    assert card["ready"] is True
    assert card["spec"]["gpus"] == 0
    assert card["devices"] == ["cpu"]


CITY_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}},
            "required": ["city"],
        },
    },
}


def test_typed_chat_takes_tools_and_response_format(client) -> None:
    called = client.chat(
        messages=MESSAGES,
        tools=[CITY_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=100,
    )
    assert called["finish_reason"] == "tool_calls"
    assert called["tool_calls"][0]["function"]["name"] == "get_weather"
    assert json.loads(called["tool_calls"][0]["function"]["arguments"])["city"] in ("Paris", "Oslo")
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    answer = client.chat(
        messages=MESSAGES,
        response_format={"type": "json_schema", "json_schema": {"name": "ok", "schema": schema}},
        max_tokens=20,
    )
    assert isinstance(json.loads(answer["text"])["ok"], bool) and answer["finish_reason"] == "stop"


def test_typed_chat_stream_refuses_tools(text_server) -> None:
    body = {"messages": MESSAGES, "tools": [CITY_TOOL]}
    assert_error(post(text_server, "/chat_stream", json=body), 400, "tools")


def post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", timeout=60, **kwargs)


def assert_error(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["message"]
    return error


@pytest.mark.parametrize("path", ["/chat", "/chat_stream"])
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 7}, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, "tool_choice"),
        ({"messages": [{"role": "user", "content": "hi"}], "functions": []}, "functions"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, "stop.0"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "seed": 2**64, "temperature": 1}, "seed"),
    ],
)
def test_typed_bad_input_is_400(text_server, path, body, param) -> None:
    assert_error(post(text_server, path, json=body), 400, param)


def test_typed_context_overflow_states_numbers(text_server) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}
    error = assert_error(post(text_server, "/chat", json=body), 400, "messages")
    assert error["code"] == "context_length_exceeded"
    assert "maximum context length is 1024 tokens" in error["message"]
    assert "5000 in the completion" in error["message"]


def test_typed_long_prompt_overflows(text_server) -> None:
    body = {"messages": [{"role": "user", "content": "word " * 3000}]}
    assert_error(post(text_server, "/chat", json=body), 400, "messages")


def test_typed_image_to_text_model_is_400(text_server, tmp_path: Path) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, format="PNG")
    response = post(
        text_server,
        "/vision",
        files={"image": ("red.png", buffer.getvalue(), "image/png")},
        data={"prompt": "hi"},
    )
    error = assert_error(response, 400, "image")
    assert "text model" in error["message"]


def test_typed_not_an_image_is_400(vision_server) -> None:
    files = {"image": ("fake.png", b"definitely not an image", "image/png")}
    for path in ("/vision", "/vision_stream"):
        error = assert_error(post(vision_server, path, files=files, data={"prompt": "hi"}), 400, "image")
        assert "not a readable image" in error["message"]


def test_typed_vision_matches_engine(vision_server, vision_engine, tmp_path: Path) -> None:
    from PIL import Image

    pixels = torch.randint(
        0, 256, (40, 56, 3), generator=torch.Generator().manual_seed(11), dtype=torch.uint8
    )
    path = tmp_path / "noise.png"
    Image.fromarray(pixels.numpy()).save(path)
    with bentoml.SyncHTTPClient(vision_server.url, timeout=120) as client:
        answer = client.vision(image=path, prompt="Describe the picture.", max_tokens=10)
        streamed = "".join(client.vision_stream(image=path, prompt="Describe the picture.", max_tokens=10))
    with Image.open(path) as image:
        expected = engine_text(
            vision_engine, [{"role": "user", "content": "Describe the picture."}], 10, image.convert("RGB")
        )
    assert answer["text"] == expected == streamed
    assert answer["usage"]["prompt_tokens"] > 20  # the image expands into many image tokens


def test_typed_readyz_ok_only_once_requests_are_served(log_dir) -> None:
    """From the server's start /readyz answers 503 until it answers 200, and a 200 means a request is
    served at once (not a 503 because the engine is still loading); /health agrees with it each time."""
    seen: list[int] = []

    def ready(server: Server) -> bool:
        try:
            status = httpx.get(f"{server.url}/readyz", timeout=5).status_code
            health = httpx.get(f"{server.url}/health", timeout=5).status_code
        except httpx.TransportError:  # not listening yet
            return False
        seen.append(status if status == health else -1)  # a loaded engine between the two reads
        return status == health == 200

    with serve("tiny-llama", log_dir, wait=False) as server:
        wait_for(lambda: ready(server), "/readyz 200", timeout_s=180, poll_s=0.05)
        answer = httpx.post(f"{server.url}/generate", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert set(seen[:-1]) <= {503, -1} and seen.count(-1) <= 1 and seen[-1] == 200
    assert answer.status_code == 200, answer.text


def test_typed_root_health_and_version(text_server) -> None:
    health = httpx.get(f"{text_server.url}/health", timeout=10)
    assert (health.status_code, health.json()) == (200, {})
    version = httpx.get(f"{text_server.url}/version", timeout=10).json()["version"]
    assert version == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert httpx.get(f"{text_server.url}/healthy", timeout=10).status_code == 404  # the mount takes no more
