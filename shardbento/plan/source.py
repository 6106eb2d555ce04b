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


def is_thudm_spec(spec: ModelSpec) -> bool:
    """Whether the spec's checkpoint is in THUDM's ChatGLM layout (decided from its config.json)."""
    from shardbento.plan.memory import load_config
    from shardbento.thudm.layout import is_thudm

    try:
        return is_thudm(load_config(config_path(spec)))
    except PlanError:
        return False


def checkpoint_path(spec: ModelSpec) -> str:
    """What the transformers engine loads: the source, or for a THUDM-layout checkpoint its native GLM
    conversion (config, tokenizer, weights; built once into the cache)."""
    return _native(spec, "checkpoint")


def tokenizer_path(spec: ModelSpec) -> str:
    """Where the tokenizer comes from: the source, or a THUDM checkpoint's converted fast tokenizer."""
    return _native(spec, "tokenizer")


def _native(spec: ModelSpec, part: str) -> str:
    source = resolve_source(spec)
    if not is_thudm_spec(spec):
        return source
    from shardbento.thudm.convert import local_checkpoint, native_checkpoint, native_tokenizer

    convert = native_checkpoint if part == "checkpoint" else native_tokenizer
    return str(convert(local_checkpoint(source, spec.revision)))
