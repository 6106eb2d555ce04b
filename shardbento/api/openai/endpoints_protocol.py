"""Wire models of /v1's endpoints beside generation (vLLM's names and shapes): the model list, tokenize
and detokenize, LoRA adapters loaded and unloaded at run time; pydantic only."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from shardbento.api.openai.protocol import ChatMessageIn


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int
    kind: Literal["text", "vision"]
    ready: bool
    root: str | None = None  # vLLM's: the base model's source, or a LoRA adapter's
    parent: str | None = None  # vLLM's: a LoRA adapter's base model


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's POST /v1/load_lora_adapter."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_path: str
    load_inplace: Literal[False] = False


class UnloadLoraAdapterRequest(BaseModel):
    """vLLM's POST /v1/unload_lora_adapter."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_int_id: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class TokenizeCompletionRequest(BaseModel):
    """vLLM's POST /tokenize for a raw prompt; the options this server cannot honour are refused by name."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str
    add_special_tokens: Literal[True] = True
    return_token_strs: Literal[False] = False


class TokenizeChatRequest(BaseModel):
    """vLLM's POST /tokenize for chat messages, rendered with the chat template as a chat request is."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    messages: list[ChatMessageIn]
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: Literal[True] = True
    return_token_strs: Literal[False] = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
