"""/v1 errors in OpenAI's shape, vision requests, image URLs and engine failures, on real servers."""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import io
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from servers import Server, serve

TEXT_MODEL = "tiny-llama"
VISION_MODEL = "tiny-llava"
HI = [{"role": "user", "content": "hi"}]


def png_bytes(width: int = 40, height: int = 56, seed: int = 11) -> bytes:
    from PIL import Image

    pixels = torch.randint(
        0, 256, (height, width, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(*urls: str, text: str = "Describe the picture.") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def post(server: Server, body: dict, path: str = "/v1/chat/completions", **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120, **kwargs)


def assert_error(response: httpx.Response, status: int, param: str | None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "not a name"}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"},
            "tool_choice",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"n": 99}, "n"),
        ({"seed": 2**64, "temperature": 1}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stop": [""]}, "stop"),
        ({"made_up_field": 1}, "made_up_field"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
    ],
)
def test_openai_invalid_request_is_400(text_server, extra, param) -> None:
    error = assert_error(post(text_server, {"model": TEXT_MODEL, "messages": HI, **extra}), 400, param)
    assert error["type"] == "invalid_request_error"


def test_openai_unsupported_field_raises_bad_request_in_client(text_server) -> None:
    client = openai.OpenAI(base_url=f"{text_server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=TEXT_MODEL, messages=HI, extra_body={"functions": [{"name": "f"}]}
        )
    assert "functions" in caught.value.message


