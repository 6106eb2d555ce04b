"""A catalog entry's own chat template behind a real server: request variables reach it
(`chat_template_kwargs`), and a conversation it refuses is a 400 with its words."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import bentoml
import httpx
import pytest
from reliability.scenarios import write_catalog
from servers import Server, serve

MODEL = "tiny-llama"
# ChatML that greets with a request variable and, like many hub templates, insists on alternating roles.
TEMPLATE = (
    "{%- if greeting is defined -%}{{- '<|im_start|>system\\n' + greeting + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if loop.index0 > 0 and message['role'] == messages[loop.index0 - 1]['role'] -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
HI = [{"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def template_server(log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    catalog = write_catalog(tmp_path_factory.mktemp("template-catalog"), MODEL, chat_template=TEMPLATE)
    with serve(MODEL, log_dir, env={"SHARDBENTO_CATALOG": str(catalog)}) as server:
        yield server


def _tokenize(server: Server, **body: object) -> httpx.Response:
    return httpx.post(f"{server.url}/tokenize", json={"messages": HI, **body}, timeout=30)


def test_chat_template_kwargs_reach_the_template(template_server: Server) -> None:
    plain = _tokenize(template_server).json()
    greeted = _tokenize(template_server, chat_template_kwargs={"greeting": "Welcome aboard"}).json()
    assert greeted["count"] > plain["count"]
    text = httpx.post(
        f"{template_server.url}/detokenize", json={"tokens": greeted["tokens"]}, timeout=30
    ).json()
    assert text["prompt"].startswith("<|im_start|>system\nWelcome aboard<|im_end|>")
    body = {"model": MODEL, "messages": HI, "max_tokens": 4, "temperature": 0}
    v1 = httpx.post(
        f"{template_server.url}/v1/chat/completions",
        json={**body, "chat_template_kwargs": {"greeting": "Welcome aboard"}},
        timeout=60,
    ).json()
    assert v1["usage"]["prompt_tokens"] == greeted["count"]
    with bentoml.SyncHTTPClient(template_server.url, timeout=60) as typed:
        answer = typed.chat(messages=HI, max_tokens=4, chat_template_kwargs={"greeting": "Welcome aboard"})
    assert answer["text"] == v1["choices"][0]["message"]["content"]
    assert answer["usage"]["prompt_tokens"] == greeted["count"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat", "/tokenize"])
def test_chat_template_refusal_is_a_400_with_its_words(template_server: Server, path: str) -> None:
    twice = [*HI, {"role": "user", "content": "Anyone?"}]
    body = {"messages": twice, **({"model": MODEL} if path.startswith("/v1") else {})}
    response = httpx.post(f"{template_server.url}{path}", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages" and "roles must alternate" in error["message"]


def test_chat_template_kwargs_may_not_replace_what_the_server_sets(template_server: Server) -> None:
    response = _tokenize(template_server, chat_template_kwargs={"add_generation_prompt": False})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "chat_template_kwargs" and "add_generation_prompt" in error["message"]
