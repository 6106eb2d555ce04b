"""The /v1 app in-process (httpx.ASGITransport): answers while the model is not loaded yet."""

from __future__ import annotations

import asyncio

import httpx

from shardbento.catalog import load_spec
from shardbento.http.image_urls import ImageFetchConfig
from shardbento.http.openai_app import attach_serving, create_openai_app
from shardbento.serving import Serving

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
