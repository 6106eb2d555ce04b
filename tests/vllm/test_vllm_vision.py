"""A vision entry served by vLLM and by transformers: the same images and chat give the same answers.

On CPU the vLLM engine runs tiny-llava through vLLM's Transformers backend (shardbento.engine.vllm.args),
whose image preprocessing is the same transformers processor, so greedy answers and usage match exactly.
"""

from __future__ import annotations

import base64
import io
import random
import re
from collections.abc import Iterator
from pathlib import Path

import bentoml
import httpx
import pytest
from servers import Server, serve
from vllm_helpers import comparable, post, vllm_serve_env

MODEL = "tiny-llava"  # max_images: 2
PROMPT = "Describe the picture."


@pytest.fixture(scope="module")
def vllm_vision_server(log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(MODEL, log_dir, env=vllm_serve_env(tmp_path_factory, MODEL), ready_timeout_s=300) as server:
        yield server


def png_bytes(width: int, height: int, seed: int) -> bytes:
    """Seeded RGB noise as PNG: images of different sizes exercise the processor's resize and crop."""
    from PIL import Image

    noise = random.Random(seed).randbytes(width * height * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (width, height), noise).save(buffer, format="PNG")
    return buffer.getvalue()


def image_chat(*images: bytes, text: str = PROMPT) -> dict:
    uris = [f"data:image/png;base64,{base64.b64encode(image).decode()}" for image in images]
    parts = [{"type": "image_url", "image_url": {"url": uri}} for uri in uris]
    content = [*parts, {"type": "text", "text": text}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 16}


def test_vllm_vision_reports_vllm_engine(vllm_vision_server: Server) -> None:
    card = httpx.post(f"{vllm_vision_server.url}/models", timeout=30).json()
    assert (card["engine"], card["kind"], card["ready"]) == ("vllm", "vision", True)


def test_vllm_vision_typed_answers_equal_transformers(
    vision_server: Server, vllm_vision_server: Server, tmp_path: Path
) -> None:
    image = tmp_path / "noise.png"
    image.write_bytes(png_bytes(56, 40, seed=11))
    answers, streamed = [], []
    for server in (vision_server, vllm_vision_server):
        with bentoml.SyncHTTPClient(server.url, timeout=120) as client:
            answers.append(client.vision(image=image, prompt=PROMPT, max_tokens=16))
            streamed.append("".join(client.vision_stream(image=image, prompt=PROMPT, max_tokens=16)))
    assert answers[1] == answers[0]
    assert streamed[1] == streamed[0] == answers[0]["text"]
    assert answers[0]["usage"]["prompt_tokens"] > 20  # the image expands into 16 image tokens


def test_vllm_vision_openai_data_uris_equal_transformers(
    vision_server: Server, vllm_vision_server: Server
) -> None:
    body = image_chat(png_bytes(56, 40, seed=11), png_bytes(30, 64, seed=5), text="Compare them.")
    expected, actual = (post(s, "/v1/chat/completions", body) for s in (vision_server, vllm_vision_server))
    assert actual.status_code == expected.status_code == 200, actual.text
    assert comparable(actual.json()) == comparable(expected.json())
    assert actual.json()["usage"]["prompt_tokens"] > 32  # two images, 16 image tokens each


@pytest.mark.parametrize(
    ("case", "param"),
    [
        ("typed-not-an-image", "image"),
        ("openai-not-an-image", "messages[0].content[0].image_url"),
        ("openai-too-many-images", "image"),
        ("typed-too-long", "messages"),  # 5000 tokens asked: context_length_exceeded
    ],
)
def test_vllm_vision_bad_requests_error_equal_transformers(
    vision_server: Server, vllm_vision_server: Server, case: str, param: str
) -> None:
    expected, actual = (_bad_request(server, case) for server in (vision_server, vllm_vision_server))
    assert actual.status_code == expected.status_code == 400, actual.text
    assert set(actual.json()["error"]) == {"message", "type", "param", "code"}
    assert actual.json()["error"]["param"] == param
    # PIL's "cannot identify image file <_io.BytesIO object at 0x...>" names a per-process address.
    assert _without_addresses(actual.text) == _without_addresses(expected.text)


def _bad_request(server: Server, case: str) -> httpx.Response:
    image = png_bytes(56, 40, seed=11)
    if case == "openai-not-an-image":
        return post(server, "/v1/chat/completions", image_chat(b"definitely not an image"))
    if case == "openai-too-many-images":
        return post(server, "/v1/chat/completions", image_chat(image, image, image))
    files = {"image": ("x.png", b"definitely not an image" if case == "typed-not-an-image" else image)}
    data = {"prompt": PROMPT, "max_tokens": "5000" if case == "typed-too-long" else "4"}
    return httpx.post(f"{server.url}/vision", files=files, data=data, timeout=120)


def _without_addresses(text: str) -> str:
    return re.sub(r" at 0x[0-9a-f]+", "", text)
