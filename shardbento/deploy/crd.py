"""Custom resources (KEDA's ScaledObject, the Prometheus operator's ServiceMonitor) checked against their
CustomResourceDefinition files' OpenAPI schemas, strictly: unknown fields are errors."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

CrdSchemas = dict[tuple[str, str], dict[str, Any]]  # (apiVersion, kind) -> openAPIV3Schema


def load_crds(paths: Iterable[str | Path]) -> CrdSchemas:
    """Every served version's schema in the CRD files."""
    schemas: CrdSchemas = {}
    for path in paths:
        for crd in yaml.safe_load_all(Path(path).read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                raise ValueError(f"{path}: not a CustomResourceDefinition")
            spec = crd["spec"]
            for version in spec["versions"]:
                key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                schemas[key] = strict(version["schema"]["openAPIV3Schema"])
    return schemas


def strict(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that lists its properties, as the
    API server's strict field validation (`kubectl apply --validate=strict`) rejects unknown fields."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: strict(value) for key, value in schema.items() if key != "properties"}
    if isinstance(schema.get("properties"), dict):
        result["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        open_fields = schema.get("x-kubernetes-preserve-unknown-fields", False)
        if "additionalProperties" not in schema and not open_fields:
            result["additionalProperties"] = False
    return result


def validate_custom(obj: dict[str, Any], schemas: CrdSchemas) -> None:
    """Raise jsonschema's ValidationError where `obj` breaks its CRD's schema. The CRDs' CEL rules
    (x-kubernetes-validations) are not evaluated: the builders keep them (min <= max replicas)."""
    import jsonschema

    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    if key not in schemas:
        raise KeyError(f"no CRD given for {key[1]} {key[0]}")
    jsonschema.Draft202012Validator(schemas[key]).validate(obj)
