"""HTTP handlers of the standalone host: ``_/admin/...`` and the status page. They only translate.

Inside Jupyter, :mod:`anvil_nb.jupyter.serverext` uses variants of these behind Jupyter's own auth.
Standalone, ``_/admin/...`` asks for the server key (``Authorization: Bearer <key>``).
(``_/api/...`` is :mod:`anvil_nb.web.api`.)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import html
from typing import Any

import orjson
import tornado.iostream
import tornado.web

from anvil_nb.config import DEFAULT_APP, KeyRing, Keys
from anvil_nb.core.errors import AnvilError
from anvil_nb.core.events import Event, to_wire
from anvil_nb.host.dispatcher import Host

__all__ = [
    "EVENTS_BACKLOG",
    "EVENTS_BACKLOG_BYTES",
    "EVENTS_KEEPALIVE",
    "AdminAppsHandler",
    "AdminEventsHandler",
    "AdminStateHandler",
    "AdminTasksHandler",
    "EventStreaming",
    "StatusPageHandler",
    "admin_state",
    "admin_tasks",
    "apps_state",
    "kill_request",
    "no_app",
]

#: Events kept for one ``_/admin/events`` reader that has not taken them yet; older ones are
#: dropped (and the reader is told how many).
EVENTS_BACKLOG = 10_000
#: ... and at most this many bytes of them (a capability update can be large).
EVENTS_BACKLOG_BYTES = 8 * 1024 * 1024
#: Seconds between two keep-alive comments on a quiet event stream.
EVENTS_KEEPALIVE = 15.0


def admin_state(host: Host, keys: Keys | KeyRing, app: str = DEFAULT_APP) -> dict[str, Any] | None:
    """What ``_/admin/state[?app=NAME]`` answers: the state of one app (``default`` unless
    named) and its client key, never a server key; ``None`` for an app the host does not have.
    """
    keyring = KeyRing.of(keys)
    if app not in keyring.names():
        return None
    return {**host.state(app), "client_key": keyring.keys(app).client_key}


def apps_state(host: Host, keys: Keys | KeyRing) -> list[dict[str, Any]]:
    """What ``_/admin/apps`` answers: every app, as ``%anvil status --json`` describes one."""
    keyring = KeyRing.of(keys)
    origin = (host.origin or "").rstrip("/") + "/"
    uplink = origin.replace("http", "ws", 1) + "_/uplink"
    apps = []
    for name in keyring.names():
        keys_of = keyring.keys(name)
        apps.append(
            {
                "app": name,
                "url": origin if name == DEFAULT_APP else f"{origin}app/{name}/",
                "uplink_url": uplink,
                "server_key": keys_of.server_key,
                "client_key": keys_of.client_key,
                "functions": sorted(host.state(name)["registrations"]),
                "portable_classes": host.portable_classes(name),
            }
        )
    return apps


def no_app(app: str) -> dict[str, str]:
    """The body of a 404 for an app the host does not have."""
    return {"error": f"No app named {app[:100]!r}"}


class _Base(tornado.web.RequestHandler):
    def initialize(self, host: Host, keys: Keys | KeyRing, public: bool = False) -> None:
        self.host = host
        self.keyring = KeyRing.of(keys)
        self.keys = self.keyring.default
        self.public = public

    def refused_without_the_server_key(self) -> bool:
        """Answer 403 (and True) unless the request carries ``default``'s server key."""
        given = self.request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if hmac.compare_digest(given.encode(), self.keys.server_key.encode()):
            return False
        self.write_json(403, {"error": "the server key is required (Authorization: Bearer <key>)"})
        return True

    def write_json(self, status: int, body: Any) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps(body))


class AdminAppsHandler(_Base):
    """``_/admin/apps``: every app with its keys, for the server key's holder."""

    def get(self) -> None:  # noqa: D102
        if self.refused_without_the_server_key():
            return
        self.write_json(200, apps_state(self.host, self.keyring))


class StatusPageHandler(_Base):
    """``GET {root}`` and ``{root}app/NAME/`` on the standalone host: who is here, in HTML.

    The app's name, its uplink URL and its registered functions (no keys: ``anvil-nb keys``
    prints those on the host's machine).
    """

    def get(self, app: str = DEFAULT_APP) -> None:  # noqa: D102
        if app not in self.keyring.names():
            raise tornado.web.HTTPError(404)
        origin = (self.host.origin or "").rstrip("/")
        functions = sorted(self.host.state(app)["registrations"])
        items = "".join(f"<li><code>{html.escape(f)}</code></li>" for f in functions)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(
            "<!doctype html><meta charset=utf-8><title>anvil_nb: "
            f"{html.escape(app)}</title><h1>anvil_nb app <code>{html.escape(app)}</code></h1>"
            f"<p>Uplink scripts connect to <code>{html.escape(origin.replace('http', 'ws', 1))}"
            "/_/uplink</code> with this app's server key (to serve functions) or client key (to "
            "call them); <code>anvil-nb keys " + html.escape(app) + "</code> prints them.</p>"
            f"<h2>Functions ({len(functions)})</h2><ul>{items or '<li>(none yet)</li>'}</ul>"
        )


class AdminStateHandler(_Base):
    """``_/admin/state``: registrations and connected peers, for the server key's holder."""

    def get(self) -> None:  # noqa: D102
        if self.refused_without_the_server_key():
            return
        app = self.get_query_argument("app", DEFAULT_APP)
        state = admin_state(self.host, self.keyring, app)
        if state is None:
            self.write_json(404, no_app(app))
        else:
            self.write_json(200, state)


