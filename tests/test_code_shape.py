"""The library's functions stay short enough to read: one over 60 lines says why in a ``# long:`` comment
among its first lines (after the docstring)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 60
WHY = "# long:"


def long_functions_without_a_reason(package: Path) -> list[str]:
    """``path:line name (n lines)`` of every function in ``package`` over :data:`LIMIT` lines whose first
    lines (up to 12 after the start of its body) hold no ``# long:`` comment."""
    found = []
    for path in sorted(package.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            if length <= LIMIT:
                continue
            body = node.body[1:] if ast.get_docstring(node) is not None and len(node.body) > 1 else node.body
            start = body[0].lineno - 1
            head = lines[start - 3: start + 12]
            if not any(line.strip().startswith(WHY) for line in head):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_long_function_without_a_reason():
    assert long_functions_without_a_reason(ROOT / "flowrl") == []


def test_the_check_finds_a_long_function_and_accepts_a_reason(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT))
    (tmp_path / "bad.py").write_text(f"def long_one():\n    \"\"\"Doc.\"\"\"\n{body}\n")
    (tmp_path / "good.py").write_text(f"def long_two():\n    \"\"\"Doc.\"\"\"\n    # long: a table of cases\n{body}\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert long_functions_without_a_reason(tmp_path) == ["bad.py:1 long_one (62 lines)"]
    finally:
        ROOT = saved
