"""Wire models of the typed BentoML APIs (chat, chat_stream, generate, vision, models)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shardbento.api.request import SEED_MAX, SEED_MIN, Completion, GenerationRequest, Sampling
from shardbento.engine.base import ChatMessage

MAX_STOP_STRINGS = 8


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class SamplingFields(BaseModel):
    """Fields every generating API takes; unset ones come from the catalog entry's defaults."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: Annotated[int | None, Field(ge=1)] = None
    temperature: Annotated[float | None, Field(ge=0.0, le=2.0)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    top_k: Annotated[int | None, Field(ge=0)] = None
    seed: Annotated[int | None, Field(ge=SEED_MIN, le=SEED_MAX)] = None
    stop: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_STRINGS)] = []
    presence_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    frequency_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    min_p: Annotated[float | None, Field(ge=0.0, le=1.0)] = None


def sampling_of(fields: dict[str, Any]) -> Sampling:
    """A typed API's SamplingFields (as BentoML passes them: keyword arguments) for Serving."""
    return Sampling(**{**fields, "stop": tuple(fields.get("stop") or ())})


def chat_request(messages: list[Any], fields: dict[str, Any], request_id: str) -> GenerationRequest:
    """A typed chat API's input (messages, sampling fields, template variables) for Serving."""
    template_kwargs = fields.pop("chat_template_kwargs", None)
    chat = tuple(ChatMessage(role=m.role, text=m.content) for m in messages)
    return GenerationRequest(
        request_id, sampling_of(fields), messages=chat, chat_template_kwargs=template_kwargs
    )


class ChatInput(SamplingFields):
    messages: list[Message]
    chat_template_kwargs: dict[str, Any] | None = None  # extra chat-template variables


class GenerateInput(SamplingFields):
    prompt: Annotated[str, Field(min_length=1)]


class VisionInput(SamplingFields):
    """An image (a multipart file) and a question about it."""

    image: Path
    prompt: Annotated[str, Field(min_length=1)]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TextOutput(BaseModel):
    model: str
    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage


def text_output(model: str, completion: Completion) -> TextOutput:
    usage = Usage(
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        total_tokens=completion.total_tokens,
    )
    return TextOutput(model=model, text=completion.text, finish_reason=completion.finish_reason, usage=usage)


class ModelCard(BaseModel):
    name: str
    kind: Literal["text", "vision"]
    ready: bool
    engine: str
    parallel: str
    devices: list[str]
    max_model_len: int
    spec: dict[str, Any]
