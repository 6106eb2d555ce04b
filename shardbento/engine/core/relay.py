"""Rank 0's metric observations as data: recorded where the scheduler runs, replayed where /metrics is."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from shardbento.engine.core.messages import MetricOp
from shardbento.metrics import RequestMetrics


class _Recorder:
    """One metric of MetricsRelay: records set/inc/observe instead of applying them."""

    __slots__ = ("_name", "_record")

    def __init__(self, name: str, record: Callable[[MetricOp], None]) -> None:
        self._name = name
        self._record = record

    def set(self, value: float) -> None:
        self._record((self._name, "set", value))

    def inc(self, amount: float = 1.0) -> None:
        self._record((self._name, "inc", amount))

    def observe(self, value: float) -> None:
        self._record((self._name, "observe", value))


class MetricsRelay:
    """Rank 0's stand-in for RequestMetrics (the same attributes): observations are kept and shipped to
    the service process, which applies them to the real metrics that /metrics serves."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops: list[MetricOp] = []
        for name in RequestMetrics.CHILDREN:
            setattr(self, name, _Recorder(name, self._record))

    def _record(self, op: MetricOp) -> None:
        with self._lock:
            self._ops.append(op)

    def finished(self, reason: str) -> None:
        self._record(("finished", "finished", reason))

    def lora_info(self, running: str, waiting: str) -> None:
        self._record(("lora_info", "lora_info", (running, waiting)))

    def take(self) -> list[MetricOp]:
        with self._lock:
            ops, self._ops = self._ops, []
        return ops


def apply_metrics(metrics: Any, ops: list[MetricOp]) -> None:
    """Replay rank 0's observations on a RequestMetrics."""
    for name, method, value in ops:
        if name == "finished":
            metrics.finished(value)
        elif name == "lora_info":
            metrics.lora_info(*value)
        else:
            getattr(getattr(metrics, name), method)(value)
