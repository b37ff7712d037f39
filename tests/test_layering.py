"""Imports go one way: flowrl <- tasks <- pipelines (docs/design.md, Layers)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_never_imports_flyte_tasks_or_pipelines():
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imports(p) & {"flytekit", "flytekitplugins", "tasks", "pipelines"})
        for p in (ROOT / "flowrl").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_tasks_never_import_pipelines():
    offenders = [str(p) for p in (ROOT / "tasks").rglob("*.py") if "pipelines" in _imports(p)]
    assert offenders == []


def test_importing_the_library_does_not_load_flytekit():
    code = "import sys, flowrl.cli, flowrl.stages.base; assert 'flytekit' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_pipelines_only_wire_tasks():
    """A workflow module holds imports and @workflow functions whose bodies are calls."""
    for path in (ROOT / "pipelines").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                # @workflow, or @workflow(...) with options such as its failure handler
                called = [d.func if isinstance(d, ast.Call) else d for d in node.decorator_list]
                decorators = {getattr(d, "id", getattr(d, "attr", "")) for d in called}
                assert "workflow" in decorators, f"{path.name}: {node.name} is not a @workflow"
                for stmt in node.body:
                    allowed = (ast.Assign, ast.Return, ast.Expr)
                    assert isinstance(stmt, allowed), f"{path.name}:{stmt.lineno}: logic in a workflow body"
