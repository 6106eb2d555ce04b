"""A 400's `param` names the field in the body's own terms: no pydantic union member names (`str`,
`list[tagged-union[...]]`, a model's class name) and no tagged union's tag in the path."""

from __future__ import annotations

import pytest

from shardbento.api.openai.formatting import parse, parse_at
from shardbento.api.openai.protocol import ChatCompletionRequest
from shardbento.api.openai.responses import ITEM
from shardbento.errors import InvalidRequest

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


def refused(body: dict) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse(ChatCompletionRequest, {"model": "m", **body})
    return caught.value


def user(content) -> dict:
    return {"messages": [{"role": "user", "content": content}]}


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        (user([IMAGE, {"type": "bogus", "text": "a"}]), "messages[0].content[1]", "Input tag 'bogus'"),
        (user([{"type": "text"}]), "messages[0].content[0].text", "Field required"),
        (user([{"type": "text", "text": 5}]), "messages[0].content[0].text", "valid string"),
        (
            user([{"type": "image_url", "image_url": {}}]),
            "messages[0].content[0].image_url.url",
            "Field required",
        ),
        (user(5), "messages[0].content", "valid string"),
        (
            {"messages": []} | {"tools": [{"type": "function", "function": {}}]},
            "tools[0].function.name",
            "Field required",
        ),
        ({"messages": [], "temperature": "hot"}, "temperature", "valid number"),
    ],
)
def test_param_is_the_body_field(body: dict, param: str, says: str) -> None:
    error = refused(body)
    assert error.param == param
    assert f"{param}: " in str(error) and says in str(error)
    assert "str" not in error.param.split(".") and "list[" not in error.param


def test_a_list_content_hears_of_its_parts_not_of_the_string_alternative() -> None:
    message = str(refused(user([{"type": "bogus"}])))
    assert "valid string" not in message and "content.str" not in message


def test_model_class_names_of_a_union_stay_out_of_the_path() -> None:
    message = str(refused({"messages": [], "tool_choice": {"type": "function", "function": {}}}))
    assert "tool_choice.function.name: Field required" in message
    assert "NamedToolChoice" not in message


def test_parse_at_names_a_responses_item_part_under_its_place() -> None:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text"}]}
    with pytest.raises(InvalidRequest) as caught:
        parse_at(ITEM, item, "input[2]")
    assert caught.value.param == "input[2].content[0].text"