def test_openai_unknown_model_is_404(text_server) -> None:
    client = openai.OpenAI(base_url=f"{text_server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=HI)
    assert caught.value.code == "model_not_found" and "gpt-4o" in caught.value.message
    assert_error(
        post(text_server, {"model": "nope", "prompt": "x"}, "/v1/completions"),
        404,
        "model",
        "model_not_found",
    )


def test_openai_context_overflow_states_numbers(text_server) -> None:
    ok = post(text_server, {"model": TEXT_MODEL, "messages": HI, "max_tokens": 1}).json()
    prompt_tokens = ok["usage"]["prompt_tokens"]
    body = {"model": TEXT_MODEL, "messages": HI, "max_completion_tokens": 2000}
    error = assert_error(post(text_server, body), 400, "messages", "context_length_exceeded")
    assert error["message"].startswith(
        f"This model's maximum context length is 1024 tokens. However, you requested {prompt_tokens + 2000} "
        f"tokens ({prompt_tokens} in the messages, 2000 in the completion)."
    )


def test_openai_prompt_alone_over_the_context_gets_openais_wording(text_server) -> None:
    body = {"model": TEXT_MODEL, "messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 5}
    error = assert_error(post(text_server, body), 400, "messages", "context_length_exceeded")
    found = re.match(
        r"This model's maximum context length is 1024 tokens\. However, you requested (\d+) tokens "
        r"\((\d+) in the messages, 5 in the completion\)\.",
        error["message"],
    )
    assert found and int(found[1]) == int(found[2]) + 5 and int(found[2]) > 1024


def test_openai_stream_error_before_output_is_plain_4xx(text_server) -> None:
    body = {"model": TEXT_MODEL, "messages": HI, "stream": True, "max_tokens": 5000}
    assert_error(post(text_server, body), 400, "messages", "context_length_exceeded")


def test_openai_completions_bad_prompts_are_400(text_server) -> None:
    for prompt in (["a", "b"], "", [-1, 5]):
        assert_error(
            post(text_server, {"model": TEXT_MODEL, "prompt": prompt}, "/v1/completions"), 400, "prompt"
        )
    body = {"model": TEXT_MODEL, "prompt": "x", "max_tokens": 0}  # 0 only with echo
    assert_error(post(text_server, body, "/v1/completions"), 400, "max_tokens")


def test_openai_image_to_text_model_is_400(text_server) -> None:
    body = {"model": TEXT_MODEL, "messages": image_message(data_uri(png_bytes()))}
    error = assert_error(post(text_server, body), 400, "image")
    assert "text model" in error["message"]


def test_openai_vision_data_uri_matches_typed_vision(vision_server) -> None:
    client = openai.OpenAI(base_url=f"{vision_server.url}/v1", api_key="x", max_retries=0, timeout=120)
    image = png_bytes()
    answer = client.chat.completions.create(
        model=VISION_MODEL, messages=image_message(data_uri(image)), max_tokens=10
    )
    typed = httpx.post(
        f"{vision_server.url}/vision",
        files={"image": ("noise.png", image, "image/png")},
        data={"prompt": "Describe the picture.", "max_tokens": "10"},
        timeout=120,
    ).json()
    assert answer.choices[0].message.content == typed["text"]
    assert answer.usage.prompt_tokens == typed["usage"]["prompt_tokens"] > 20  # image tokens are counted
    stream = client.chat.completions.create(
        model=VISION_MODEL, messages=image_message(data_uri(image)), max_tokens=10, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == typed["text"]


def test_openai_vision_jpeg_webp_and_two_images(vision_server) -> None:
    from PIL import Image

    with Image.open(io.BytesIO(png_bytes())) as image:
        encoded = {}
        for fmt in ("JPEG", "WEBP"):
            buffer = io.BytesIO()
            image.save(buffer, format=fmt)
            encoded[fmt] = data_uri(buffer.getvalue(), f"image/{fmt.lower()}")
    one = post(
        vision_server, {"model": VISION_MODEL, "messages": image_message(encoded["JPEG"]), "max_tokens": 2}
    )
    two = post(
        vision_server, {"model": VISION_MODEL, "messages": image_message(*encoded.values()), "max_tokens": 2}
    )
    assert one.status_code == two.status_code == 200, two.text
    assert two.json()["usage"]["prompt_tokens"] > one.json()["usage"]["prompt_tokens"]


def test_openai_vision_bad_images_are_400(vision_server) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (8000, 6000)).save(buffer, format="PNG")  # 48M pixels, over the 40M default
    param = "messages[0].content[0].image_url"
    cases = {
        data_uri(b"definitely not an image"): "not a readable image",
        "data:image/png;base64,@@@": "not valid base64",
        data_uri(buffer.getvalue()): "pixels",
        "ftp://example.com/cat.png": "data URI",
    }
    for url, words in cases.items():
        error = assert_error(
            post(vision_server, {"model": VISION_MODEL, "messages": image_message(url)}), 400, param
        )
        assert words in error["message"]
    too_many = image_message(*[data_uri(png_bytes(seed=i)) for i in range(3)])
    assert_error(post(vision_server, {"model": VISION_MODEL, "messages": too_many}), 400, "image")


def test_openai_image_url_fetch_disabled_says_how_to_enable(vision_server) -> None:
    body = {"model": VISION_MODEL, "messages": image_message("http://127.0.0.1:9/cat.png")}
    error = assert_error(
        post(vision_server, body), 400, "messages[0].content[0].image_url", "image_url_fetch_disabled"
    )
    assert "SHARDBENTO_ALLOW_IMAGE_URLS=1" in error["message"] and "data URI" in error["message"]


@contextlib.contextmanager
def file_server(directory: Path) -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def fetching_server(log_dir: Path) -> Iterator[Server]:
    """A vision server with image URL fetching and (test-only) fault injection turned on."""
    env = {"SHARDBENTO_ALLOW_IMAGE_URLS": "1", "SHARDBENTO_FAULT_INJECTION": "1", "NO_PROXY": "127.0.0.1"}
    with serve(VISION_MODEL, log_dir, env=env) as server:
        yield server


def test_openai_image_url_fetched_when_enabled(fetching_server, tmp_path: Path) -> None:
    image = png_bytes()
    (tmp_path / "noise.png").write_bytes(image)
    with file_server(tmp_path) as base:
        fetched = post(
            fetching_server,
            {"model": VISION_MODEL, "messages": image_message(f"{base}/noise.png"), "max_tokens": 8},
        )
        missing = post(
            fetching_server, {"model": VISION_MODEL, "messages": image_message(f"{base}/missing.png")}
        )
    inline = post(
        fetching_server, {"model": VISION_MODEL, "messages": image_message(data_uri(image)), "max_tokens": 8}
    )
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["choices"] == inline.json()["choices"]
    assert "HTTP 404" in assert_error(missing, 400, "messages[0].content[0].image_url")["message"]


def test_openai_stream_failing_before_output_is_500(fetching_server) -> None:
    body = {"model": VISION_MODEL, "messages": HI, "max_tokens": 8, "stream": True}
    headers = {"X-Shardbento-Fault": "error"}  # the engine fails at its first step
    error = assert_error(post(fetching_server, body, headers=headers), 500, None, "generation_failed")
    assert "injected" in error["message"]
    client = openai.OpenAI(
        base_url=f"{fetching_server.url}/v1", api_key="x", max_retries=0, default_headers=headers
    )
    with pytest.raises(openai.InternalServerError):
        list(client.chat.completions.create(model=VISION_MODEL, messages=HI, max_tokens=8, stream=True))
    assert post(fetching_server, {**body, "stream": False}).status_code == 200  # the service keeps serving


def test_openai_prompt_logprobs_with_images_are_400(vision_server) -> None:
    body = {"model": VISION_MODEL, "messages": image_message(data_uri(png_bytes())), "prompt_logprobs": 1}
    error = assert_error(post(vision_server, body), 400, "prompt_logprobs")
    assert "images" in error["message"]
    text_only = post(
        vision_server, {"model": VISION_MODEL, "messages": HI, "max_tokens": 1, "prompt_logprobs": 0}
    )
    assert text_only.status_code == 200, text_only.text
    assert text_only.json()["prompt_logprobs"][0] is None
