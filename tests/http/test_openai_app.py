"""The /v1 app in-process (httpx.ASGITransport): answers while the model is not loaded yet."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from shardbento.api.image_urls import ImageFetchConfig
from shardbento.api.openai.routes import attach_serving, create_openai_app
from shardbento.api.serving import Serving
from shardbento.catalog import load_spec
from shardbento.engine.base import Delta, EngineInfo, Prompt, separate_choices

BODY = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(run())


def test_openai_app_loading_model_is_503_with_retry_after() -> None:
    app = create_openai_app()
    attach_serving(app, Serving(load_spec("tiny-llama")), ImageFetchConfig())
    for path, body in (("/chat/completions", BODY), ("/completions", {"model": "tiny-llama", "prompt": "x"})):
        response = call(app, "POST", path, json=body)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "model_not_ready"
        assert "loading" in response.json()["error"]["message"]
        assert response.headers["retry-after"]
    models = call(app, "GET", "/models").json()["data"]
    assert [(m["id"], m["ready"]) for m in models] == [("tiny-llama", False)]


def test_openai_app_before_attach_is_503() -> None:
    response = call(create_openai_app(), "POST", "/chat/completions", json=BODY)
    assert response.status_code == 503 and response.json()["error"]["type"] == "service_unavailable"


def test_openai_app_wrong_method_is_405_in_error_shape() -> None:
    response = call(create_openai_app(), "GET", "/chat/completions")
    assert response.status_code == 405
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_openai_image_fetch_config_from_env() -> None:
    config = ImageFetchConfig.from_env(
        {"SHARDBENTO_ALLOW_IMAGE_URLS": "1", "SHARDBENTO_IMAGE_FETCH_TIMEOUT_S": "2.5"}
    )
    assert config == ImageFetchConfig(allow_urls=True, timeout_s=2.5)
    assert ImageFetchConfig.from_env({}) == ImageFetchConfig()


class FailingEngine:
    """Two deltas of output, then a failure: the mid-stream case a real tiny model cannot produce on demand."""

    info = EngineInfo("tiny-llama", "text", 1024, "fake", "none", ("cpu",), vocab_size=1024)

    def render_chat(self, messages, template_kwargs=None) -> Prompt:
        return Prompt(token_ids=(1, 2, 3))

    def encode(self, text) -> Prompt:
        return Prompt(token_ids=(1, 2))

    def decode(self, token_ids) -> str:
        return " ".join(map(str, token_ids))

    async def stream(self, prompt, params, request_id):
        yield Delta(text="Hello", token_ids=[5])
        yield Delta(text="", token_ids=[6])  # a token whose text is held back (half a character)
        yield Delta(text=" world", token_ids=[7])
        raise RuntimeError("device lost")

    def stream_choices(self, prompt, params, request_id):
        return separate_choices(self, prompt, params, request_id)

    def is_ready(self) -> bool:
        return True

    def close(self) -> None:
        pass


@pytest.fixture
def failing_app():
    serving = Serving(load_spec("tiny-llama"))
    serving.attach(FailingEngine())
    app = create_openai_app()
    attach_serving(app, serving, ImageFetchConfig())
    return app


def test_openai_app_mid_stream_error_ends_with_one_error_event(failing_app) -> None:
    body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
    response = call(failing_app, "POST", "/chat/completions", json=body)
    assert response.status_code == 200
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": "Hello"},
        {"content": " world"},
    ]
    error = json.loads(events[-1])["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "generation_failed"
    assert "device lost" in error["message"]


def test_openai_app_mid_stream_error_raises_in_openai_client(failing_app) -> None:
    async def run() -> list[str]:
        transport = httpx.ASGITransport(app=failing_app)
        async with openai.AsyncOpenAI(
            base_url="http://test",
            api_key="x",
            max_retries=0,
            http_client=httpx.AsyncClient(transport=transport),
        ) as client:
            stream = await client.chat.completions.create(
                model="tiny-llama", messages=BODY["messages"], stream=True
            )
            seen: list[str] = []
            with pytest.raises(openai.APIError, match="device lost"):
                async for chunk in stream:
                    seen.append(chunk.choices[0].delta.content)
            return seen

    assert asyncio.run(run()) == ["Hello", " world"]
