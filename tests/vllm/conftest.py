"""vLLM tests run only in the vLLM environment (.venv-vllm, `make test-vllm`); elsewhere they are skipped."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from installed import vllm_installed  # noqa: E402
from vllm_helpers import VLLM_CPU_ENV  # noqa: E402

# Distributions, not find_spec: tests/ on sys.path makes this directory a "vllm" namespace package.
if not vllm_installed():
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session", autouse=True)
def vllm_cpu_env() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in VLLM_CPU_ENV}
    os.environ.update({k: os.environ.get(k) or v for k, v in VLLM_CPU_ENV.items()})
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop per module: AsyncLLM binds its output handler to the first loop it runs on.

    An engine closed while its loop is idle schedules the closing of its ZMQ sockets on that loop; the
    loop runs once more before it closes (as asyncio.run ends), else the sockets stay open and the
    garbage-collected ZMQ context waits for them forever when pytest exits."""
    loop = asyncio.new_event_loop()
    yield loop
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()
