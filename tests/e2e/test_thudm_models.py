"""The tiny THUDM-layout models served by `bentoml serve` without trust_remote_code: the typed APIs and
/v1, and 2-rank CPU tensor parallelism giving one process's tokens."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from reliability.scenarios import write_catalog
from servers import Server, serve
from test_openai_errors_vision import data_uri, image_message, png_bytes

MESSAGES = [{"role": "user", "content": "你好, tell me about the sharded bento."}]


@pytest.fixture(scope="module")
def chatglm3_server(log_dir: Path):
    with serve("tiny-chatglm3", log_dir, ready_timeout_s=300) as server:
        yield server


@pytest.fixture(scope="module")
def glm4v_server(log_dir: Path):
    with serve("tiny-glm4v", log_dir, ready_timeout_s=300) as server:
        yield server


@pytest.fixture(scope="module")
def glm4v_tp_server(log_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    fields = {"gpus": 2, "device": "cpu", "parallel": "tensor"}
    catalog = write_catalog(
        tmp_path_factory.mktemp("glm4v-tp"), "tiny-glm4v-tp2", base="tiny-glm4v", **fields
    )
    with serve(
        "tiny-glm4v-tp2", log_dir, env={"SHARDBENTO_CATALOG": str(catalog)}, ready_timeout_s=300
    ) as server:
        yield server


@pytest.fixture(scope="module")
def chatglm3_tp_server(log_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    catalog = write_catalog(
        tmp_path_factory.mktemp("thudm-tp"),
        "tiny-chatglm3-tp2",
        base="tiny-chatglm3",
        gpus=2,
        device="cpu",
        parallel="tensor",
    )
    env = {"SHARDBENTO_CATALOG": str(catalog)}
    with serve("tiny-chatglm3-tp2", log_dir, env=env, ready_timeout_s=300) as server:
        yield server


def post(server: Server, path: str, body: dict) -> dict:
    response = httpx.post(f"{server.url}{path}", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_thudm_models_serve_typed_and_openai_apis_without_remote_code(chatglm3_server: Server) -> None:
    model = httpx.get(f"{chatglm3_server.url}/v1/models", timeout=30).json()["data"][0]
    assert model["id"] == "tiny-chatglm3"
    chat = post(chatglm3_server, "/chat", {"messages": MESSAGES, "max_tokens": 12, "temperature": 0})
    completion = post(
        chatglm3_server,
        "/v1/chat/completions",
        {"model": "tiny-chatglm3", "messages": MESSAGES, "max_tokens": 12, "temperature": 0},
    )
    assert completion["choices"][0]["message"]["content"] == chat["text"]
    tokenized = post(chatglm3_server, "/tokenize", {"model": "tiny-chatglm3", "messages": MESSAGES})
    assert completion["usage"]["prompt_tokens"] == tokenized["count"] == chat["usage"]["prompt_tokens"]
    generated = post(chatglm3_server, "/generate", {"prompt": "1, 2, 3,", "max_tokens": 8, "temperature": 0})
    assert (generated["finish_reason"], generated["usage"]["completion_tokens"]) == ("length", 8)
    prefix = post(chatglm3_server, "/tokenize", {"model": "tiny-chatglm3", "prompt": "1, 2, 3,"})["tokens"][
        :2
    ]
    detokenized = post(chatglm3_server, "/detokenize", {"model": "tiny-chatglm3", "tokens": prefix})
    assert detokenized["prompt"] == "[gMASK]sop"  # a completion prompt gets ChatGLM's prefix


def test_thudm_models_tensor_parallel_tokens_equal_one_process(
    chatglm3_server: Server, chatglm3_tp_server: Server
) -> None:
    for prompt in ["1, 2, 3,", "今天天气怎么样？", "Once upon a time"]:
        body = {"model": "tiny-chatglm3", "prompt": prompt, "max_tokens": 16, "temperature": 0}
        single = post(chatglm3_server, "/v1/completions", body)
        sharded = post(chatglm3_tp_server, "/v1/completions", {**body, "model": "tiny-chatglm3-tp2"})
        assert sharded["choices"][0]["text"] == single["choices"][0]["text"]
    card = httpx.post(f"{chatglm3_tp_server.url}/models", json={}, timeout=10).json()
    assert card["parallel"] == "tensor x2"


def test_thudm_models_glm4v_images_batch_with_text_through_v1(glm4v_server: Server) -> None:
    """Image and text chats sent together get the answers each gets alone (the image prompts prefill
    alone, then decode in the batch with the text ones)."""
    bodies = [
        {"messages": image_message(data_uri(png_bytes(seed=seed)), text="What is it?"), "max_tokens": 10}
        for seed in (1, 2)
    ] + [{"messages": MESSAGES, "max_tokens": 10}]
    bodies = [{**body, "model": "tiny-glm4v", "temperature": 0} for body in bodies]

    async def together() -> list[dict]:
        async with httpx.AsyncClient(base_url=glm4v_server.url, timeout=120) as client:
            replies = await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))
        return [reply.json() for reply in replies]

    batched = asyncio.run(together())
    alone = [post(glm4v_server, "/v1/chat/completions", body) for body in bodies]
    texts = [[r["choices"][0]["message"]["content"] for r in replies] for replies in (batched, alone)]
    assert texts[0] == texts[1]
    assert alone[0]["usage"]["prompt_tokens"] > alone[2]["usage"]["prompt_tokens"]  # the image's positions


def test_thudm_models_glm4v_tensor_parallel_answers_equal_one_process(
    glm4v_server: Server, glm4v_tp_server: Server
) -> None:
    body = {"messages": image_message(data_uri(png_bytes(seed=4)), text="What is it?"), "max_tokens": 10}
    body |= {"temperature": 0}
    single = post(glm4v_server, "/v1/chat/completions", {**body, "model": "tiny-glm4v"})
    sharded = post(glm4v_tp_server, "/v1/chat/completions", {**body, "model": "tiny-glm4v-tp2"})
    assert sharded["choices"][0]["message"]["content"] == single["choices"][0]["message"]["content"]
    assert sharded["usage"] == single["usage"]
