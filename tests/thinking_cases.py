"""What the thinking-model tests send on every engine: the logit biases that make a random model write
a reasoning block, a weather tool, and a streamed chat split into its reasoning and its content."""

from __future__ import annotations

from typing import Any

from asgi_app import with_openai_client

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 3},
    },
    "required": ["city", "days"],
}
WEATHER_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]


def think_bias(tokenizer: Any, opens: bool = True) -> dict[str, float]:
    """`<think>` first (unless the prompt opened the block), then " he" until its penalties
    (frequency_penalty 2 per use) reach `</think>`'s bias."""
    think, end = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    (he,) = tokenizer.encode(" he", add_special_tokens=False)
    return {**({str(think): 100} if opens else {}), str(he): 30, str(end): 21}


def streamed_split(app: Any, body: dict) -> tuple[str, str, list]:
    """(reasoning, content, chunks) of a streamed chat; the reasoning came under both names alike."""

    async def scenario(client):
        stream = await client.chat.completions.create(stream=True, **body)
        return [chunk async for chunk in stream]

    chunks = with_openai_client(app, scenario)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    thought = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert thought == "".join(getattr(d, "reasoning", None) or "" for d in deltas)
    return thought, "".join(d.content or "" for d in deltas), chunks
