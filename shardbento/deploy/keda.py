"""Autoscaling on the engine's queue: a KEDA ScaledObject whose Prometheus triggers read the model's
waiting and running requests, and the ServiceMonitor that has the Prometheus operator scrape /metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shardbento.catalog import ModelSpec

SCRAPE_PATH = "/metrics"


@dataclass(frozen=True, slots=True)
class KedaOptions:
    """What KEDA needs beyond the replica range. `prometheus_url` has no default: it is the cluster's
    own Prometheus (e.g. http://prometheus-operated.monitoring.svc:9090 under kube-prometheus-stack)."""

    prometheus_url: str
    waiting_per_replica: float = 5.0  # queued requests one replica may hold before another is added
    running_fraction: float = 0.8  # of limits.max_num_seqs: the batch fill a replica is held at
    polling_interval_s: int = 15
    scale_down_window_s: int = 300  # the highest recommendation of this window wins: no flapping
    namespace: str | None = None  # the queries then read only this namespace's pods

    def __post_init__(self) -> None:
        if not self.prometheus_url.startswith(("http://", "https://")):
            raise ValueError(f"prometheus_url {self.prometheus_url!r} must be an http(s) URL")
        if self.waiting_per_replica <= 0:
            raise ValueError(f"waiting_per_replica is {self.waiting_per_replica}; it must be above 0")
        if not 0 < self.running_fraction <= 1:
            raise ValueError(f"running_fraction is {self.running_fraction}; it must be in (0, 1]")
        if self.polling_interval_s < 1 or not 0 <= self.scale_down_window_s <= 3600:
            raise ValueError("polling_interval_s must be >= 1 and scale_down_window_s in 0..3600")


def queries(spec: ModelSpec, options: KedaOptions) -> dict[str, str]:
    """The PromQL each trigger reads: the model's gauge summed over its pods (0 before any scrape). Both
    engines export these gauges under the catalog name (the vLLM engine from vLLM's scheduler stats)."""
    labels = f'model_name="{spec.name}"'
    if options.namespace:
        labels += f',namespace="{options.namespace}"'
    return {
        name: f"sum(shardbento:num_requests_{name}{{{labels}}}) or vector(0)"
        for name in ("waiting", "running")
    }


def thresholds(spec: ModelSpec, options: KedaOptions) -> dict[str, str]:
    """Per-replica targets (KEDA's AverageValue: replicas = ceil(sum / target), the larger trigger wins)."""
    running = spec.limits.max_num_seqs * options.running_fraction
    return {"waiting": f"{options.waiting_per_replica:g}", "running": f"{running:g}"}


def scaled_object(
    spec: ModelSpec, name: str, labels: dict[str, str], replicas: int, max_replicas: int, options: KedaOptions
) -> dict[str, Any]:
    """The Deployment `name` scaled between `replicas` and `max_replicas` by KEDA on the queue."""
    if replicas < 1:
        raise ValueError(
            "KEDA scales between --replicas and --max-replicas; --replicas must be at least 1: "
            "a replica has to be up to queue the requests that would wake more"
        )
    server, targets = options.prometheus_url, thresholds(spec, options)
    triggers = [
        {
            "type": "prometheus",
            "name": metric,
            "metricType": "AverageValue",
            "metadata": {"serverAddress": server, "query": query, "threshold": targets[metric]},
        }
        for metric, query in queries(spec, options).items()
    ]
    behavior = {
        "scaleUp": {"stabilizationWindowSeconds": 0},
        # One replica at a time: a model server takes minutes to come back.
        "scaleDown": {
            "stabilizationWindowSeconds": options.scale_down_window_s,
            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
        },
    }
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicaCount": replicas,
            "maxReplicaCount": max_replicas,
            "pollingInterval": options.polling_interval_s,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": behavior}},
            "triggers": triggers,
        },
    }


def service_monitor(name: str, labels: dict[str, str], port_name: str, interval_s: int) -> dict[str, Any]:
    """The Prometheus operator's scrape of the Service's pods (each pod once: the queries sum them)."""
    endpoint = {"port": port_name, "path": SCRAPE_PATH, "interval": f"{interval_s}s"}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": name, "labels": labels},
        "spec": {"selector": {"matchLabels": labels}, "endpoints": [endpoint]},
    }


def scrape_annotations(port: int) -> dict[str, str]:
    """The annotations Prometheus' kubernetes-pods scrape job (its example config, the community
    Helm chart) reads to scrape a pod."""
    return {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": SCRAPE_PATH,
    }
