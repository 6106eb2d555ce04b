"""The package's layout rules: what may import torch, which way imports point, no cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "shardbento"
HEAVY = ("torch", "transformers", "accelerate", "vllm")
LEAVES = ("catalog", "errors", "settings", "logs", "metrics", "toolcalls", "textmatch", "reasoning", "lora")
# package -> the shardbento packages it must not import (anywhere in its modules, lazily included)
FORBIDDEN = {
    "plan": ("api", "engine", "deploy", "bench"),
    "api": ("plan", "deploy", "bench", "tiny"),
    "engine": ("api", "deploy", "bench"),
    "deploy": ("api", "engine", "bench"),
    "bench": ("api", "engine", "plan", "deploy"),
}
ALLOWED_ENGINE_FOR_API = ("shardbento.engine.base",)  # the HTTP layer sees engines through this only


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path) -> set[str]:
    """Every shardbento module a file imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n == "shardbento" or n.startswith("shardbento.")}


def _light_modules() -> list[str]:
    skipped = ("shardbento.engine", "shardbento.tiny", "shardbento.__main__")  # __main__ runs the CLI
    return [m for m in _modules() if not m.startswith(skipped)]


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {heavy!r}:
            raise ImportError(f"blocked: {{name}}")
sys.meta_path.insert(0, Block())
import importlib
for name in {modules!r}:
    importlib.import_module(name)
"""


@pytest.mark.slow  # a subprocess
def test_layout_modules_outside_engine_import_without_torch() -> None:
    code = BLOCKER.format(heavy=HEAVY, modules=_light_modules())
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_layout_has_no_import_cycles() -> None:
    modules = _modules()
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*trail[trail.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("leaf", LEAVES)
def test_layout_leaves_import_no_subpackage(leaf: str) -> None:
    imported = _imports(PACKAGE / f"{leaf}.py")
    assert all(name.count(".") == 1 and name.split(".")[1] in LEAVES for name in imported), imported


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layout_imports_point_one_way(package: str) -> None:
    wrong = []
    for module, path in _modules().items():
        if not module.startswith(f"shardbento.{package}"):
            continue
        for name in _imports(path):
            target = name.split(".")[1] if "." in name else ""
            if target in FORBIDDEN[package] and not (package == "api" and name in ALLOWED_ENGINE_FOR_API):
                wrong.append(f"{module} imports {name}")
    assert not wrong, wrong


def test_layout_api_sees_engines_only_through_base() -> None:
    wrong = [
        f"{module} imports {name}"
        for module, path in _modules().items()
        if module.startswith("shardbento.api")
        for name in _imports(path)
        if name.startswith("shardbento.engine") and name not in ALLOWED_ENGINE_FOR_API
    ]
    assert not wrong, wrong


def test_layout_files_stay_small() -> None:
    root = PACKAGE.parent
    sizes = {p: len(p.read_text().splitlines()) for p in root.glob("**/*.py") if ".venv" not in str(p)}
    assert not {str(p): n for p, n in sizes.items() if n > 400}
    assert sizes[root / "service.py"] <= 200
