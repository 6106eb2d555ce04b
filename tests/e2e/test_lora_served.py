"""LoRA adapters through a real server (tiny-llama-lora) and on two tensor-parallel CPU ranks: /v1
names adapters by `model`, answers equal PEFT's merged model's, adapters load and unload at run time."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from lora_reference import ADAPTER_RECIPES, peft_greedy
from prometheus_client.parser import text_string_to_metric_families
from servers import Server, serve, wait_for

pytest.importorskip("peft")

PROMPT = [5, 17, 99, 123, 400, 7, 42, 300]  # token ids: /v1/completions without a chat template


@pytest.fixture(scope="module")
def lora_server(log_dir: Path) -> Iterator[Server]:
    with serve("tiny-llama-lora", log_dir, env={"SHARDBENTO_ALLOW_RUNTIME_LORA_UPDATING": "1"}) as server:
        yield server


def complete(server: Server, model: str, max_tokens: int = 8) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)


def test_lora_models_list_each_adapter_under_its_base(lora_server: Server) -> None:
    cards = httpx.get(f"{lora_server.url}/v1/models", timeout=30).json()["data"]
    assert [c["id"] for c in cards] == ["tiny-llama-lora", *ADAPTER_RECIPES]
    assert cards[0]["parent"] is None
    assert all(c["parent"] == "tiny-llama-lora" for c in cards[1:])
    assert cards[1]["root"] == "generated:tiny-llama-lora-a"


def test_lora_answers_equal_peft_and_unknown_names_are_404(lora_server: Server) -> None:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            models = ["tiny-llama-lora", *ADAPTER_RECIPES] * 2
            return await asyncio.gather(
                *(client.post(f"{lora_server.url}/v1/completions", json={**body, "model": m}) for m in models)
            )

    responses = asyncio.run(run())  # concurrent: base and adapters in the same batches
    texts = [r.json()["choices"][0]["text"] for r in responses]
    for model, text in zip(["tiny-llama-lora", *ADAPTER_RECIPES] * 2, texts, strict=True):
        ids = peft_greedy(ADAPTER_RECIPES.get(model), PROMPT, 8)
        expected = httpx.post(f"{lora_server.url}/detokenize", json={"tokens": ids}, timeout=30).json()
        assert text == expected["prompt"], model
        assert responses[texts.index(text)].json()["model"] == model
    missing = complete(lora_server, "tiny-e")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"

    def adapters_reported() -> set[str]:  # vLLM's gauge: the adapters of running requests, on change
        text = httpx.get(f"{lora_server.url}/metrics", timeout=10).text
        families = text_string_to_metric_families(text)
        info = [f for f in families if f.name == "shardbento:lora_requests_info"]
        return {n for f in info for s in f.samples for n in s.labels["running_lora_adapters"].split(",") if n}

    reported = wait_for(
        lambda: adapters_reported() & set(ADAPTER_RECIPES), "lora_requests_info names adapters"
    )
    assert reported <= set(ADAPTER_RECIPES)
    typed = httpx.post(
        f"{lora_server.url}/generate",
        json={"prompt": "Hello", "max_tokens": 4, "adapter": "nope"},
        timeout=30,
    )
    assert typed.status_code == 404 and typed.json()["error"]["param"] == "adapter"


def test_lora_runtime_load_use_unload(lora_server: Server) -> None:
    """vLLM's endpoints: load, list, use (PEFT's answer), unload, then 404; a bad adapter is a 400 that
    names it and why."""
    from shardbento.tiny.lora import ensure_adapter

    url = lora_server.url
    big = {"lora_name": "big", "lora_path": str(ensure_adapter("tiny-llama-lora-r64"))}
    refused = httpx.post(f"{url}/v1/load_lora_adapter", json=big, timeout=60)
    assert (
        refused.status_code == 400
        and "rank 64 is over max_lora_rank 16" in refused.json()["error"]["message"]
    )
    new = {"lora_name": "tiny-e", "lora_path": str(ensure_adapter("tiny-llama-lora-b"))}
    loaded = httpx.post(f"{url}/v1/load_lora_adapter", json=new, timeout=60)
    assert loaded.status_code == 200, loaded.text
    assert httpx.post(f"{url}/v1/load_lora_adapter", json=new, timeout=60).status_code == 400
    ids = [c["id"] for c in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]]
    assert "tiny-e" in ids
    text = complete(lora_server, "tiny-e").json()["choices"][0]["text"]
    expected = peft_greedy("tiny-llama-lora-b", PROMPT, 8)
    assert text == httpx.post(f"{url}/detokenize", json={"tokens": expected}, timeout=30).json()["prompt"]
    gone = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "tiny-e"}, timeout=60)
    assert gone.status_code == 200, gone.text
    assert complete(lora_server, "tiny-e").status_code == 404
    again = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "tiny-e"}, timeout=60)
    assert again.status_code == 404 and again.json()["error"]["param"] == "lora_name"


def test_lora_runtime_loading_is_off_by_default(text_server: Server) -> None:
    response = httpx.post(
        f"{text_server.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"}, timeout=30
    )
    assert response.status_code == 404
    assert "SHARDBENTO_ALLOW_RUNTIME_LORA_UPDATING" in response.json()["error"]["message"]
    assert "shardbento:lora_requests_info" not in httpx.get(f"{text_server.url}/metrics", timeout=10).text


def test_lora_on_two_tensor_parallel_ranks_equals_peft() -> None:
    """tiny-llama over 2 CPU ranks with adapters: A and B split as each layer's weight is split."""
    from shardbento.catalog import load_spec
    from shardbento.engine import create_engine
    from shardbento.engine.base import SamplingParams

    base = load_spec("tiny-llama-tp2")
    adapters = {name: f"generated:{recipe}" for name, recipe in ADAPTER_RECIPES.items()}
    spec = base.model_validate({**base.model_dump(), "lora_adapters": adapters})
    engine = create_engine(spec)
    try:
        prompt = engine.encode(PROMPT)

        async def run() -> list[list[int]]:
            async def one(adapter: str | None) -> list[int]:
                params = SamplingParams(max_tokens=8, ignore_eos=True, adapter=adapter)
                return [t async for d in engine.stream(prompt, params, "tp") for t in d.token_ids]

            return await asyncio.gather(*(one(a) for a in [None, *ADAPTER_RECIPES]))

        got = asyncio.run(run())
    finally:
        engine.close()
    for adapter, answer in zip([None, *ADAPTER_RECIPES], got, strict=True):
        assert answer == peft_greedy(ADAPTER_RECIPES.get(adapter), PROMPT, 8), adapter
