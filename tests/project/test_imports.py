"""The shape of the code: imports run one way, and the light commands never load torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "pipelines", "serving")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every project module ``path`` imports, at the top or inside a function (a late import still counts)."""
    found = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and not name.startswith(_module_name(path) + ".__"):
                found.add(name)
    found.discard(_module_name(path))
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]
    known = {_module_name(p) for p in files}
    # A package's __init__ is imported with any of its modules; it is not a dependency of its own modules.
    return {_module_name(p): {m for m in _imports(p, known) if not _module_name(p).startswith(m + ".")} for p in files}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target] if target in stack else [node, target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_circle_in_the_packages() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import circles: " + "; ".join(" → ".join(c) for c in cycles)


def test_the_circle_check_sees_a_late_import(tmp_path: Path) -> None:
    graph = {"a": {"b"}, "b": {"a"}, "c": set()}
    assert _cycles(graph) == [["a", "b", "a"]]


def test_layers_import_one_way() -> None:
    graph = _graph()
    for module, targets in graph.items():
        if module.startswith("serving"):
            assert not {t for t in targets if t.startswith(("pipelines", "models"))}, module
        if module.startswith("models"):
            assert not {t for t in targets if t.startswith(("pipelines", "serving"))}, module
        if module == "pipelines.settings" or module.startswith("pipelines.settings."):
            # Settings import only each other, the errors, and the server's own config (whose defaults serve.* reads).
            outside = {t for t in targets if not t.startswith("pipelines.settings")}
            assert outside <= {"pipelines.errors", "serving", "serving.config", "serving.errors"}, (module, outside)


def _loaded_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint('loaded:' + ','.join(sorted(m for m in ('torch', 'mlflow', 'prefect', 'onnxruntime', 'bentoml') if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = [text for text in out.stdout.splitlines() if text.startswith("loaded:")][-1]
    return set(filter(None, line.removeprefix("loaded:").split(",")))


CLI = "from typer.testing import CliRunner\nfrom pipelines.cli import app\nr = CliRunner().invoke(app, {args!r})\nassert r.exit_code == 0, r.output"


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["ui", "--help"], ["run", "--help"],
                                  ["train", "--help"], ["export", "--help"], ["status", "--help"]])
def test_help_never_imports_torch_or_the_heavy_stack(args: list[str]) -> None:
    assert _loaded_after(CLI.format(args=args)) == set()


def test_serving_and_the_settings_import_without_torch() -> None:
    assert "torch" not in _loaded_after("import serving, serving.contract, serving.reload, serving.images")
    assert _loaded_after("import pipelines.settings") == set()
    assert "torch" not in _loaded_after(
        "import pipelines.registry.store, pipelines.registry.publish, pipelines.registry.aliases, pipelines.identity, pipelines.retry"
    )
