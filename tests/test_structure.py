"""The package's shape: imports only point down (no cycles), and every module is small
and says its one job in an opening docstring."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted((ROOT / "saelab").glob("*.py")) + sorted((ROOT / "hydra_plugins").rglob("*.py"))
MAX_LINES = 400


def _name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path, known: set[str]) -> set[str]:
    """saelab modules that ``path`` imports, at any depth (function-level imports too).
    ``import saelab`` (the package, for the OpenBLAS preload) is not an edge: its lazy
    ``__getattr__`` imports run only on attribute access."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in known:
                out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names} & known
    return out - {"saelab"}


def _graph() -> dict[str, set[str]]:
    known = {_name(p) for p in MODULES}
    return {_name(p): _imports(p, known) - {_name(p)} for p in MODULES
            if _name(p) != "saelab"}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, [" -> ".join(c) for c in cycles]
    assert graph["saelab.config"] == set() or graph["saelab.config"] <= {"saelab.paths"}
    assert "saelab.cli" not in {m for deps in graph.values() for m in deps}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_is_small_and_says_its_job(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines; allowed: at most {MAX_LINES}"
    if path.name != "__init__.py" or path.parent.name == "saelab":
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path.name}: no docstring"
