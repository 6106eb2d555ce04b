"""Kubernetes manifests derived from a catalog spec: Deployment, Service, and an autoscaler (KEDA on the
queue, or an HPA on CPU)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from shardbento.catalog import ModelSpec
from shardbento.deploy.crd import load_crds, validate_custom
from shardbento.deploy.keda import KedaOptions, scaled_object, scrape_annotations, service_monitor

PORT = 3000
KUBERNETES_VERSION = "1.32.0"  # the oldest release still in upstream support when this was written
CACHE_PATH = "/home/bentoml/.cache"
BENTO_GID = 1034
# Weight loading dominates startup: allow ~40 min for the largest entries before the kubelet restarts the pod.
STARTUP_PERIOD_S = 10
STARTUP_FAILURES_PER_GPU = 60
STARTUP_FAILURES_CPU = 30
# NCCL all-reduce between GPU ranks goes through /dev/shm; Docker's default 64 MiB makes it fail or hang.
SHM_GIB_PER_GPU = 8
SHM_GIB_CPU = 1


@dataclass(frozen=True, slots=True)
class K8sOptions:
    image: str | None = None
    replicas: int = 1
    max_replicas: int = 0  # above `replicas`, the autoscaler scales up to this many
    autoscaler: Literal["keda", "cpu"] = "keda"  # KEDA on the queue (needs `keda`), or an HPA on CPU
    keda: KedaOptions | None = None
    scrape: Literal["annotations", "service-monitor"] = "annotations"  # how Prometheus finds /metrics
    namespace: str | None = None  # set on every object (else kubectl's namespace)
    cache_size_gib: int = 0  # 0: an emptyDir; N: a PersistentVolumeClaim of N GiB


def app_name(spec: ModelSpec) -> str:
    return f"shardbento-{spec.name}".replace(".", "-")


def _labels(spec: ModelSpec) -> dict[str, str]:
    return {"app.kubernetes.io/name": app_name(spec), "shardbento/model": spec.name.replace(".", "-")}


def _resources(spec: ModelSpec) -> dict[str, Any]:
    if spec.gpus == 0:
        return {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "8Gi"}}
    gpus = str(spec.gpus)
    return {
        "requests": {"cpu": str(4 * spec.gpus), "memory": f"{32 * spec.gpus}Gi", "nvidia.com/gpu": gpus},
        "limits": {"nvidia.com/gpu": gpus},
    }


def _probe(path: str, period_s: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": PORT}, "periodSeconds": period_s, "failureThreshold": failures}


def _env(spec: ModelSpec) -> list[dict[str, str]]:
    env = [
        {"name": "SHARDBENTO_CACHE", "value": f"{CACHE_PATH}/shardbento"},
        {"name": "HF_HOME", "value": f"{CACHE_PATH}/huggingface"},
    ]
    if spec.gpus > 1:
        # Ranks share one pod: NCCL over shared memory and NVLink/PCIe; no InfiniBand inside the pod.
        env += [{"name": "NCCL_IB_DISABLE", "value": "1"}, {"name": "NCCL_DEBUG", "value": "WARN"}]
    return env


def _container(spec: ModelSpec, image: str) -> dict[str, Any]:
    failures = STARTUP_FAILURES_PER_GPU * spec.gpus if spec.gpus else STARTUP_FAILURES_CPU
    return {
        "name": "shardbento",
        "image": image,
        "args": ["serve"],
        "ports": [{"name": "http", "containerPort": PORT}],
        "env": _env(spec),
        "resources": _resources(spec),
        "startupProbe": _probe("/readyz", STARTUP_PERIOD_S, failures),
        "readinessProbe": _probe("/readyz", 5, 3),
        "livenessProbe": _probe("/livez", 10, 3),
        "volumeMounts": [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "cache", "mountPath": CACHE_PATH},
        ],
    }


def _volumes(spec: ModelSpec, options: K8sOptions) -> list[dict[str, Any]]:
    shm_gib = SHM_GIB_PER_GPU * spec.gpus if spec.gpus else SHM_GIB_CPU
    cache: dict[str, Any] = {"emptyDir": {}}
    if options.cache_size_gib:
        cache = {"persistentVolumeClaim": {"claimName": f"{app_name(spec)}-cache"}}
    return [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gib}Gi"}},
        {"name": "cache", **cache},
    ]


def deployment(spec: ModelSpec, options: K8sOptions) -> dict[str, Any]:
    labels = _labels(spec)
    pod: dict[str, Any] = {
        "containers": [_container(spec, options.image or f"{app_name(spec)}:latest")],
        "volumes": _volumes(spec, options),
        # BentoML images run as user bentoml (uid/gid 1034): a claimed cache volume must be writable by it.
        "securityContext": {"fsGroup": BENTO_GID},
    }
    if spec.gpu_type:
        pod["nodeSelector"] = {"shardbento/gpu-type": spec.gpu_type}
    template: dict[str, Any] = {"labels": labels}
    if options.scrape == "annotations":
        template["annotations"] = scrape_annotations(PORT)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": app_name(spec), "labels": labels},
        "spec": {
            "replicas": options.replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": template, "spec": pod},
        },
    }


def service(spec: ModelSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": app_name(spec), "labels": _labels(spec)},
        "spec": {"selector": _labels(spec), "ports": [{"name": "http", "port": 80, "targetPort": PORT}]},
    }


def autoscaler(spec: ModelSpec, options: K8sOptions) -> dict[str, Any]:
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": app_name(spec)}
    metric = {
        "type": "Resource",
        "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}},
    }
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": app_name(spec), "labels": _labels(spec)},
        "spec": {
            "scaleTargetRef": target,
            "minReplicas": options.replicas,
            "maxReplicas": options.max_replicas,
            "metrics": [metric],
        },
    }


def cache_claim(spec: ModelSpec, options: K8sOptions) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": f"{app_name(spec)}-cache", "labels": _labels(spec)},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": f"{options.cache_size_gib}Gi"}},
        },
    }


def manifests(spec: ModelSpec, options: K8sOptions | None = None) -> list[dict[str, Any]]:
    """Every object one model needs, in apply order."""
    options = options or K8sOptions()
    if options.max_replicas and options.max_replicas < options.replicas:
        raise ValueError(f"max_replicas {options.max_replicas} is below replicas {options.replicas}")
    objects = [cache_claim(spec, options)] if options.cache_size_gib else []
    objects += [deployment(spec, options), service(spec)]
    if options.scrape == "service-monitor":
        interval_s = options.keda.polling_interval_s if options.keda else 15
        objects.append(service_monitor(app_name(spec), _labels(spec), "http", interval_s))
    if options.max_replicas > options.replicas:
        objects.append(_autoscaler(spec, options))
    if options.namespace:
        for obj in objects:
            obj["metadata"]["namespace"] = options.namespace
    return objects


def _autoscaler(spec: ModelSpec, options: K8sOptions) -> dict[str, Any]:
    if options.autoscaler == "cpu":
        return autoscaler(spec, options)
    if options.keda is None:
        raise ValueError(
            "KEDA autoscaling needs the Prometheus server it queries: --prometheus-url "
            "(or --autoscaler cpu for an HPA on CPU utilisation)"
        )
    name, labels = app_name(spec), _labels(spec)
    return scaled_object(spec, name, labels, options.replicas, options.max_replicas, options.keda)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)


def validate(
    objects: list[dict[str, Any]],
    kubernetes_version: str = KUBERNETES_VERSION,
    crd_files: Iterable[str | Path] = (),
) -> None:
    """Check every object against the Kubernetes JSON schemas, custom resources against their CRD
    files (strict: unknown fields are errors; a kind with no schema is an error too)."""
    import kubernetes_validate

    crds = load_crds(crd_files)
    for obj in objects:
        if (obj.get("apiVersion"), obj.get("kind")) in crds:
            validate_custom(obj, crds)
        else:
            kubernetes_validate.validate(obj, kubernetes_version, strict=True)
