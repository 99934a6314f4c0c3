"""``%%callable`` and ``%anvil``: the notebook's way into anvil_nb.

``%%callable`` runs its cell like any other cell (same namespace, the user's traceback if it
raises), then registers each top-level function as a server function and each top-level class as
a portable class. Registrations belong to the cell: re-running it replaces them, and a function
removed from the cell is unregistered. A cell that raises registers nothing.

``%anvil status [--server-key]``, ``%anvil connect URL KEY`` and ``%anvil dashboard`` look at
and steer the kernel's connection (see :mod:`anvil_nb.jupyter.kernel`); ``%anvil tasks`` prints
the app's background tasks, one line each.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from anvil_nb.client.client import functions
from anvil_nb.core import portable
from anvil_nb.core.errors import AnvilError
from anvil_nb.jupyter import kernel

__all__ = ["AnvilMagics", "load", "unload"]


@dataclass
class _CellRegistrations:
    functions: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)


def top_level_definitions(tree: ast.Module) -> tuple[list[str], list[str]]:
    """The names of the functions and classes a cell defines at top level."""
    fns = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    return fns, classes


@magics_class
class AnvilMagics(Magics):
    """The magics of anvil_nb."""

    def __init__(self, shell: Any):
        super().__init__(shell)
        self._cells: dict[Any, _CellRegistrations] = {}
        self._owner: dict[str, Any] = {}  # name -> the cell that registered it last
        self._cell_id: str | None = None
        shell.events.register("pre_run_cell", self._pre_run_cell)

    def _pre_run_cell(self, info: Any = None) -> None:
        self._cell_id = getattr(info, "cell_id", None)

    @magic_arguments()
    @argument("--name", help="register the cell's single function under this name")
    @argument("--require-user", action="store_true", help="refuse calls when no user is logged in")
    @cell_magic
    def callable(self, line: str, cell: str) -> Any:
        """Run the cell, then serve its functions and make its classes portable."""
        __tracebackhide__ = True  # the user's traceback, not ours
        args = parse_argstring(self.callable, line)
        filename = self.shell.compile.cache(cell, self._cell_number())
        try:
            tree = compile(cell, filename, "exec", ast.PyCF_ONLY_AST)
        except SyntaxError as exc:
            raise exc.with_traceback(None) from None  # shown like a normal cell's
        fns, classes = top_level_definitions(tree)
        if args.name and len(fns) != 1:
            raise UsageError(
                f"%%callable --name needs exactly one function in the cell; it defines {len(fns)}"
            )
        # Like a normal cell, the value of a last expression is the cell's output.
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        ns = self.shell.user_ns
        exec(self.shell.compile(tree, filename, "exec"), ns)
        value = None
        if last is not None:
            value = eval(self.shell.compile(ast.Expression(last.value), filename, "eval"), ns)
        key = self._cell_id or (args.name, *fns, *classes)
        self._register(fns, classes, args.name, bool(args.require_user), key)
        kernel.report_classes()
        for name, others in kernel.shared_names([args.name] if args.name else fns).items():
            print(
                f"anvil_nb: {name!r} is also provided by {', '.join(others)} in this app: "
                "calls to it are shared in turn (%anvil app NAME moves this kernel to its own app)"
            )
        return value

    def _cell_number(self) -> int:
        """The number of the running cell (IPython versions differ in when they count)."""
        history = getattr(self.shell, "history_manager", None)
        if history is not None and history.input_hist_raw:
            return len(history.input_hist_raw) - 1
        return self.shell.execution_count

    def _register(
        self, fns: list[str], classes: list[str], name: str | None, require_user: bool, key: Any
    ) -> None:
        ns = self.shell.user_ns
        now = _CellRegistrations()
        for cls_name in classes:
            cls = ns[cls_name]
            if portable.name_of_class(cls) is None:  # an explicit @portable_class name wins
                portable.portable_class(cls)
            now.classes.append(portable.name_of_class(cls) or cls_name)
        now.functions.extend(self._register_functions(fns, name, require_user))
        before = self._cells.get(key)
        if before is not None:
            # Withdraw what this cell no longer defines, unless another cell has taken it over.
            for gone in set(before.functions) - set(now.functions):
                if self._owner.get(gone) == key:
                    functions.unregister(gone)
                    del self._owner[gone]
            for gone in set(before.classes) - set(now.classes):
                if self._owner.get(gone) == key:
                    portable.unregister(gone)
                    del self._owner[gone]
        for registered in (*now.functions, *now.classes):
            self._owner[registered] = key
        self._cells[key] = now

    def _register_functions(
        self, fns: list[str], name: str | None, require_user: bool
    ) -> list[str]:
        """Serve the cell's functions; the names they are served under."""
        ns = self.shell.user_ns
        names: list[str] = []
        for fn_name in fns:
            marked = getattr(ns[fn_name], "_anvil_nb_names", None)
            if marked and not name:  # a decorator registered it (@server.http_endpoint, ...)
                names.extend(n for n in marked if functions.get(n) is not None)
                continue
            registered = name or fn_name
            functions.register(registered, ns[fn_name], require_user=require_user or None)
            names.append(registered)
        return names

    @magic_arguments()
    @argument(
        "command",
        nargs="?",
        default="status",
        choices=["status", "connect", "app", "dashboard", "tasks"],
    )
    @argument("args", nargs="*", help="for connect: URL KEY; for app: NAME")
    @argument("--server-key", action="store_true", help="status: show the server key too")
    @argument("--json", action="store_true", help="status: one JSON object (the app's keys too)")
    @line_magic
    def anvil(self, line: str) -> Any:
        """``%anvil status [--server-key] [--json]`` | ``%anvil connect URL KEY`` |
        ``%anvil app NAME`` | ``%anvil dashboard`` | ``%anvil tasks``.
        """
        args = parse_argstring(self.anvil, line)
        if args.command == "status":
            if args.json:
                print(json.dumps(kernel.status_json()))
            else:
                print(kernel.format_status(show_server_key=args.server_key))
            return None
        if args.command == "app":
            if len(args.args) != 1:
                raise UsageError("usage: %anvil app NAME")
            try:
                kernel.switch_app(args.args[0])
            except (AnvilError, ValueError) as exc:  # the current connection stays as it was
                raise UsageError(f"%anvil app: {exc}") from exc
            print(kernel.format_status())
            return None
        if args.command == "connect":
            if len(args.args) != 2:
                raise UsageError("usage: %anvil connect URL KEY")
            try:
                kernel.join(*args.args)
            except AnvilError as exc:  # the current connection stays as it was
                raise UsageError(f"%anvil connect: {exc}") from exc
            print(kernel.format_status())
            return None
        return _widgets(args.command)


def _widgets(command: str) -> Any:
    """``%anvil dashboard`` (the cell shows it) and ``%anvil tasks`` (printed)."""
    try:
        from anvil_nb.widgets import dashboard  # noqa: PLC0415
        from anvil_nb.widgets.tasks import tasks_text  # noqa: PLC0415
    except ImportError as exc:
        raise UsageError(
            f"%anvil {command} needs anvil_nb.widgets, which this version does not have yet"
        ) from exc
    if command == "tasks":
        print(tasks_text())  # NAME  STATUS  ELAPSED  STATE, one line per task
        return None
    return dashboard()


def load(ipython: Any) -> None:
    """Join a host and register the magics (``%load_ext anvil_nb``)."""
    kernel.join()
    from anvil_nb.widgets.feed import shared_feed  # noqa: PLC0415 - loads ipywidgets

    shared_feed()  # from now on, so a dashboard shows everything since %load_ext
    ipython.register_magics(AnvilMagics(ipython))


def unload(ipython: Any) -> None:  # noqa: ARG001
    """Leave the host (``%unload_ext anvil_nb``)."""
    kernel.leave()
