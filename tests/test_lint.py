"""The code base stays ruff clean (checked as part of the test suite)."""

import subprocess
import sys
from pathlib import Path


def test_ruff_clean():
    """`ruff check` reports nothing on the package and the tests."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "distlocal", "tests"], cwd=root,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _imports(root: Path) -> dict[str, set[str]]:
    """Each distlocal module's imports of other distlocal modules, deferred ones (inside functions) included."""
    import ast

    modules = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (root / "distlocal").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_no_import_circles():
    """No distlocal module imports, even late, a module that imports it back (directly or through others)."""
    graph = _imports(Path(__file__).resolve().parents[1])

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            module = todo.pop()
            if module == goal:
                return True
            if module not in seen:
                seen.add(module)
                todo += graph[module]
        return False

    circles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if reaches(b, a)})
    assert not circles, f"import circles through: {circles}"
