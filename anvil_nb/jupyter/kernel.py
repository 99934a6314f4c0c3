"""The kernel side: how ``%load_ext anvil_nb`` joins a host, and what ``%anvil status`` shows.

:func:`join` connects this process to a host as a trusted ``server_module``:

* the host named by ``ANVIL_NB_URL`` and ``ANVIL_NB_SERVER_KEY`` (set by the Jupyter server
  extension for the kernels its server starts), or by ``%anvil connect URL KEY``;
* otherwise an embedded host, started in this process on 127.0.0.1 and an ephemeral port with
  fresh keys, so that scripts can reach the kernel's functions. This is what happens under plain
  IPython, nbclient and nbval.

The connection has its own I/O thread and serves calls on a worker pool, so a cell that blocks
(in ``server.call`` or anywhere else) does not stop the kernel from serving. What a function
prints while serving a call is captured for that call (see :mod:`anvil_nb.client.capture`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from anvil_nb import runtime
from anvil_nb.client import capture
from anvil_nb.client.client import Client, functions
from anvil_nb.config import DEFAULT_APP, ENV_KEY, ENV_NOTEBOOK, ENV_ROOT, ENV_URL, app_name
from anvil_nb.core import portable
from anvil_nb.core.errors import AnvilError, AppOfflineError
from anvil_nb.runtime import Connection

__all__ = ["format_status", "join", "leave", "status", "status_json", "switch_app"]

log = logging.getLogger("anvil_nb.jupyter.kernel")


# Portable classes anvil_nb itself registers; not shown as the kernel's own.
_BUILTIN_CLASSES = frozenset({"anvil.server._LoadAppResponse"})


def _joined() -> Connection | None:
    """The connection ``%load_ext`` or ``%anvil connect`` made for this kernel, if any."""
    conn = runtime.connection()
    return conn if conn is not None and conn.by_kernel else None


def notebook_path() -> str | None:
    """The kernel's notebook (``JPY_SESSION_NAME``), relative to the server's root when it is
    inside it; None without one.
    """
    path = os.environ.get(ENV_NOTEBOOK)
    if not path:
        return None
    root = os.environ.get(ENV_ROOT)
    if os.path.isabs(path):
        inside = root and os.path.commonpath([root, path]) == os.path.normpath(root)
        path = os.path.relpath(path, root) if inside else os.path.basename(path)
    return path


def notebook_app() -> str | None:
    """The app of this kernel's notebook (from ``JPY_SESSION_NAME``), or None without one."""
    path = notebook_path()
    if not path:
        return None
    try:
        return app_name(path)
    except ValueError:
        return None


def join(url: str | None = None, key: str | None = None, app: str | None = None) -> Connection:
    """Connect this kernel to a host (see the module docstring) and make it the process's
    connection (:func:`anvil_nb.runtime.connection`).

    With the host's own server key, the kernel joins *app* (default: its notebook's app, or
    ``default`` for a kernel without a notebook); another app's server key joins that app.
    """
    from_env = url is None
    if from_env:
        url, key = os.environ.get(ENV_URL), os.environ.get(ENV_KEY)
    if app is None:
        app = notebook_app()
    joined = None
    if url and key:
        try:
            joined = _join_remote(url, key, app)
        except AppOfflineError as exc:
            if not from_env:
                raise
            log.warning(
                "anvil_nb: cannot reach the host at %s (%s); starting one in this kernel", url, exc
            )
    if joined is None:
        leave()  # the embedded host of this process is replaced by a new one
        joined = _join_embedded()
    else:
        old = runtime.connection()
        if old is not None and old.embedded:  # connected to the new host first: now let go
            runtime.disconnect()
    joined.client.capture_output = True
    capture.install()
    # A kernel that joined a host stays with it (never falls back to an embedded one).
    runtime.set_connection(joined, remote=None if joined.embedded else joined.url)
    runtime.watch(joined)  # the widgets' feed is made as the kernel joins: it listens
    report_classes()
    return joined


def _join_remote(url: str, key: str, app: str | None = None) -> Connection:
    from anvil_nb.client.websocket import WebSocketTransport  # noqa: PLC0415 - loads tornado

    label = notebook_path() or "kernel"
    client = Client(
        WebSocketTransport(url, key, kind="server_module", app=app, label=label)
    ).start()
    try:
        state = client.call("anvil.private.host_state")
    except Exception:  # an older host, or one that keeps its keys to itself
        state = {}
    return Connection(
        client,
        url=url,
        embedded=False,
        app=state.get("app") or DEFAULT_APP,
        server_key=state.get("server_key") or key,
        client_key=state.get("client_key"),
        by_kernel=True,
    )


def _join_embedded() -> Connection:
    from anvil_nb.config import Keys  # noqa: PLC0415
    from anvil_nb.web.service import listen_embedded  # noqa: PLC0415 - loads tornado

    ht = runtime.embedded_host()
    keys = Keys.generate()
    port = listen_embedded(ht, keys).port
    client = Client(ht.connect("server_module")).start()
    return Connection(
        client,
        url=f"ws://127.0.0.1:{port}/_/uplink",
        embedded=True,
        server_key=keys.server_key,
        client_key=keys.client_key,
        by_kernel=True,
    )


