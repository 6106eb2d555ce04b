"""Our stat logger inside vLLM's own StatLoggerManager, with vLLM's real config and stats objects (no
engine started): the catalog limits reach vLLM's config, vLLM keeps its Prometheus logger beside ours,
and one step's stats land in both."""

from __future__ import annotations

from prometheus_client import REGISTRY
from vllm import AsyncEngineArgs
from vllm.v1.metrics.loggers import PerEngineStatLoggerAdapter, PrometheusStatLogger, StatLoggerManager
from vllm.v1.metrics.stats import IterationStats, PrefixCacheStats, SchedulerStats

from shardbento.catalog import ModelSpec, load_spec
from shardbento.engine.vllm.args import engine_kwargs
from shardbento.engine.vllm.engine import known_engine_args
from shardbento.engine.vllm.statlogger import CatalogStatLogger, stat_logger_factory
from shardbento.engine.vllm.stats import SchedulerRecorder
from shardbento.metrics import RequestMetrics
from shardbento.plan.source import resolve_source


def vllm_config(spec: ModelSpec):
    kwargs = engine_kwargs(spec, resolve_source(spec), known_engine_args())
    return AsyncEngineArgs(**kwargs).create_engine_config()


def test_vllm_statlogger_config_has_the_catalog_limits_and_both_loggers_record() -> None:
    base = load_spec("tiny-llama")
    limits = base.limits.model_copy(update={"max_num_seqs": 7, "prefix_caching": False})
    spec = base.model_copy(update={"name": "statlogger-probe", "engine": "vllm", "limits": limits})
    config = vllm_config(spec)
    assert config.scheduler_config.max_num_seqs == 7
    assert config.cache_config.enable_prefix_caching is False

    recorder = SchedulerRecorder(RequestMetrics(spec.name))
    manager = StatLoggerManager(config, custom_stat_loggers=[stat_logger_factory(recorder)])
    kinds = [type(logger) for logger in manager.stat_loggers]
    assert PrometheusStatLogger in kinds  # vLLM's vllm:* families stay
    ours = next(logger for logger in manager.stat_loggers if isinstance(logger, PerEngineStatLoggerAdapter))
    assert isinstance(ours.per_engine_stat_loggers[0], CatalogStatLogger)

    step = SchedulerStats(
        num_running_reqs=2,
        num_waiting_reqs=1,
        kv_cache_usage=0.25,
        prefix_cache_stats=PrefixCacheStats(requests=1, queries=32, hits=16),
    )
    iteration = IterationStats()
    iteration.prompt_token_stats.total = 32
    iteration.num_preempted_reqs = 1
    manager.record(step, iteration, engine_idx=0)

    def ours_value(name: str) -> float | None:
        return REGISTRY.get_sample_value(f"shardbento:{name}", {"model_name": spec.name})

    assert ours_value("num_requests_running") == 2
    assert ours_value("num_requests_waiting") == 1
    assert ours_value("kv_cache_usage_perc") == 0.25
    assert (ours_value("prefix_cache_queries_total"), ours_value("prefix_cache_hits_total")) == (32, 16)
    assert ours_value("prompt_tokens_total") == 32
    assert ours_value("num_preemptions_total") == 1
    served = config.model_config.served_model_name
    assert REGISTRY.get_sample_value("vllm:num_requests_running", {"model_name": served, "engine": "0"}) == 2
