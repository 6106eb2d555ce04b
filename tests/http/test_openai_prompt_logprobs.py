"""Prompt logprobs through the real app over the engine process: /v1/completions' echo with logprobs
(an lm-eval loglikelihood request, read the way lm-eval reads it), max_tokens 0 with echo, vLLM's
prompt_logprobs field on completions and chat, the streamed echo, and the 400s. Every value is
checked against an in-process forward's log-softmax."""

from __future__ import annotations

import pytest
import torch
from asgi_app import openai_app, with_openai_client

from shardbento.engine.base import ChatMessage

MODEL = "tiny-llama"
CONTEXT = "Question: which bento serves the model? Answer:"
CONTINUATION = " the sharded one"


@pytest.fixture(scope="module")
def app(text_engine):
    return openai_app(text_engine)


def run(app, scenario):
    return with_openai_client(app, scenario, with_http=True)


def reference(text_model, ids: list[int]) -> torch.Tensor:
    """Row i: the log-softmax that predicts token i+1, from one plain forward of the whole prompt."""
    with torch.inference_mode():
        return text_model.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)


def encode(text_engine, text: str) -> list[int]:
    return list(text_engine.encode(text).token_ids)


def loglikelihood(app, ids: list[int], ctxlen: int) -> tuple[float, bool, object]:
    """lm-eval's local-completions loglikelihood: token ids, echo, logprobs 1, max_tokens 1; it sums
    token_logprobs[ctxlen:-1] and calls the continuation greedy when each token is its top's best."""
    body = {"prompt": [ids], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True, "seed": 1234}
    response = run(app, lambda client, _: client.completions.create(model=MODEL, **body))
    logprobs = response.choices[0].logprobs
    continuation = logprobs.token_logprobs[ctxlen:-1]
    tops = logprobs.top_logprobs[ctxlen:-1]
    greedy = all(lp == max(top.values()) for lp, top in zip(continuation, tops, strict=True))
    return sum(continuation), greedy, response


def test_lm_eval_loglikelihood_request(app, text_engine, text_model) -> None:
    context = encode(text_engine, CONTEXT)
    greedy_ids = list(context)
    for _ in range(3):  # the model's own greedy continuation: lm-eval must call it greedy
        greedy_ids.append(int(reference(text_model, greedy_ids)[-1].argmax()))
    total, greedy, _ = loglikelihood(app, greedy_ids, len(context))
    rows = reference(text_model, greedy_ids)
    assert greedy
    assert total == pytest.approx(
        sum(rows[i - 1, greedy_ids[i]].item() for i in range(len(context), len(greedy_ids))), abs=1e-3
    )

    ids = context + encode(text_engine, CONTINUATION)[1:]  # no second BOS
    total, greedy, response = loglikelihood(app, ids, len(context))
    rows = reference(text_model, ids)
    assert total == pytest.approx(
        sum(rows[i - 1, ids[i]].item() for i in range(len(context), len(ids))), abs=1e-3
    )
    assert greedy == all(int(rows[i - 1].argmax()) == ids[i] for i in range(len(context), len(ids)))
    choice = response.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(ids) + 1
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for position in range(1, len(ids)):  # the one alternative is the most likely token there
        (best,) = logprobs.top_logprobs[position].values()
        assert best == pytest.approx(rows[position - 1].max().item(), abs=1e-4)
    assert choice.text.startswith(text_engine.decode(ids)) and len(choice.text) > len(text_engine.decode(ids))
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    assert response.usage.prompt_tokens == len(ids) and response.usage.completion_tokens == 1


