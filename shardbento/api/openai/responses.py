"""POST /v1/responses, stateless: the input items as chat messages, the same GenerationRequest and
Serving path as /v1/chat/completions, and the answer as Responses output items.

Nothing is stored: `store` may be false or left out (then too nothing is kept, as a server without a
response store must); `store: true` and `previous_response_id` are refused by name, so a client that
relies on stored state learns it at once instead of losing its conversation.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import TypeAdapter

from shardbento.api.image_urls import ImageFetchConfig, load_image
from shardbento.api.openai.formatting import parse, parse_at
from shardbento.api.openai.protocol import FunctionDefinition, FunctionName, NamedToolChoice, ToolDefinition
from shardbento.api.openai.responses_items import (
    function_call_item,
    item_id,
    message_item,
    reasoning_item,
    usage,
)
from shardbento.api.openai.responses_protocol import (
    RESPONSES_NEUTRAL,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolIn,
    InputItem,
    MessageItem,
    ReasoningItem,
    ResponseObject,
    ResponsesRequest,
    TextFormatJsonObject,
    TextFormatJsonSchema,
)
from shardbento.api.openai.responses_stream import ResponseEvents
from shardbento.api.openai.structured import request_tools, schema_text
from shardbento.api.request import Completion, GenerationRequest, Sampling
from shardbento.api.serving import Serving, new_request_id
from shardbento.engine.base import ChatMessage, Constraint, ToolCall
from shardbento.errors import InvalidRequest, ModelNotFound
from shardbento.toolcalls import closed

ITEM = TypeAdapter(InputItem)
INCLUDABLE: frozenset[str] = frozenset()  # nothing optional to add: reasoning is always returned whole


class ResponsesServing:
    """Maps the Responses API onto Serving; Serving owns validation of messages, context and images."""

    def __init__(self, serving: Serving, images: ImageFetchConfig) -> None:
        self.serving = serving
        self.images = images

    async def create(self, body: Any) -> ResponseObject | AsyncIterator[str]:
        request = parse(ResponsesRequest, body)
        self._check(request)
        limits = self.serving.settings
        tools = request_tools(
            _tool_definitions(request.tools),
            _tool_choice(request.tool_choice),
            request.parallel_tool_calls,
            limits.max_schema_bytes,
        )
        generation = GenerationRequest(
            request_id=new_request_id("resp"),
            sampling=Sampling(
                max_tokens=request.max_output_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                constraint=self._constraint(request),
            ),
            messages=tuple(await self._messages(request)),
            tools=tools,
            reasoning_effort=request.reasoning.effort if request.reasoning else None,
        )
        base = self._response(request, generation.request_id)
        if request.stream:
            started = await self.serving.stream(generation)
            return ResponseEvents(base, started).stream()
        return finished(base, await self.serving.complete(generation))

    def _check(self, request: ResponsesRequest) -> None:
        if request.model != self.serving.spec.name:
            raise ModelNotFound(
                f"The model {request.model!r} does not exist; this server serves {self.serving.spec.name!r}",
                param="model",
            )
        if request.previous_response_id is not None:
            raise InvalidRequest(
                "previous_response_id is not supported: this server stores no responses; send the whole "
                "conversation (earlier output items included) as input",
                param="previous_response_id",
            )
        if request.store:
            raise InvalidRequest(
                "store: true is not supported: this server stores no responses; send store: false or leave "
                "it out",
                param="store",
            )
        for name, neutral in RESPONSES_NEUTRAL.items():
            value = getattr(request, name)
            if not any(value == v and type(value) is type(v) for v in neutral):
                raise InvalidRequest(f"{name} is not supported by this server; remove it", param=name)
        unknown = sorted(set(request.include or ()) - INCLUDABLE)
        if unknown:
            raise InvalidRequest(
                f"include {', '.join(unknown)} is not supported by this server", param="include"
            )
        if request.stream_options is not None and not request.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")

    def _constraint(self, request: ResponsesRequest) -> Constraint | None:
        """text.format as the answer's constraint: json_object, or json_schema (objects closed unless they
        say otherwise, as /v1/chat/completions does); text: none."""
        fmt = request.text.format if request.text else None
        if isinstance(fmt, TextFormatJsonObject):
            return Constraint("json_object", param="text.format")
        if isinstance(fmt, TextFormatJsonSchema):
            param = "text.format.schema"
            source = schema_text(closed(fmt.json_schema), param, self.serving.settings.max_schema_bytes)
            return Constraint("json_schema", source, param)
        return None

    async def _messages(self, request: ResponsesRequest) -> list[ChatMessage]:
        """instructions as the system message, then the input items in order: function calls join the
        assistant turn before them, their outputs become tool messages, reasoning joins the next turn."""
        messages: list[ChatMessage] = []
        if request.instructions:
            messages.append(ChatMessage(role="system", text=request.instructions))
        if isinstance(request.input, str):
            return [*messages, ChatMessage(role="user", text=request.input)]
        reasoning: str | None = None
        for i, raw in enumerate(request.input):
            item = parse_at(ITEM, {"type": "message", **raw} if "type" not in raw else raw, f"input[{i}]")
            if isinstance(item, ReasoningItem):
                reasoning = "".join(part.text for part in item.content or item.summary)
            elif isinstance(item, MessageItem):
                messages.append(await self._message(i, item, reasoning if item.role == "assistant" else None))
                reasoning = None if item.role == "assistant" else reasoning
            elif isinstance(item, FunctionCallItem):
                messages = _with_call(messages, _call(i, item), reasoning)
                reasoning = None
            elif isinstance(item, FunctionCallOutputItem):
                output = item.output if isinstance(item.output, str) else "".join(p.text for p in item.output)
                messages.append(ChatMessage(role="tool", text=output, tool_call_id=item.call_id))
        return messages

    async def _message(self, index: int, item: MessageItem, reasoning: str | None) -> ChatMessage:
        role = "system" if item.role == "developer" else item.role
        if isinstance(item.content, str):
            return ChatMessage(role=role, text=item.content, reasoning_content=reasoning)
        texts: list[str] = []
        images: list[Any] = []
        limits = self.serving.settings
        for j, part in enumerate(item.content):
            if part.type == "input_image":
                image = await load_image(
                    part.image_url,
                    self.images,
                    param=f"input[{index}].content[{j}].image_url",
                    max_bytes=limits.max_image_bytes,
                    max_pixels=limits.max_image_pixels,
                )
                images.append(image)
            else:
                texts.append(part.refusal if part.type == "refusal" else part.text)
        return ChatMessage(
            role=role, text="\n".join(texts), images=tuple(images), reasoning_content=reasoning
        )

    def _response(self, request: ResponsesRequest, request_id: str) -> ResponseObject:
        """The response as it starts (status in_progress): the request's settings echoed back."""
        defaults = self.serving.spec.generation
        text_format = request.text.format if request.text and request.text.format else None
        choice = request.tool_choice
        return ResponseObject(
            id=request_id,
            created_at=int(time.time()),
            status="in_progress",
            instructions=request.instructions,
            max_output_tokens=request.max_output_tokens,
            metadata=request.metadata or {},
            model=self.serving.spec.name,
            parallel_tool_calls=True if request.parallel_tool_calls is None else request.parallel_tool_calls,
            reasoning={"effort": request.reasoning.effort, "summary": None} if request.reasoning else None,
            temperature=defaults.temperature if request.temperature is None else request.temperature,
            text={"format": text_format.model_dump(by_alias=True) if text_format else {"type": "text"}},
            tool_choice=choice.model_dump() if hasattr(choice, "model_dump") else (choice or "auto"),
            tools=[{**tool, "strict": tool.get("strict")} for tool in request.tools or []],
            top_p=defaults.top_p if request.top_p is None else request.top_p,
            user=request.user,
        )


