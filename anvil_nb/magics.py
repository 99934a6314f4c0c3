"""``%%callable`` and ``%anvil``: the notebook's way into anvil_nb.

``%%callable`` runs its cell like any other cell (same namespace, the user's traceback if it
raises), then registers each top-level function as a server function and each top-level class as
a portable class. Registrations belong to the cell: re-running it replaces them, and a function
removed from the cell is unregistered. A cell that raises registers nothing.

``%anvil status [--server-key]``, ``%anvil connect URL KEY`` and ``%anvil dashboard`` look at
and steer the kernel's connection (see :mod:`anvil_nb.kernel`).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from anvil_nb import kernel, portable
from anvil_nb.client import functions

__all__ = ["AnvilMagics", "load", "unload"]


@dataclass
class _CellRegistrations:
    functions: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)


def top_level_definitions(source: str) -> tuple[list[str], list[str]]:
    """The names of the functions and classes a cell defines at top level."""
    tree = ast.parse(source)
    fns = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    return fns, classes


@magics_class
class AnvilMagics(Magics):
    """The magics of anvil_nb."""

    def __init__(self, shell: Any):
        super().__init__(shell)
        self._cells: dict[Any, _CellRegistrations] = {}
        self._cell_id: str | None = None
        shell.events.register("pre_run_cell", self._pre_run_cell)

    def _pre_run_cell(self, info: Any = None) -> None:
        self._cell_id = getattr(info, "cell_id", None)

    @magic_arguments()
    @argument("--name", help="register the cell's single function under this name")
    @argument("--require-user", action="store_true", help="refuse calls when no user is logged in")
    @cell_magic
    def callable(self, line: str, cell: str) -> None:
        """Run the cell, then serve its functions and make its classes portable."""
        __tracebackhide__ = True  # the user's traceback, not ours
        args = parse_argstring(self.callable, line)
        filename = self.shell.compile.cache(cell, self.shell.execution_count)
        code = self.shell.compile(cell, filename, "exec")  # a SyntaxError names the cell
        fns, classes = top_level_definitions(cell)
        if args.name and len(fns) != 1:
            raise UsageError(
                f"%%callable --name needs exactly one function in the cell; it defines {len(fns)}"
            )
        exec(code, self.shell.user_ns)
        self._register(
            fns,
            classes,
            args.name,
            bool(args.require_user),
            cell_key=self._cell_id or (args.name, *fns, *classes),
        )

    def _register(
        self,
        fns: list[str],
        classes: list[str],
        name: str | None,
        require_user: bool,
        cell_key: Any,
    ) -> None:
        ns = self.shell.user_ns
        now = _CellRegistrations()
        for cls_name in classes:
            cls = ns[cls_name]
            portable.portable_class(cls)
            now.classes.append(portable.name_of_class(cls) or cls_name)
        for fn_name in fns:
            registered = name or fn_name
            functions.register(registered, ns[fn_name], require_user=require_user or None)
            now.functions.append(registered)
        before = self._cells.get(cell_key)
        if before is not None:
            for gone in set(before.functions) - set(now.functions):
                functions.unregister(gone)
            for gone in set(before.classes) - set(now.classes):
                portable.unregister(gone)
        self._cells[cell_key] = now

    @magic_arguments()
    @argument("command", nargs="?", default="status", choices=["status", "connect", "dashboard"])
    @argument("args", nargs="*", help="for connect: URL KEY")
    @argument("--server-key", action="store_true", help="status: show the server key too")
    @line_magic
    def anvil(self, line: str) -> Any:
        """``%anvil status [--server-key]`` | ``%anvil connect URL KEY`` | ``%anvil dashboard``."""
        args = parse_argstring(self.anvil, line)
        if args.command == "status":
            print(kernel.format_status(show_server_key=args.server_key))
            return None
        if args.command == "connect":
            if len(args.args) != 2:
                raise UsageError("usage: %anvil connect URL KEY")
            kernel.join(*args.args)
            print(kernel.format_status())
            return None
        try:
            from anvil_nb.widgets import dashboard  # noqa: PLC0415
        except ImportError as exc:
            raise UsageError(
                "%anvil dashboard needs anvil_nb.widgets, which this version does not have yet"
            ) from exc
        return dashboard()


def load(ipython: Any) -> None:
    """Join a host and register the magics (``%load_ext anvil_nb``)."""
    kernel.join()
    ipython.register_magics(AnvilMagics(ipython))


def unload(ipython: Any) -> None:  # noqa: ARG001
    """Leave the host (``%unload_ext anvil_nb``)."""
    kernel.leave()
