"""vLLM's custom stat-logger hook, feeding our RequestMetrics; vLLM keeps its own Prometheus logger beside it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

from shardbento.engine.vllm.stats import SchedulerRecorder


class CatalogStatLogger(StatLoggerBase):
    """One engine core's stats, recorded under the catalog name (vLLM's `vllm:*` carry the model path).

    AsyncLLM calls `record` from its output handler, on the service's event loop, once per engine step.
    """

    def __init__(self, recorder: SchedulerRecorder, vllm_config: Any, engine_index: int = 0) -> None:
        self._recorder = recorder
        self._engine_index = engine_index

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        self._recorder.record(self._engine_index, scheduler_stats, iteration_stats)

    def log_engine_initialized(self) -> None:
        """Nothing to say: vLLM's own loggers report the engine's configuration."""


def stat_logger_factory(recorder: SchedulerRecorder) -> Callable[[Any, int], StatLoggerBase]:
    """What `AsyncLLM.from_engine_args(stat_loggers=[...])` takes: (vllm_config, engine_index) -> logger.

    Not a class, so vLLM wraps it per engine core and still adds its PrometheusStatLogger (it leaves
    that out only when a custom logger is a PrometheusStatLogger).
    """
    return functools.partial(CatalogStatLogger, recorder)
