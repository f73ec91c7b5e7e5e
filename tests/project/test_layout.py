"""The rooms keep their shape: short modules and functions, serving apart, tracking set up in one place.

Import circles and the layers' directions are tests/project/test_imports.py's.

Read from the source with ``ast`` (nothing is imported), so a breach names the file, the
line and the number, whatever else is broken.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROOMS = ("models", "pipelines", "serving")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    found = {}
    for room in ROOMS:
        for path in sorted((ROOT / room).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


MODULES = _modules()


def test_no_module_is_over_the_limit() -> None:
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_over_the_limit() -> None:
    long = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize("forbidden", ["pipelines", "torch"])
def test_serving_never_imports_the_pipelines_or_torch(forbidden: str) -> None:
    offenders = []
    for name, path in MODULES.items():
        if not name.startswith("serving"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            offenders += [f"{name}: {m}" for m in modules if m == forbidden or m.startswith(forbidden + ".")]
    assert not offenders


def test_tracking_is_configured_in_one_place() -> None:
    """``configure_mlflow`` runs once per command or flow run, from the run context, nowhere else."""
    callers = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "configure_mlflow":
                callers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert len(callers) == 1, callers
