"""Wire models of the typed BentoML APIs (chat, chat_stream, generate, vision, models)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shardbento.api.openai.guided import output_constraint, refuse_beside_forced_call
from shardbento.api.openai.protocol import (
    NamedToolChoice,
    ResponseFormat,
    StructuredOutputs,
    ToolCallIn,
    ToolCallOut,
    ToolDefinition,
    Usage,
)
from shardbento.api.openai.structured import message_calls, request_tools, tool_calls_out
from shardbento.api.request import SEED_MAX, SEED_MIN, Completion, GenerationRequest, Sampling
from shardbento.engine.base import ChatMessage

MAX_STOP_STRINGS = 8


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None  # None only beside an assistant's tool_calls
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


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
    adapter: str | None = Field(
        None, description="A LoRA adapter of the model to answer with (GET /v1/models)."
    )


def sampling_of(fields: dict[str, Any]) -> Sampling:
    """A typed API's SamplingFields (as BentoML passes them: keyword arguments) for Serving."""
    return Sampling(**{**fields, "stop": tuple(fields.get("stop") or ())})


def chat_request(
    messages: list[Any], fields: dict[str, Any], request_id: str, max_schema_bytes: int
) -> GenerationRequest:
    """A typed chat API's input (messages, sampling fields, template variables, tools, response
    format or structured outputs) for Serving, checked as /v1 checks them."""
    template_kwargs = fields.pop("chat_template_kwargs", None)
    tools = request_tools(
        fields.pop("tools", None),
        fields.pop("tool_choice", None),
        fields.pop("parallel_tool_calls", None),
        max_schema_bytes,
    )
    constraint = output_constraint(
        fields.pop("response_format", None), fields.pop("structured_outputs", None), max_schema_bytes
    )
    refuse_beside_forced_call(constraint, tools)
    chat = []
    for i, m in enumerate(messages):
        calls = message_calls(i, m.role, m.content, m.tool_calls)
        chat.append(
            ChatMessage(role=m.role, text=m.content or "", tool_calls=calls, tool_call_id=m.tool_call_id)
        )
    sampling = dataclasses.replace(sampling_of(fields), constraint=constraint)
    return GenerationRequest(
        request_id,
        sampling,
        messages=tuple(chat),
        chat_template_kwargs=template_kwargs,
        tools=tools,
    )


class ChatInput(SamplingFields):
    messages: list[Message]
    chat_template_kwargs: dict[str, Any] | None = None  # extra chat-template variables
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None  # text, json_object or json_schema, as /v1 takes it
    structured_outputs: StructuredOutputs | None = None  # choice, regex, grammar, json: as /v1 takes it


class GenerateInput(SamplingFields):
    prompt: Annotated[str, Field(min_length=1)]


class VisionInput(SamplingFields):
    """An image (a multipart file) and a question about it."""

    image: Path
    prompt: Annotated[str, Field(min_length=1)]


class TextOutput(BaseModel):
    model: str
    text: str
    finish_reason: Literal["stop", "length", "tool_calls"]
    usage: Usage
    tool_calls: list[ToolCallOut] = []


def text_output(model: str, completion: Completion) -> TextOutput:
    usage = Usage(
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        total_tokens=completion.total_tokens,
    )
    return TextOutput(
        model=model,
        text=completion.text,
        finish_reason=completion.finish_reason,
        usage=usage,
        tool_calls=tool_calls_out(completion.tool_calls),
    )


class ModelCard(BaseModel):
    name: str
    kind: Literal["text", "vision"]
    ready: bool
    engine: str
    parallel: str
    devices: list[str]
    max_model_len: int
    spec: dict[str, Any]
