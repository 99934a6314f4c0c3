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
    "client": {"core", "config", "client", "tornado"},
    "web": {"core", "config", "host", "web", "tornado"},
    "runtime": {"core", "config", "host", "client"},
    "media": {"core"},
    "server": {"core", "config", "client", "runtime", "jupyter", "web"},
    "widgets": {"core", "config", "client", "runtime", "widgets", "jupyter", "ipywidgets"},
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
GUARDED = {"tornado", "jupyter_server", "IPython", "ipywidgets"}


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
