"""Composition root: pick the catalog model, derive BentoML resources, mount the APIs, run the engine."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import bentoml
from pydantic import BaseModel

from shardbento.api.disconnect import unless_typed_client_leaves
from shardbento.api.errors import ErrorShapeMiddleware, typed_errors, typed_stream_errors
from shardbento.api.images import decode_image
from shardbento.api.middleware.auth import ApiKeyMiddleware
from shardbento.api.middleware.faults import FaultInjectionMiddleware
from shardbento.api.middleware.limits import BodySizeLimit, InFlightLimit, RequestIdMiddleware
from shardbento.api.middleware.openapi_doc import OpenAPIErrorShapeMiddleware
from shardbento.api.middleware.stack import adjust_bentoml_stack
from shardbento.api.openai.routes import attach_serving, create_openai_app, create_root_app
from shardbento.api.protocol import (
    ChatInput,
    GenerateInput,
    ModelCard,
    TextOutput,
    VisionInput,
    chat_request,
    sampling_of,
    text_output,
)
from shardbento.api.request import GenerationRequest
from shardbento.api.serving import Serving, new_request_id
from shardbento.api.ui import ui_app
from shardbento.catalog import select_spec
from shardbento.deploy import bento as deploy
from shardbento.engine.base import ChatMessage
from shardbento.errors import InvalidRequest
from shardbento.plan.weights import check_spec_weights

logger = logging.getLogger("shardbento.service")


class ServiceArgs(BaseModel):
    model: str | None = None


SPEC = select_spec(bentoml.use_arguments(ServiceArgs).model)
HUB_WEIGHTS = deploy.hub_weights(SPEC)
OPENAI_APP = create_openai_app()
ROOT_APP = create_root_app()  # vLLM's root endpoints: /health, /version, /tokenize, /detokenize
adjust_bentoml_stack()  # our timeout middleware; no tracing span per streamed chunk


@bentoml.service(
    name="shardbento",
    resources=SPEC.resources(),
    # No traffic.max_concurrency: BentoML's check runs outside our middlewares and answers a bare 429
    # (no Retry-After, not OpenAI's shape) counting even the requests InFlightLimit refuses cheaply.
    # traffic.concurrency is what BentoCloud autoscales on: the batch this replica runs at once.
    traffic={"timeout": 600, "concurrency": SPEC.limits.max_num_seqs},
    envs=deploy.service_envs(SPEC),
    labels=deploy.bento_labels(SPEC),
    image=deploy.image_for(SPEC),
)
@bentoml.asgi_app(OPENAI_APP, path="/v1")
@bentoml.asgi_app(ui_app, path="/ui")
@bentoml.asgi_app(ROOT_APP, path="/")
class ShardBento:
    """Serves one catalog model through typed APIs; see docs/structure.md for a request's path."""

    # Hub weights and LoRA adapters (lora_0, ...), declared the BentoML way (class attributes) so a
    weights = HUB_WEIGHTS  # built Bento and its image carry them
    vars().update(deploy.hub_adapters(SPEC))

    def __init__(self) -> None:
        self.serving = Serving(SPEC)
        for app in (OPENAI_APP, ROOT_APP):  # they share this Serving: one model, one request path
            attach_serving(app, self.serving)
        self._loader: asyncio.Task[None] | None = None

    @bentoml.on_startup
    async def start_engine(self) -> None:
        """Load in the background so /readyz answers (503) while weights load."""
        self._loader = asyncio.create_task(self._load())

    async def _load(self) -> None:
        from shardbento.engine import create_engine

        try:
            await asyncio.to_thread(check_spec_weights, self._local_spec())  # names a bad shard
            self.serving.attach(await asyncio.to_thread(lambda: create_engine(self._local_spec())))
            logger.info("model %s is ready", SPEC.name)
        except Exception as exc:
            self.serving.load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("model %s failed to load", SPEC.name)

    def _local_spec(self) -> Any:
        """The spec with hub weights and adapters replaced by BentoML's copies (downloaded on first read)."""
        return deploy.local_spec(SPEC, self)

    @bentoml.on_shutdown
    def stop_engine(self) -> None:
        if self.serving.engine is not None:
            self.serving.engine.close()

    def __is_ready__(self) -> bool:
        return self.serving.is_ready()

    def __is_alive__(self) -> bool:
        return self.serving.is_alive()

    async def _stream(self, request: GenerationRequest) -> AsyncGenerator[str, None]:
        generation = await unless_typed_client_leaves(self.serving.stream(request))
        async for delta in generation.deltas:
            if delta.text:
                yield delta.text

    async def _complete(self, request: GenerationRequest) -> TextOutput:
        return text_output(SPEC.name, await unless_typed_client_leaves(self.serving.complete(request)))

    @bentoml.api(input_spec=ChatInput)
    @typed_errors
    async def chat(self, messages: list[Any], **sampling: Any) -> TextOutput:
        """Chat messages in, the assistant's whole answer out."""
        return await self._complete(self._chat(messages, sampling))

    @bentoml.api(input_spec=ChatInput)
    @typed_stream_errors
    async def chat_stream(self, messages: list[Any], **sampling: Any) -> AsyncGenerator[str, None]:
        """Chat messages in, text deltas out as they are generated."""
        request = self._chat(messages, sampling)
        if request.tools is not None and request.tools.choice != "none":
            raise InvalidRequest("chat_stream streams text only: send tools to chat or /v1", param="tools")
        async for text in self._stream(request):
            yield text

    def _chat(self, messages: list[Any], sampling: dict[str, Any]) -> GenerationRequest:
        return chat_request(messages, sampling, new_request_id(), self.serving.settings.max_schema_bytes)

    @bentoml.api(input_spec=GenerateInput)
    @typed_errors
    async def generate(self, prompt: str, **sampling: Any) -> TextOutput:
        """Raw completion of a prompt, no chat template (for base models)."""
        return await self._complete(GenerationRequest(new_request_id(), sampling_of(sampling), prompt=prompt))

    @bentoml.api(input_spec=VisionInput)
    @typed_errors
    async def vision(self, image: Path, prompt: str, **sampling: Any) -> TextOutput:
        """An image and a question in, the answer out."""
        return await self._complete(await self._vision(image, prompt, sampling))

    @bentoml.api(input_spec=VisionInput)
    @typed_stream_errors
    async def vision_stream(self, image: Path, prompt: str, **sampling: Any) -> AsyncGenerator[str, None]:
        """An image and a question in, text deltas out."""
        async for text in self._stream(await self._vision(image, prompt, sampling)):
            yield text

    async def _vision(self, image: Path | None, prompt: str, sampling: dict[str, Any]) -> GenerationRequest:
        """The upload read and decoded in a worker thread (a large image would stall the event loop)."""
        if image is None:
            raise InvalidRequest("an image is required", param="image")
        limits = self.serving.settings
        decoded = await asyncio.to_thread(
            lambda: decode_image(
                image.read_bytes(), max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels
            )
        )
        message = ChatMessage(role="user", text=prompt, images=(decoded,))
        return GenerationRequest(new_request_id(), sampling_of(sampling), messages=(message,))

    @bentoml.api
    async def models(self) -> ModelCard:
        """The served model, its catalog spec, and whether it is ready."""
        info = self.serving.engine.info if self.serving.engine else None
        return ModelCard(
            name=SPEC.name,
            kind=SPEC.kind,
            ready=self.serving.is_ready(),
            engine=info.engine if info else SPEC.engine,
            parallel=info.parallel if info else SPEC.parallel,
            devices=list(info.devices) if info else [],
            max_model_len=SPEC.max_model_len,
            spec=SPEC.model_dump(mode="json"),
        )


# Outermost first: an id for the logs, then the cheap refusals before any body is read (they answer in
# the error shape themselves, with `Connection: close`), then one error shape for everything inside.
ShardBento.add_asgi_middleware(RequestIdMiddleware)
ShardBento.add_asgi_middleware(ApiKeyMiddleware)
ShardBento.add_asgi_middleware(
    InFlightLimit, max_in_flight=SPEC.limits.max_num_seqs + SPEC.limits.max_waiting
)
ShardBento.add_asgi_middleware(BodySizeLimit)
ShardBento.add_asgi_middleware(ErrorShapeMiddleware)
ShardBento.add_asgi_middleware(OpenAPIErrorShapeMiddleware)
ShardBento.add_asgi_middleware(FaultInjectionMiddleware)
