"""API key and request limits on a real `bentoml serve` (the guarded tiny-llama server)."""

from __future__ import annotations

import io
import time

import httpx
import openai
import pytest

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def _error(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def _auth(config) -> dict[str, str]:
    return {"authorization": f"Bearer {config.api_key}"}


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer wrong"}, {"authorization": "Basic x"}, {"authorization": "Bearer"}],
    ids=["missing", "wrong", "basic", "empty"],
)
@pytest.mark.parametrize("path", ["/chat", "/v1/chat/completions", "/models", "/docs.json"])
def test_auth_without_the_key_is_401_in_error_shape(guarded_server, headers, path) -> None:
    server, _ = guarded_server
    response = httpx.post(f"{server.url}{path}", json=CHAT, headers=headers, timeout=30)
    if path == "/docs.json":
        response = httpx.get(f"{server.url}{path}", headers=headers, timeout=30)
    assert response.status_code == 401
    assert _error(response)["type"] == "authentication_error"


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/metrics", "/health", "/version"])
def test_auth_probes_and_metrics_need_no_key(guarded_server, path) -> None:
    server, _ = guarded_server
    assert httpx.get(f"{server.url}{path}", timeout=30).status_code == 200


def test_auth_right_key_serves_typed_and_v1_apis(guarded_server) -> None:
    server, config = guarded_server
    typed = httpx.post(f"{server.url}/chat", json=CHAT, headers=_auth(config), timeout=60)
    assert typed.status_code == 200, typed.text
    assert typed.headers["x-request-id"].startswith("req-")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=config.api_key)
    answer = client.chat.completions.create(model="tiny-llama", messages=CHAT["messages"], max_tokens=4)
    assert answer.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-the-key").models.list()


def test_auth_key_and_prompts_never_logged(guarded_server) -> None:
    server, config = guarded_server
    secret_prompt = "my-private-prompt-4711"
    body = {"messages": [{"role": "user", "content": secret_prompt}], "max_tokens": 4}
    httpx.post(f"{server.url}/chat", json=body, headers=_auth(config), timeout=60).raise_for_status()
    httpx.post(f"{server.url}/chat", json=body, headers={"authorization": "Bearer guess"}, timeout=60)
    log = server.log()
    assert config.api_key not in log
    assert secret_prompt not in log


def test_logs_request_lines_carry_the_request_id(guarded_server) -> None:
    server, config = guarded_server
    response = httpx.post(f"{server.url}/chat", json=CHAT, headers=_auth(config), timeout=60)
    request_id = response.headers["x-request-id"]
    deadline = time.monotonic() + 10  # the access line is written once the response has gone out
    while request_id not in server.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = [line for line in server.log().splitlines() if request_id in line]
    assert lines, f"no log line carries {request_id}:\n{server.log()[-2000:]}"


def test_limits_body_over_the_limit_is_413(guarded_server) -> None:
    server, config = guarded_server
    body = {"messages": [{"role": "user", "content": "x" * config.max_body_bytes}]}
    response = httpx.post(f"{server.url}/chat", json=body, headers=_auth(config), timeout=30)
    assert response.status_code == 413
    assert str(config.max_body_bytes) in _error(response)["message"]


def test_limits_too_many_messages_is_400(guarded_server) -> None:
    from shardbento.settings import Settings

    server, config = guarded_server
    count = Settings().max_messages + 1
    body = {"messages": [{"role": "user", "content": "x"}] * count, "max_tokens": 1}
    response = httpx.post(f"{server.url}/chat", json=body, headers=_auth(config), timeout=30)
    assert response.status_code == 400
    assert _error(response)["param"] == "messages"


@pytest.mark.parametrize("problem", ["count", "length"])
def test_limits_stop_strings_are_bounded(guarded_server, problem) -> None:
    from shardbento.settings import Settings

    server, config = guarded_server
    limits = Settings()
    stop = (
        ["s"] * (limits.max_stop_strings + 1) if problem == "count" else ["s" * (limits.max_stop_length + 1)]
    )
    body = {"model": "tiny-llama", **CHAT, "stop": stop}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=_auth(config), timeout=30)
    assert response.status_code == 400
    assert _error(response)["param"].startswith("stop")


def test_limits_decompression_bomb_is_400_before_decoding(guarded_server) -> None:
    from PIL import Image

    from shardbento.settings import Settings

    server, config = guarded_server
    side = int(Settings().max_image_pixels ** 0.5) + 100
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")  # a few KiB that decode to > the pixel limit
    assert len(buffer.getvalue()) < config.max_body_bytes
    files = {"image": ("bomb.png", buffer.getvalue(), "image/png")}
    response = httpx.post(
        f"{server.url}/vision", files=files, data={"prompt": "hi"}, headers=_auth(config), timeout=60
    )
    assert response.status_code == 400
    assert "pixels" in _error(response)["message"]


def test_limits_overload_is_429_with_retry_after(guarded_server) -> None:
    import asyncio

    server, config = guarded_server

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            body = {**CHAT, "max_tokens": 32}
            calls = [
                client.post("/chat", json=body, headers=_auth(config))
                for _ in range(config.max_in_flight * 3)
            ]
            return await asyncio.gather(*calls)

    responses = asyncio.run(burst())
    statuses = {r.status_code for r in responses}
    assert statuses <= {200, 429}
    refused = [r for r in responses if r.status_code == 429]
    assert refused, "3x the in-flight bound at once was never refused"
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert sum(r.status_code == 200 for r in responses) >= config.max_in_flight // 2