def test_echo_with_max_tokens_zero_returns_the_prompt_alone(app, text_engine, text_model) -> None:
    ids = encode(text_engine, CONTEXT)
    body = {"prompt": CONTEXT, "max_tokens": 0, "echo": True, "logprobs": 2}
    response = run(app, lambda client, _: client.completions.create(model=MODEL, **body))
    choice = response.choices[0]
    assert choice.text == CONTEXT and choice.finish_reason == "length"
    assert response.usage.completion_tokens == 0
    assert len(choice.logprobs.token_logprobs) == len(ids)
    rows = reference(text_model, ids)
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(
        [rows[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=1e-4
    )
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs[1:])

    async def streamed(client, _):
        stream = await client.completions.create(model=MODEL, stream=True, **body)
        return [chunk async for chunk in stream]

    chunks = run(app, streamed)
    assert "".join(c.choices[0].text for c in chunks) == CONTEXT
    assert [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs] == (
        choice.logprobs.token_logprobs
    )


def test_streamed_echo_carries_the_prompt_logprobs_first(app, text_engine) -> None:
    ids = encode(text_engine, CONTEXT)
    body = {
        "prompt": CONTEXT,
        "max_tokens": 4,
        "echo": True,
        "logprobs": 0,
        "extra_body": {"ignore_eos": True},
    }
    whole = run(app, lambda client, _: client.completions.create(model=MODEL, **body))

    async def streamed(client, _):
        stream = await client.completions.create(model=MODEL, stream=True, **body)
        return [chunk async for chunk in stream]

    chunks = run(app, streamed)
    first = chunks[0].choices[0]
    assert first.text.startswith(CONTEXT)
    assert first.logprobs.token_logprobs[0] is None
    assert first.logprobs.tokens[: len(ids)] == whole.choices[0].logprobs.tokens[: len(ids)]
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    values = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert tokens == whole.choices[0].logprobs.tokens and len(tokens) == len(ids) + 4
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == whole.choices[0].logprobs.text_offset  # counted the same way streamed or not
    assert values == pytest.approx(whole.choices[0].logprobs.token_logprobs, abs=1e-4)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


def check_vllm_field(
    field: list, ids: list[int], rows: torch.Tensor, top: int, texts: list[str] | None
) -> None:
    """vLLM's shape: null for the first token, then {token id: {logprob, rank, decoded_token}} with the
    token itself and the `top` most likely (`texts`: the tokens' text, where known)."""
    assert field[0] is None and len(field) == len(ids)
    for position in range(1, len(ids)):
        entry, row = field[position], rows[position - 1]
        token = str(ids[position])
        assert entry[token]["logprob"] == pytest.approx(row[ids[position]].item(), abs=1e-4)
        assert abs(entry[token]["rank"] - (int((row > row[ids[position]]).sum()) + 1)) <= 1
        if texts is not None:
            assert entry[token]["decoded_token"] == texts[position]
        ranked = sorted(entry.values(), key=lambda e: e["rank"])
        best = row.topk(top).values.tolist()
        assert [e["logprob"] for e in ranked if e["rank"] <= top] == pytest.approx(best, abs=1e-4)
        assert len(entry) in (top, top + 1)


def test_prompt_logprobs_field_on_completions_and_chat(app, text_engine, text_model) -> None:
    ids = encode(text_engine, CONTEXT)

    async def both(client, http):
        completion = await http.post(
            "/completions",
            json={
                "model": MODEL,
                "prompt": CONTEXT,
                "max_tokens": 2,
                "prompt_logprobs": 3,
                "echo": True,
                "logprobs": 0,
            },
        )
        chat = await http.post(
            "/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": CONTEXT}],
                "max_tokens": 2,
                "prompt_logprobs": 1,
            },
        )
        return completion.json(), chat.json()

    completion, chat = run(app, both)
    choice = completion["choices"][0]
    echoed = choice["logprobs"]  # echo's list keeps logprobs' 0 alternatives: the token alone
    assert all(top is None or len(top) == 1 for top in echoed["top_logprobs"])
    texts = echoed["tokens"][: len(ids)]
    check_vllm_field(choice["prompt_logprobs"], ids, reference(text_model, ids), 3, texts)
    assert chat["choices"][0]["logprobs"] is None  # prompt_logprobs alone leaves the output's off
    rendered = list(text_engine.render_chat([ChatMessage(role="user", text=CONTEXT)]).token_ids)
    check_vllm_field(chat["prompt_logprobs"], rendered, reference(text_model, rendered), 1, None)


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/completions", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ("/chat/completions", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ("/completions", {"max_tokens": 0}, "max_tokens"),
        ("/completions", {"prompt_logprobs": 21}, "prompt_logprobs"),
        ("/completions", {"prompt_logprobs": -1}, "prompt_logprobs"),
        ("/chat/completions", {"max_tokens": 0, "echo": True}, "max_tokens"),
    ],
)
def test_prompt_logprobs_refusals_are_400_naming_the_field(app, path, extra, param) -> None:
    body = {"model": MODEL, **extra}
    body.update(
        {"prompt": CONTEXT} if path == "/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    )
    response = run(app, lambda _, http: http.post(path, json=body))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.fixture(scope="module")
def generate_app():
    """tiny-llama served one request at a time through generate() (no prompt logits to score with)."""
    from shardbento.catalog import load_spec
    from shardbento.engine.core.engine import ProcessEngine
    from shardbento.settings import Settings

    engine = ProcessEngine.load(load_spec(MODEL), settings=Settings(force_generate=True))
    try:
        yield openai_app(engine)
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"echo": True, "logprobs": 1, "stream": True}, "echo"),
        ({"prompt_logprobs": 1}, "prompt_logprobs"),
        ({"echo": True, "logprobs": 1, "prompt_logprobs": 2}, "prompt_logprobs"),
    ],
)
def test_a_model_without_prompt_scores_refuses_naming_the_field_that_asked(
    generate_app, extra, param
) -> None:
    """A model served through generate() cannot score a prompt: the 400 names the field the client sent
    (echo with logprobs asks as much as prompt_logprobs does), and a plain request still answers."""
    body = {"model": MODEL, "prompt": CONTEXT, "max_tokens": 2, **extra}
    response = run(generate_app, lambda _, http: http.post("/completions", json=body))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "generate()" in error["message"]
    plain = {"model": MODEL, "prompt": CONTEXT, "max_tokens": 2, "echo": True}  # echo alone scores nothing
    answered = run(generate_app, lambda _, http: http.post("/completions", json=plain))
    assert answered.status_code == 200 and answered.json()["choices"][0]["text"].startswith(CONTEXT)
