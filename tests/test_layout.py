"""The package's floors (docs/architecture.md): who may import whom, checked on the source.

``core`` is the ground floor (no I/O: no tornado, no sockets, nothing above it); ``host`` and
``client`` stand on it and never import each other; ``web`` puts the host on the network;
``runtime`` joins a process's client to a host; ``jupyter``, ``widgets``, ``cli`` and the faces
(``server``, ``media``) stand on those. Every import counts, lazy ones inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import anvil_nb

PACKAGE = Path(anvil_nb.__file__).parent

#: floor -> the floors (and third-party roots) its modules may import.
ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "config": {"core"},
    "host": {"core", "config", "host"},
    "client": {"core", "config", "client", "websockets"},
    "web": {"core", "config", "host", "web", "tornado"},
    "runtime": {"core", "config", "host", "client"},
    "media": {"core"},
    "server": {"core", "config", "client", "runtime"},
    "users": {"core", "server"},
    "widgets": {"core", "config", "client", "runtime", "widgets", "ipywidgets"},
    "jupyter": {
        "core",
        "config",
        "host",
        "client",
        "web",
        "runtime",
        "jupyter",
        "widgets",
        "tornado",
        "jupyter_server",
        "IPython",
    },  # fmt: skip
    "cli": {"core", "config", "host", "web", "tornado"},
    "__init__": {"jupyter"},
    "__main__": {"cli"},
}
#: Third-party packages that only some floors may load (everything else is the stdlib or
#: a small pure library such as orjson).
GUARDED = {"tornado", "websockets", "jupyter_server", "IPython", "ipywidgets"}


def floor(module: Path) -> str:
    rel = module.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def imported(module: Path) -> set[str]:
    """The floors of anvil_nb and the guarded packages that *module* imports."""
    found = set()
    for node in ast.walk(ast.parse(module.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "anvil_nb":
                names = [f"anvil_nb.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "anvil_nb" and len(parts) > 1:
                found.add(parts[1])
            elif parts[0] in GUARDED:
                found.add(parts[0])
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_the_floors_below_it(module):
    own = floor(module)
    assert own in ALLOWED, f"{module} is on no known floor: add it to docs/architecture.md"
    wrong = imported(module) - ALLOWED[own] - {own}
    assert not wrong, f"{module.relative_to(PACKAGE)} ({own}) imports {sorted(wrong)}"


def test_the_checker_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f():\n    from anvil_nb.host.dispatcher import Host\n    import tornado.web\n"
    )
    assert imported(bad) == {"host", "tornado"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def edges(path: Path, known: set[str]) -> set[str]:
    """The anvil_nb modules *path* imports (lazy imports too; ``TYPE_CHECKING`` blocks not)."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in known else node.module)
    return {m for m in out if m in known}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of *graph* (``[a, b, ..., a]``), or None when it has none."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_of_the_package_imports_itself_in_a_circle():
    known = {module_name(p) for p in MODULES}
    cycle = find_cycle({module_name(p): edges(p, known) for p in MODULES})
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_lazy_cycle(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from anvil_nb import server\n")
    assert edges(a, {"anvil_nb.server"}) == {"anvil_nb.server"}
    graph = {"m": {"s"}, "s": {"r"}, "r": {"m"}, "x": set()}
    assert find_cycle(graph) == ["m", "s", "r", "m"]
    assert find_cycle({"m": {"s"}, "s": set()}) is None