def finished(base: ResponseObject, completion: Completion) -> ResponseObject:
    """The whole answer: a reasoning item (thinking models), the message, the function calls."""
    incomplete = completion.finish_reason == "length"
    output: list[dict[str, Any]] = []
    if completion.reasoning is not None:
        output.append(reasoning_item(item_id("rs"), completion.reasoning, "completed"))
    if completion.text or not completion.tool_calls:
        status = "incomplete" if incomplete else "completed"
        output.append(message_item(item_id("msg"), completion.text, status))
    output.extend(function_call_item(item_id("fc"), call, "completed") for call in completion.tool_calls)
    return base.model_copy(
        update={
            "status": "incomplete" if incomplete else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "output": output,
            "usage": usage(
                completion.prompt_tokens, completion.completion_tokens, completion.reasoning_tokens
            ),
        }
    )


def _tool_definitions(tools: list[dict[str, Any]] | None) -> list[ToolDefinition] | None:
    """Function tools in chat's shape (request_tools checks them); other tool types refused by name."""
    if tools is None:
        return None
    result = []
    for i, raw in enumerate(tools):
        kind = raw.get("type")
        if kind != "function":
            raise InvalidRequest(
                f"tools[{i}].type {kind!r} is not supported: this server runs function tools only",
                param=f"tools[{i}].type",
            )
        tool = parse_at(FunctionToolIn, raw, f"tools[{i}]")
        function = FunctionDefinition(
            name=tool.name, description=tool.description, parameters=tool.parameters, strict=tool.strict
        )
        result.append(ToolDefinition(type="function", function=function))
    return result


def _tool_choice(choice: Any) -> str | NamedToolChoice | None:
    if choice is None or isinstance(choice, str):
        return choice
    if hasattr(choice, "name"):
        return NamedToolChoice(type="function", function=FunctionName(name=choice.name))
    raise InvalidRequest(
        f"tool_choice of type {choice.get('type')!r} is not supported: send none, auto, required or "
        '{"type": "function", "name": ...}',
        param="tool_choice",
    )


def _call(index: int, item: FunctionCallItem) -> ToolCall:
    try:
        arguments = json.loads(item.arguments)
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise InvalidRequest(
            f"input[{index}].arguments must be a JSON object as text", param=f"input[{index}].arguments"
        )
    return ToolCall(item.call_id, item.name, item.arguments)


def _with_call(messages: list[ChatMessage], call: ToolCall, reasoning: str | None) -> list[ChatMessage]:
    """The call joins the assistant turn just before it (a turn may make several), else starts one."""
    if messages and messages[-1].role == "assistant":
        last = messages[-1]
        joined = ChatMessage(
            role="assistant",
            text=last.text,
            images=last.images,
            tool_calls=(*last.tool_calls, call),
            reasoning_content=last.reasoning_content if reasoning is None else reasoning,
        )
        return [*messages[:-1], joined]
    return [
        *messages,
        ChatMessage(role="assistant", text="", tool_calls=(call,), reasoning_content=reasoning),
    ]