def leave() -> None:
    """Disconnect this kernel (its registrations vanish from the host) and stop an embedded host."""
    if _joined() is not None:
        runtime.disconnect()
        capture.uninstall()


def _reachable() -> Connection | None:
    """The process's connection, when other processes can reach its host (it has a URL)."""
    conn = runtime.connection()
    return conn if conn is not None and conn.url is not None else None


def status() -> dict[str, Any]:
    """Where this kernel is connected, its keys, what it serves, and who else is connected."""
    conn = _reachable()
    if conn is None:
        return {"connected": False, "functions": functions.names()}
    peers: list[dict[str, Any]] = []
    try:
        peers = conn.client.call("anvil.private.host_state").get("peers", [])
    except Exception as exc:  # the host went away: say so rather than fail the status
        log.warning("anvil_nb: could not read the host's state: %s", exc)
    return {
        "connected": conn.client.connected,
        "app": conn.app,
        "url": conn.url,
        "embedded": conn.embedded,
        "client_key": conn.client_key,
        "server_key": conn.server_key,
        "functions": sorted(functions.names()),
        "classes": sorted(set(portable.registered_names()) - _BUILTIN_CLASSES),
        "peers": peers,
    }


def report_classes() -> None:
    """Tell the host which portable classes this kernel defines (for ``_/admin/apps``)."""
    conn = _joined()
    if conn is None:
        return
    names = sorted(set(portable.registered_names()) - _BUILTIN_CLASSES)
    try:
        conn.client.call("anvil.private.report_classes", names)
    except AnvilError as exc:  # an older host: it shows no classes, nothing else changes
        log.debug("anvil_nb: could not report portable classes: %s", exc)


def shared_names(names: list[str]) -> dict[str, list[str]]:
    """Of *names*, those another connection of this kernel's app also provides, with who."""
    conn = _joined()
    if conn is None or not names:
        return {}
    try:
        registrations = conn.client.call("anvil.private.host_state").get("registrations") or {}
    except AnvilError:
        return {}
    me = conn.peer_name
    shared = {n: [p for p in registrations.get(n, []) if p != me] for n in names}
    return {n: others for n, others in shared.items() if others}


def status_json() -> dict[str, Any]:
    """``%anvil status --json``: the app this kernel serves, as DESIGN.md's fixed interface.

    ``url`` is the app's HTTP origin (``{root}app/NAME/``; ``default`` is at ``{root}``),
    ``uplink_url`` the URL scripts connect to with ``server_key`` or ``client_key``.
    """
    s = status()
    if "url" not in s:
        return {"app": None, "url": None, "uplink_url": None, "server_key": None,
                "client_key": None, "functions": s["functions"], "portable_classes": []}  # fmt: skip
    root = s["url"].removesuffix("_/uplink").replace("ws", "http", 1)
    url = root if s["app"] == DEFAULT_APP else f"{root}app/{s['app']}/"
    return {
        "app": s["app"],
        "url": url,
        "uplink_url": s["url"],
        "server_key": s["server_key"],
        "client_key": s["client_key"],
        "functions": s["functions"],
        "portable_classes": s["classes"],
    }


def switch_app(app: str) -> Connection:
    """``%anvil app NAME``: serve *app* on the same host from now on (its functions move)."""
    conn = _joined()
    if conn is None:
        raise AppOfflineError("not connected: run %load_ext anvil_nb first")
    if conn.embedded:
        raise AppOfflineError("the embedded host of this kernel serves one app")
    key = conn.client.transport.key  # type: ignore[attr-defined]
    wanted = app_name(app)
    joined = join(conn.url, key, wanted)
    if joined.app != wanted:
        raise AppOfflineError(
            f"this kernel's key admits the app {joined.app!r} only (the host's own server key "
            "joins any app)"
        )
    return joined


def format_status(show_server_key: bool = False) -> str:
    """``%anvil status`` as text."""
    s = status()
    if "url" not in s:
        return "anvil_nb: not connected (run %load_ext anvil_nb)"
    where = "embedded host in this kernel" if s["embedded"] else "host"
    lines = [
        f"anvil_nb: {'connected to' if s['connected'] else 'DISCONNECTED from'} {where} at {s['url']}",
        f"  app:          {s['app']}",
        f"  client key:   {s['client_key'] or '(not known here)'}",
    ]
    if show_server_key:
        lines.append(f"  server key:   {s['server_key']}")
    lines.append(f"  functions:    {', '.join(s['functions']) or '(none)'}")
    lines.append(f"  classes:      {', '.join(s['classes']) or '(none)'}")
    others = [p for p in s["peers"]]
    lines.append(f"  connections:  {len(others)}")
    lines.extend(f"    {p['name']:<24} {p['kind']:<14} {p.get('ip') or ''}" for p in others)
    return "\n".join(lines)
