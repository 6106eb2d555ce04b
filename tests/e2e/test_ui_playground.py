"""The /ui playground in headless Chromium against real `bentoml serve` processes with the tiny models."""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright missing: run `make setup`")
expect = sync_api.expect

REPO = Path(__file__).resolve().parents[2]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
TIMEOUT_MS = 60_000
# Waits go through locators: wait_for_function evaluates strings, which the page's CSP forbids.
expect.set_options(timeout=TIMEOUT_MS)
# Records every length the streaming answer's text takes, so a test can tell streamed from all-at-once.
RECORD_STREAM_JS = """
() => {
  window.__lengths = [];
  new MutationObserver(() => {
    const text = document.querySelector('.message.assistant .text');
    if (text) window.__lengths.push(text.textContent.length);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}
"""


def _chromium() -> str | None:
    return (
        os.environ.get("SHARDBENTO_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    executable = _chromium()
    if executable is None:
        pytest.skip(
            "no chromium on PATH: run `make browser` (apt-get install chromium) or set SHARDBENTO_CHROMIUM"
        )
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    yield page
    context.close()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Screenshots go to artifacts/ui (git-ignored) so people can look at them after a run."""
    path = Path(os.environ.get("SHARDBENTO_ARTIFACTS", REPO / "artifacts")) / "ui"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _open(page, server, model: str) -> None:
    page.goto(f"{server.url}/ui")  # no trailing slash: the redirect to /ui/ is part of what is tested
    expect(page.locator("#model-name")).to_have_text(model)
    expect(page.locator("#model-ready")).to_have_text("ready")


def _send(page, prompt: str) -> None:
    page.evaluate(RECORD_STREAM_JS)
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")


def _wait_answer(page) -> str:
    page.wait_for_selector(".message.assistant:not(.streaming)")
    expect(page.locator("#stats")).to_contain_text("TTFT")
    return page.inner_text(".message.assistant .text")


def _png_bytes() -> bytes:
    from PIL import Image

    image = Image.new("RGB", (64, 48), (220, 120, 40))
    image.paste((40, 90, 200), (16, 12, 48, 36))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_ui_chat_streams_an_answer_with_usage_and_ttft(page, text_server, artifacts_dir):
    _open(page, text_server, "tiny-llama")
    assert page.is_hidden("#image-row")  # a text model: no image upload
    assert '"source": "generated:tiny-llama"' in page.text_content("#spec")
    page.fill("#max-tokens", "24")
    page.fill("#seed", "7")
    _send(page, "Hello there")

    answer = _wait_answer(page)
    assert answer.strip()
    lengths = [n for n in page.evaluate("window.__lengths") if n > 0]
    assert len(set(lengths)) > 1, f"the answer appeared at once, not streamed: {lengths}"
    stats = page.text_content("#stats")
    assert re.search(r"TTFT \d+ ms", stats), stats
    has_v1 = httpx.get(f"{text_server.url}/v1/models", timeout=10).status_code == 200
    expected = r"usage: \d+ prompt \+ 24 completion = \d+ tokens" if has_v1 else r"\d+ chunks streamed"
    assert re.search(expected, stats), stats
    assert page.is_hidden("#error")
    page.screenshot(path=str(artifacts_dir / "playground-chat.png"), full_page=True)


def test_ui_shows_a_readable_error_for_a_bad_input(page, text_server, artifacts_dir):
    _open(page, text_server, "tiny-llama")
    page.fill("#max-tokens", "5000")  # over the tiny model's 1024-token context
    _send(page, "Hello")

    page.wait_for_selector("#error:not([hidden])")
    error = page.text_content("#error")
    assert "maximum context length is 1024 tokens" in error, error
    assert "HTTP 400" in error and "invalid_request_error" in error, error
    assert page.locator(".message").count() == 0  # the failed turn is not left in the conversation
    assert page.input_value("#prompt") == "Hello"  # kept, so it can be fixed and resent
    page.screenshot(path=str(artifacts_dir / "playground-error.png"), full_page=True)


def test_ui_vision_answers_about_an_uploaded_image(page, vision_server, artifacts_dir):
    _open(page, vision_server, "tiny-llava")
    assert page.is_visible("#image-row")
    page.set_input_files("#image", {"name": "square.png", "mimeType": "image/png", "buffer": _png_bytes()})
    page.fill("#max-tokens", "12")
    _send(page, "What is in the picture?")

    assert _wait_answer(page).strip()
    assert page.locator(".message.user img").count() == 1
    assert re.search(r"TTFT \d+ ms", page.text_content("#stats"))
    page.screenshot(path=str(artifacts_dir / "playground-vision.png"), full_page=True)

    page.set_input_files("#image", {"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"})
    _send(page, "And this one?")
    page.wait_for_selector("#error:not([hidden])")
    assert "HTTP 400" in page.text_content("#error")


def test_ui_api_key_is_kept_in_the_tab_and_sent_as_bearer(page, text_server):
    _open(page, text_server, "tiny-llama")
    page.fill("#api-key", "sk-playground-test")
    page.dispatch_event("#api-key", "change")
    assert page.evaluate("sessionStorage.getItem('shardbento.apiKey')") == "sk-playground-test"

    page.fill("#max-tokens", "4")
    with page.expect_request(lambda r: r.method == "POST" and "chat" in r.url) as request_info:
        _send(page, "Hi")
    assert request_info.value.headers.get("authorization") == "Bearer sk-playground-test"
    _wait_answer(page)  # the server sets no key here, so the header is simply not checked

    page.reload()
    assert page.input_value("#api-key") == "sk-playground-test"


def test_ui_works_with_the_api_key_a_server_sets(page, log_dir):
    from servers import serve

    key = "sk-playground-e2e"
    with serve("tiny-llama", log_dir, env={"SHARDBENTO_API_KEY": key}) as server:
        assert httpx.post(f"{server.url}/models", timeout=10).status_code == 401
        page.goto(f"{server.url}/ui")  # the page itself needs no key
        page.wait_for_selector("#error:not([hidden])")
        assert "API key" in page.text_content("#error")  # /models said 401, shown as a message

        page.fill("#api-key", key)
        page.dispatch_event("#api-key", "change")
        expect(page.locator("#model-name")).to_have_text("tiny-llama")
        page.fill("#max-tokens", "8")
        _send(page, "Hello with a key")
        assert _wait_answer(page).strip()
        assert "usage:" in page.text_content("#stats")