#: Running tasks whose live state ``_/admin/tasks`` asks their providers for (newest first).
LIVE_STATES = 20


async def admin_tasks(host: Host, keys: Keys | KeyRing, app: str) -> list[dict[str, Any]] | None:
    """What ``_/admin/tasks[?app=NAME]`` answers: the app's task records, newest first, the
    newest running ones with their live ``task_state``; ``None`` for an app the host lacks.
    """
    if app not in KeyRing.of(keys).names():
        return None
    tasks = host.tasks(app)
    for task in [t for t in tasks if t["status"] == "running"][:LIVE_STATES]:
        with contextlib.suppress(AnvilError):
            task["state"] = await host.task_state(app, task["id"])
    return tasks


def kill_request(host: Host, body: bytes) -> tuple[int, dict[str, Any]]:
    """``POST _/admin/tasks/kill`` with ``{"app", "id"}``: the status and JSON answer."""
    try:
        asked = orjson.loads(body or b"{}")
        app, task_id = asked.get("app", DEFAULT_APP), asked["id"]
        if not isinstance(app, str) or not isinstance(task_id, str):
            raise TypeError
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return 400, {"error": 'send {"app": NAME, "id": TASK_ID} as JSON'}
    if app not in host.apps:
        return 404, no_app(app)
    if not host.kill_task(app, task_id):
        return 404, {"error": f"No running task {task_id[:100]!r} in app {app[:100]!r}"}
    return 200, {"killed": task_id}


class AdminTasksHandler(_Base):
    """``_/admin/tasks``: an app's background tasks (live state for running ones), and
    ``_/admin/tasks/kill``; for the server key's holder.
    """

    async def get(self) -> None:  # noqa: D102
        if self.refused_without_the_server_key():
            return
        if self.request.path.endswith("/kill"):
            raise tornado.web.HTTPError(405, "POST to _/admin/tasks/kill")
        app = self.get_query_argument("app", DEFAULT_APP)
        tasks = await admin_tasks(self.host, self.keyring, app)
        if tasks is None:
            self.write_json(404, no_app(app))
        else:
            self.write_json(200, tasks)

    def post(self) -> None:  # noqa: D102
        if self.refused_without_the_server_key():
            return
        if not self.request.path.endswith("/kill"):
            raise tornado.web.HTTPError(405, "GET _/admin/tasks; POST to _/admin/tasks/kill")
        self.write_json(*kill_request(self.host, self.request.body))


class _Subscription:
    """One reader of the host's stream: a backlog bounded in events and in bytes (each event is
    encoded once, as it happens), and a wake-up for the writer.
    """

    def __init__(self, app: str | None):
        self.app = app
        self.backlog: collections.deque[str] = collections.deque()
        self.size = 0
        self.dropped = 0
        self.closed = False
        self.ready = asyncio.Event()

    def __call__(self, event: Event) -> None:
        if self.app is not None and event.app != self.app:
            return
        line = f"data: {orjson.dumps(to_wire(event)).decode()}\n\n"
        self.backlog.append(line)
        self.size += len(line)
        while self.backlog and (
            len(self.backlog) > EVENTS_BACKLOG or self.size > EVENTS_BACKLOG_BYTES
        ):  # a reader that does not keep up loses the oldest events, and is told how many
            self.size -= len(self.backlog.popleft())
            self.dropped += 1
        self.ready.set()

    def close(self) -> None:
        self.closed = True
        self.ready.set()

    def take(self) -> str:
        """What to write now: a ``dropped`` notice if events were lost, then the events."""
        parts = []
        if self.dropped:
            parts.append(
                f"event: dropped\ndata: {orjson.dumps({'dropped': self.dropped}).decode()}\n\n"
            )
            self.dropped = 0
        parts.extend(self.backlog)
        self.backlog.clear()
        self.size = 0
        self.ready.clear()
        return "".join(parts)


class EventStreaming(tornado.web.RequestHandler):
    """A handler that can answer with the host's event stream (mixed into the admin handlers of
    both placements).
    """

    _subscription: _Subscription | None = None

    async def stream_events(self, host: Host, app: str | None) -> None:
        """Answer with the host's events (of *app*, or of every app) as Server-Sent Events
        (``data: {json}`` per event, :func:`anvil_nb.core.events.to_wire`) until the reader goes
        away. A comment every :data:`EVENTS_KEEPALIVE` seconds keeps a quiet stream open.
        """
        sub = self._subscription = _Subscription(app)
        unsubscribe = host.events.subscribe(sub)
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        try:
            self.write(": anvil_nb events\n\n")
            await self.flush()
            while not sub.closed:
                try:
                    await asyncio.wait_for(sub.ready.wait(), EVENTS_KEEPALIVE)
                except asyncio.TimeoutError:
                    self.write(": keep-alive\n\n")
                else:
                    self.write(sub.take())
                await self.flush()
        except tornado.iostream.StreamClosedError:
            pass
        finally:
            unsubscribe()

    def on_connection_close(self) -> None:  # noqa: D102 - the reader went away
        if self._subscription is not None:
            self._subscription.close()
        super().on_connection_close()


class AdminEventsHandler(EventStreaming, _Base):
    """``_/admin/events[?app=NAME]``: the host's event stream (all apps unless one is named),
    as Server-Sent Events, for the server key's holder.
    """

    async def get(self) -> None:  # noqa: D102
        if self.refused_without_the_server_key():
            return
        app = self.get_query_argument("app", None)
        if app is not None and app not in self.keyring.names():
            self.write_json(404, no_app(app))
            return
        await self.stream_events(self.host, app)
