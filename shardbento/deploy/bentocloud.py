"""BentoCloud deployment configs (`bentoml deploy -f FILE`), one per model, checked with BentoML's schema."""

from __future__ import annotations

from typing import Any

import yaml

from shardbento.catalog import ModelSpec
from shardbento.deploy.bento import bento_labels, bento_name

SERVICE = "shardbento"  # the entry service name in service.py
# Cold starts load weights: seconds per GPU of model, with a floor for the tiny CPU models.
COLD_START_S_PER_GPU = 900
COLD_START_S_CPU = 300


class DeploymentConfigError(ValueError):
    """A config BentoML's deployment schema rejects or would silently drop parts of."""


def deployment_config(spec: ModelSpec, bento: str | None = None, max_replicas: int = 2) -> dict[str, Any]:
    """The config for `bentoml deploy -f`; BentoCloud picks the instance type from the Bento's resources."""
    service = {
        "scaling": {"min_replicas": 1, "max_replicas": max_replicas},
        "cold_start_timeout": COLD_START_S_PER_GPU * spec.gpus if spec.gpus else COLD_START_S_CPU,
    }
    labels = [{"key": key, "value": value} for key, value in bento_labels(spec).items()]
    config = {
        "name": bento_name(spec).replace(".", "-"),
        "bento": bento or f"{bento_name(spec)}:latest",
        "access_authorization": True,
        "labels": labels,
        "services": {SERVICE: service},
    }
    validate(config)
    return config


def validate(config: dict[str, Any]) -> Any:
    """Structure `config` as BentoML's CreateDeploymentSchema, as `bentoml deploy` does.

    BentoML ignores unknown keys, so the config must also survive the round trip unchanged.
    """
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
    from bentoml._internal.utils.cattr import bentoml_cattr

    try:
        struct = bentoml_cattr.structure(config, CreateDeploymentSchema)
    except Exception as exc:
        raise DeploymentConfigError(f"not a BentoCloud deployment config: {exc}") from exc
    back = bentoml_cattr.unstructure(struct)
    dropped = _dropped_keys(config, back)
    if dropped:
        raise DeploymentConfigError(
            f"keys BentoCloud does not know (they would be ignored): {', '.join(dropped)}"
        )
    return struct


def _dropped_keys(given: Any, kept: Any, path: str = "") -> list[str]:
    if kept is _MISSING:
        return [path.rstrip(".")]
    if isinstance(given, dict):
        kept = kept if isinstance(kept, dict) else {}
        return [d for k, v in given.items() for d in _dropped_keys(v, kept.get(k, _MISSING), f"{path}{k}.")]
    if isinstance(given, list) and isinstance(kept, list):
        return [d for g, k in zip(given, kept, strict=False) for d in _dropped_keys(g, k, path)]
    return []


_MISSING = object()


def to_yaml(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)
