"""Client-library tests run only in their environment (.venv-clients, `make test-clients`)."""

from __future__ import annotations

from installed import client_libraries_installed

if not client_libraries_installed():
    collect_ignore_glob = ["test_*.py"]
