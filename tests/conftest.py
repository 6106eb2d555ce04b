"""Shared fixtures: generated tiny models, loaded engines, and real servers (one per session)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import Server, serve  # noqa: E402

SERVER_DIRS = ("e2e", "vllm", "clients")  # every test there starts a server or a subprocess


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests under tests/e2e and tests/vllm are `slow`: `make unit` (-m "not slow") skips them."""
    for item in items:
        if any(part in SERVER_DIRS for part in item.path.relative_to(Path(__file__).parent).parts[:1]):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


def process_engine(name: str) -> Iterator[Any]:
    """The catalog model's transformers engine as the service runs it: its own rank process."""
    from shardbento.catalog import load_spec
    from shardbento.engine import create_engine

    engine = create_engine(load_spec(name))
    try:
        yield engine
    finally:
        engine.close()


def loaded_model(name: str) -> Any:
    """The catalog model loaded in this process (weights placed as its plan says): the reference the
    engines are compared with, and what runner and scheduler tests drive directly."""
    from shardbento.catalog import load_spec
    from shardbento.engine.hf.loading import load_model
    from shardbento.plan.preflight import run_preflight

    spec = load_spec(name)
    return load_model(spec, run_preflight(spec))


@pytest.fixture(scope="session")
def text_engine() -> Iterator[Any]:
    yield from process_engine("tiny-llama")


@pytest.fixture(scope="session")
def vision_engine() -> Iterator[Any]:
    yield from process_engine("tiny-llava")


@pytest.fixture(scope="session")
def text_model() -> Any:
    return loaded_model("tiny-llama")


@pytest.fixture(scope="session")
def vision_model() -> Any:
    return loaded_model("tiny-llava")


@pytest.fixture(scope="session")
def mllama_model() -> Any:
    return loaded_model("tiny-mllama")


@pytest.fixture(scope="session")
def qwen_vl_model() -> Any:
    return loaded_model("tiny-qwen2.5-vl")


@pytest.fixture(scope="session")
def text_inprocess(text_model) -> Iterator[Any]:
    """tiny-llama's scheduler loop in this process (tests that look inside the scheduler)."""
    from inprocess import InProcessEngine

    engine = InProcessEngine(text_model)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def text_server(log_dir: Path) -> Iterator[Server]:
    """The default tiny text model behind a real `bentoml serve`."""
    with serve("tiny-llama", log_dir) as server:
        yield server


@pytest.fixture(scope="session")
def vision_server(log_dir: Path) -> Iterator[Server]:
    with serve("tiny-llava", log_dir) as server:
        yield server


@pytest.fixture(scope="session")
def guarded_server(log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Any]]:
    """tiny-llama with an API key, small limits and test-only fault injection (tests/reliability)."""
    from reliability.scenarios import guarded_catalog, guarded_config

    config = guarded_config()
    catalog = guarded_catalog(tmp_path_factory.mktemp("guarded-catalog"), config)
    with serve("tiny-llama", log_dir, env=config.env(catalog)) as server:
        yield server, config
