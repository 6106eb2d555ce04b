"""The /v1 API through a real `bentoml serve` and the official `openai` package (sync and async)."""

from __future__ import annotations

import asyncio
import re
import time

import bentoml
import httpx
import openai
import pytest
import torch

from shardbento.engine.base import ChatMessage

MODEL = "tiny-llama"
MESSAGES = [{"role": "user", "content": "Say something about bentos."}]


@pytest.fixture(scope="module")
def client(text_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{text_server.url}/v1", api_key="unused", timeout=120, max_retries=0)


def generate_text(loaded, messages: list[dict], max_tokens: int) -> tuple[str, int]:
    """Greedy text straight from the transformers model loaded here (`model.generate`), and the prompt
    length."""
    prompts = loaded.prompts
    prompt = prompts.render_chat([ChatMessage(role=m["role"], text=m["content"]) for m in messages])
    with torch.inference_mode():
        out = loaded.model.generate(**prompt.inputs, max_new_tokens=max_tokens, do_sample=False)
    new_ids = out[0, prompt.num_tokens :].tolist()
    return prompts.tokenizer.decode(new_ids, skip_special_tokens=True), prompt.num_tokens


def test_openai_chat_greedy_matches_typed_chat_and_generate(client, text_server, text_model) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    with bentoml.SyncHTTPClient(text_server.url, timeout=120) as typed:
        typed_text = typed.chat(messages=MESSAGES, max_tokens=12)["text"]
    expected, prompt_tokens = generate_text(text_model, MESSAGES, 12)
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == typed_text == expected
    assert answer.model == MODEL
    assert answer.usage.prompt_tokens == prompt_tokens
    assert answer.usage.total_tokens == prompt_tokens + answer.usage.completion_tokens
    assert (choice.finish_reason == "length") == (answer.usage.completion_tokens == 12)


def test_openai_chat_max_completion_tokens_limits_output(client) -> None:
    answer = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=5, extra_body={"ignore_eos": True}
    )
    assert answer.usage.completion_tokens == 5
    assert answer.choices[0].finish_reason == "length"


def test_openai_chat_stream_role_and_first_token_together(client) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16)
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    first = chunks[0].choices[0].delta
    assert first.role == "assistant" and first.content
    content_chunks = [c for c in chunks if c.choices]
    assert all(c.choices[0].delta.role is None for c in content_chunks[1:])
    assert (
        "".join(c.choices[0].delta.content or "" for c in content_chunks) == whole.choices[0].message.content
    )
    assert content_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage


def test_openai_chat_stream_without_usage_has_no_usage_chunk(client) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, stream=True))
    assert all(c.choices and c.usage is None for c in chunks)


def test_openai_chat_stop_string_trims_output(client) -> None:
    full = (
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24)
        .choices[0]
        .message.content
    )
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    answer = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=24, stop=[stop, "\x00never"]
    )
    assert answer.choices[0].message.content == full[: full.find(stop)]
    assert answer.choices[0].finish_reason == "stop"
    single = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, stop=stop)
    assert single.choices[0].message.content == answer.choices[0].message.content


def test_openai_chat_seed_reproducible(client) -> None:
    def sample(seed: int) -> str:
        answer = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=16,
            temperature=1.0,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        return answer.choices[0].message.content

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


def test_openai_chat_logprobs_match_tokens(client) -> None:
    answer = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=3
    )
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].token == item.token  # greedy: the chosen token is the most likely
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)
        assert item.logprob <= 0 and item.bytes == list(item.token.encode())
    assert "".join(i.token for i in content) == answer.choices[0].message.content


def test_openai_chat_logprobs_off_by_default(client) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    assert answer.choices[0].logprobs is None


def test_openai_chat_benchmark_extensions(client) -> None:
    answer = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=10,
        user="bench",
        extra_body={"ignore_eos": True, "min_tokens": 10, "top_k": 5, "repetition_penalty": 1.3},
    )
    assert answer.usage.completion_tokens == 10
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10)
    assert answer.choices[0].message.content != plain.choices[0].message.content  # the penalty applied


def test_openai_async_client_chat_and_stream(text_server) -> None:
    async def run() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=f"{text_server.url}/v1", api_key="x", max_retries=0) as client:
            whole, stream = await asyncio.gather(
                client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10),
                client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, stream=True),
            )
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            return whole.choices[0].message.content, streamed

    whole, streamed = asyncio.run(run())
    assert whole == streamed and whole


def test_openai_models_lists_served_model(client) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].owned_by == "shardbento"
    assert models[0].model_extra["max_model_len"] == 1024


def test_openai_completions_prompt_text_and_token_ids(client, text_server, text_engine) -> None:
    text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8)
    with bentoml.SyncHTTPClient(text_server.url, timeout=120) as typed:
        typed_answer = typed.generate(prompt="Once upon a time", max_tokens=8)
    assert text.choices[0].text == typed_answer["text"]
    ids = list(text_engine.encode("Once upon a time").token_ids)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8)
    assert by_ids.choices[0].text == text.choices[0].text
    assert by_ids.usage.prompt_tokens == text.usage.prompt_tokens == len(ids)


