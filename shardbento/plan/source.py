"""Where a catalog model's checkpoint and config.json are: a path, a hub id, or a generated tiny model."""

from __future__ import annotations

from pathlib import Path

from shardbento.catalog import CATALOG_DIR, ModelSpec
from shardbento.plan.memory import PlanError

CONFIG_DIR = CATALOG_DIR / "configs"


def resolve_source(spec: ModelSpec) -> str:
    """A path or hub id for from_pretrained; generated models are built on first use."""
    if spec.is_generated:
        from shardbento.tiny.models import ensure_generated

        return str(ensure_generated(spec.recipe))
    return spec.source


def config_path(spec: ModelSpec) -> Path:
    """The config.json planning reads: the shipped copy for hub models, the generated one for tiny models."""
    shipped = CONFIG_DIR / f"{spec.name}.json"
    if shipped.is_file():
        return shipped
    if spec.is_generated:
        return Path(resolve_source(spec)) / "config.json"
    local = Path(spec.source) / "config.json"
    if local.is_file():
        return local
    raise PlanError(f"no config.json for {spec.name!r}: ship it as {shipped} to plan offline")
