"""Wire models of POST /v1/responses (OpenAI's Responses API, stateless); pydantic only.

Field names follow the openai SDK's `openai.types.responses`. Input items are parsed loosely here (a
list of objects) and each is checked by its `type` in responses.py, so a 400 names the item.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shardbento.api.openai.protocol import FUNCTION_NAME, ReasoningEffort

# Fields we parse only to refuse: the values that still mean "not used" (anything else is a 400).
RESPONSES_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "previous_response_id": (None,),  # no responses are stored: send the whole conversation as input
    "conversation": (None,),
    "prompt": (None,),
    "background": (None, False),
    "max_tool_calls": (None,),
    "top_logprobs": (None, 0),
    "context_management": (None, []),
    "service_tier": (None, "auto", "default"),
    "truncation": (None, "disabled"),
}


class InputText(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["input_text"]
    text: str


class InputImage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["input_image"]
    image_url: Annotated[str, Field(min_length=1)]  # a data URI, or http(s) where enabled
    detail: Literal["auto", "low", "high", "original"] | None = None


class OutputText(BaseModel):
    """An earlier assistant message's text, as clients send their history back."""

    model_config = ConfigDict(extra="allow")

    type: Literal["output_text"]
    text: str


class Refusal(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[InputText | InputImage | OutputText | Refusal, Field(discriminator="type")]


class MessageItem(BaseModel):
    """A message: `type` may be left out (the SDK's EasyInputMessage); an assistant's carries output_text."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    id: str | None = None
    status: str | None = None
    phase: str | None = None


class FunctionCallItem(BaseModel):
    """A call the model made in an earlier turn."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1)]
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(BaseModel):
    """The caller's result for a function call (text, or a list of input_text parts)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1)]
    output: str | list[InputText]
    id: str | None = None
    status: str | None = None


class ReasoningText(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str


class ReasoningItem(BaseModel):
    """An earlier turn's reasoning, sent back by clients: passed to the template with the next turn."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[ReasoningText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: None = None  # this server never hands any out
    status: str | None = None


InputItem = Annotated[
    MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem, Field(discriminator="type")
]


class FunctionToolIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: str


class TextFormatText(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]


class TextFormatJsonObject(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json_object"]


class TextFormatJsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["json_schema"]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    json_schema: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None  # always enforced: the answer is decoded under the schema's grammar


TextFormat = Annotated[
    TextFormatText | TextFormatJsonObject | TextFormatJsonSchema, Field(discriminator="type")
]


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: TextFormat | None = None
    verbosity: None = None  # no verbosity control: leave it out


class ReasoningConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    effort: ReasoningEffort | None = None  # the template's `reasoning_effort` (thinking models only)
    summary: None = None  # the reasoning is returned whole, never summarized
    generate_summary: None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_obfuscation: bool | None = None  # no obfuscation padding is sent either way


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[dict[str, Any]]  # each item is checked by responses.py, named by its index
    instructions: str | None = None
    max_output_tokens: Annotated[int | None, Field(ge=1)] = None
    temperature: Annotated[float | None, Field(ge=0.0, le=2.0)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    tools: list[dict[str, Any]] | None = None  # function tools; others are refused by type
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # a hint; prefix caching here needs none
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    store: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    include: list[str] | None = None

    previous_response_id: Any = None
    conversation: Any = None
    prompt: Any = None
    background: Any = None
    max_tool_calls: Any = None
    top_logprobs: Any = None
    context_management: Any = None
    service_tier: Any = None
    truncation: Any = None


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class ResponseObject(BaseModel):
    """What `responses.create` returns (and what response.* events carry): output items as dicts."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "failed", "in_progress", "incomplete"]
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, str] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    model: str
    output: list[dict[str, Any]] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: None = None
    reasoning: dict[str, Any] | None = None
    store: bool = False
    temperature: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_p: float | None = None
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    background: bool = False