def test_openai_completions_stream_and_logprobs(client) -> None:
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, logprobs=2)
    logprobs = whole.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == whole.usage.completion_tokens
    assert all(
        len(top) <= 2 and token in top
        for token, top in zip(logprobs.tokens, logprobs.top_logprobs, strict=True)
    )
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def metric(server, name: str, label: str = "") -> float:
    """The sum of a shardbento metric's samples whose labels contain `label`."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    pattern = rf"^shardbento:{name}\{{([^}}]*)\}} ([0-9.e+-]+)$"
    return sum(float(v) for labels, v in re.findall(pattern, text, flags=re.MULTILINE) if label in labels)


def test_openai_stream_client_disconnect_aborts_generation(client, text_server) -> None:
    aborted = metric(text_server, "request_success_total", 'finished_reason="abort"')
    generated = metric(text_server, "generation_tokens_total")
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=900, stream=True, extra_body={"ignore_eos": True}
    )
    for _ in zip(range(2), stream, strict=False):
        pass
    stream.close()
    deadline = time.monotonic() + 300  # generous: the point is that it ends early, not how fast
    while metric(text_server, "request_success_total", 'finished_reason="abort"') == aborted:
        assert time.monotonic() < deadline, "the abandoned request was never aborted"
        time.sleep(0.5)
    assert metric(text_server, "request_success_total", 'finished_reason="abort"') == aborted + 1
    assert metric(text_server, "generation_tokens_total") - generated < 900


def test_openai_models_retrieve_names_the_model_and_404s_others(client) -> None:
    card = client.models.retrieve(MODEL)
    assert (card.id, card.object) == (MODEL, "model")
    assert card.model_dump() == client.models.list().data[0].model_dump() | {"created": card.created}
    with pytest.raises(openai.NotFoundError) as refused:
        client.models.retrieve("not-" + MODEL)
    assert refused.value.body["code"] == "model_not_found"


def test_openai_developer_role_is_the_system_role(client) -> None:
    def answer(role: str) -> tuple[str, int]:
        messages = [{"role": role, "content": "Answer briefly."}, *MESSAGES]
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
        return reply.choices[0].message.content, reply.usage.prompt_tokens

    assert answer("developer") == answer("system")


def engine_answer(engine, params) -> tuple[str, list[int]]:
    """The in-process engine's answer to MESSAGES with these SamplingParams: (text, token ids)."""
    prompt = engine.render_chat([ChatMessage(role=m["role"], text=m["content"]) for m in MESSAGES])

    async def collect():
        return [d async for d in engine.stream(prompt, params, "in-process")]

    deltas = asyncio.run(collect())
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids]


def test_openai_chat_penalties_and_logit_bias_match_the_engine(client, text_engine) -> None:
    from shardbento.engine.base import SamplingParams

    plain_text, plain_ids = engine_answer(text_engine, SamplingParams(max_tokens=16, ignore_eos=True))
    banned, boosted = plain_ids[0], plain_ids[-1]  # ids computed from the plain answer, not chosen by hand
    fields = {"presence_penalty": 0.8, "frequency_penalty": 0.6, "logit_bias": {banned: -100, boosted: 3.0}}
    reply = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=16,
        temperature=0,
        extra_body={"ignore_eos": True},
        **fields,
    )
    params = SamplingParams(
        max_tokens=16,
        ignore_eos=True,
        presence_penalty=0.8,
        frequency_penalty=0.6,
        logit_bias=tuple(sorted({banned: -100.0, boosted: 3.0}.items())),
    )
    expected_text, expected_ids = engine_answer(text_engine, params)
    assert reply.choices[0].message.content == expected_text != plain_text
    assert banned not in expected_ids


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logit_bias": {"10000000": 5}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_openai_chat_bad_sampling_fields_are_400_naming_them(text_server, extra: dict, param: str) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **extra}
    response = httpx.post(f"{text_server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].split(".")[0] == param


def test_openai_chat_penalties_equal_the_typed_chat(client, text_server) -> None:
    fields = {"presence_penalty": 1.2, "frequency_penalty": 0.3}
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, **fields
    )
    with bentoml.SyncHTTPClient(text_server.url, timeout=120) as typed:
        answer = typed.chat(messages=MESSAGES, max_tokens=12, temperature=0, **fields)
    assert answer["text"] == reply.choices[0].message.content


def test_tokenize_matches_the_tokenizer_and_the_chat_usage(client, text_server, text_engine) -> None:
    text = "Once upon a time, bentos."
    raw = httpx.post(f"{text_server.url}/tokenize", json={"model": MODEL, "prompt": text}, timeout=30).json()
    assert raw["tokens"] == text_engine.tokenizer(text)["input_ids"]
    assert (raw["count"], raw["max_model_len"]) == (len(raw["tokens"]), text_engine.spec.max_model_len)
    chat = httpx.post(f"{text_server.url}/tokenize", json={"messages": MESSAGES}, timeout=30).json()
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    assert chat["count"] == reply.usage.prompt_tokens
    back = httpx.post(f"{text_server.url}/detokenize", json={"tokens": raw["tokens"]}, timeout=30).json()
    assert back["prompt"] == text_engine.tokenizer.decode(raw["tokens"], skip_special_tokens=False)


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/detokenize", {"tokens": [10_000_000]}, 400, "tokens"),
        ("/detokenize", {"tokens": []}, 400, "tokens"),
        ("/tokenize", {"prompt": "hi", "add_special_tokens": False}, 400, "add_special_tokens"),
        ("/tokenize", {"messages": MESSAGES, "add_generation_prompt": False}, 400, "add_generation_prompt"),
        ("/tokenize", {"model": "not-" + MODEL, "prompt": "hi"}, 404, "model"),
    ],
)
def test_tokenize_bad_requests_name_the_field(
    text_server, path: str, body: dict, status: int, param: str
) -> None:
    response = httpx.post(f"{text_server.url}{path}", json=body, timeout=30)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
