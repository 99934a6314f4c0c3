"""The Jupyter server extension ``anvil_nb``: a host inside ``jupyter server`` / ``jupyter lab``.

It mounts the host's routes (see :mod:`anvil_nb.web.routes`) under ``{base_url}anvil/`` on the
server's own tornado application and event loop. Who may use each route:

* ``_/uplink``: the uplink key alone (no Jupyter token), any Origin, as DESIGN.md decides;
* ``_/admin/state``: Jupyter's own authentication;
* ``_/ws``, ``_/api/...`` and the example page ``_/example``: Jupyter's authentication unless
  ``c.AnvilNB.public = True``;
* ``_/client.js`` (the browser client): public, like the uplink route: code, no secrets.

Once the server has started, ``ANVIL_NB_URL`` and ``ANVIL_NB_SERVER_KEY`` are put into the
server's environment, which the kernels it starts inherit: ``%load_ext anvil_nb`` in such a
kernel joins this host.

Configuration (``jupyter_server_config.py`` or the command line)::

    c.AnvilNB.server_key = "..."   # default: generated once and kept in data_dir/keys.json
    c.AnvilNB.client_key = "..."
    c.AnvilNB.data_dir = "..."     # sessions, MAC key and keys; default: the user data dir
    c.AnvilNB.public = False       # let browsers and HTTP clients in without Jupyter auth
    c.AnvilNB.limits = {"ping_interval": 5}   # bounds, over anvil_nb.core.limits.Limits' defaults

What one connection may cost is bounded by :class:`~anvil_nb.core.limits.Limits` (``AnvilNB.limits``
over the defaults): the
host's WebSocket handlers read the frame limit, the hello deadline and the keep-alive (a ping
every ``ping_interval``; a frozen peer is lost within ``ping_interval + ping_timeout``) from
``host.limits`` themselves, not from Jupyter's application settings. The TCP listener is
Jupyter's own, so the bounds before the WebSocket upgrade (idle connections, half-sent
requests, accept errors such as running out of file descriptors) are Jupyter's and tornado's,
not those of :mod:`anvil_nb.web.listener`.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from jupyter_server.auth.decorator import allow_unauthenticated
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.extension.application import ExtensionApp
from tornado import web
from traitlets import Bool, Dict, TraitError, Unicode, default, validate

from anvil_nb.config import DEFAULT_APP, ENV_KEY, ENV_ROOT, ENV_URL, KeyRing, default_data_dir
from anvil_nb.core.limits import DEFAULT_LIMITS, Limits
from anvil_nb.host.dispatcher import Host
from anvil_nb.host.http import Reply
from anvil_nb.web.api import EndpointServing, app_exists
from anvil_nb.web.handlers import (
    EventStreaming,
    admin_state,
    admin_tasks,
    apps_state,
    kill_request,
    no_app,
)
from anvil_nb.web.routes import Handlers
from anvil_nb.web.service import HostService
from anvil_nb.web.static import ClientScriptHandler, ExamplePageHandler
from anvil_nb.web.uplink import BrowserHandler, UplinkHandler

__all__ = ["AnvilNB"]

#: Where the host is mounted, below the server's base_url.
PREFIX = "anvil/"


def _require_user(handler: Any) -> None:
    """Refuse (403) a request without a Jupyter user, unless the extension is public."""
    if not handler.public and handler.current_user is None:
        raise web.HTTPError(403, "Jupyter authentication is required (or set c.AnvilNB.public)")


class JupyterUplinkHandler(UplinkHandler):
    """``_/uplink`` inside Jupyter: the uplink key authenticates, not Jupyter (DESIGN.md)."""

    @allow_unauthenticated
    async def get(self, *args: Any, **kwargs: Any) -> None:
        await super().get(*args, **kwargs)


class JupyterBrowserHandler(BrowserHandler, JupyterHandler):
    """``_/ws`` inside Jupyter: Jupyter's auth and Origin rules, then the browser protocol."""

    check_origin = JupyterHandler.check_origin  # type: ignore[assignment]

    @allow_unauthenticated  # public, or a Jupyter user: checked here
    async def get(self, *args: Any, **kwargs: Any) -> None:
        _require_user(self)
        await super().get(*args, **kwargs)


class JupyterClientScriptHandler(ClientScriptHandler, JupyterHandler):
    """``_/client.js`` inside Jupyter: public (it is code and carries no secrets)."""

    @allow_unauthenticated
    def get(self, *args: Any) -> None:
        super().get(*args)

    @allow_unauthenticated
    def head(self, *args: Any) -> None:
        super().head(*args)


class JupyterExamplePageHandler(ExamplePageHandler, JupyterHandler):
    """``_/example`` inside Jupyter: Jupyter's authentication unless the extension is public."""

    @allow_unauthenticated  # public, or a Jupyter user: checked here
    def get(self, *args: Any) -> None:
        _require_user(self)
        super().get(*args)

    @allow_unauthenticated
    def head(self, *args: Any) -> None:
        _require_user(self)
        super().head(*args)


class JupyterApiHandler(EndpointServing, APIHandler):
    """``_/api/<path>`` inside Jupyter: Jupyter's auth unless public (refusals are JSON), then
    the endpoint's own answer.
    """

    def initialize(self, host: Host, keys: Any, public: bool = False) -> None:
        self.host = host
        self.keyring = keys
        self.public = public

    def check_xsrf_cookie(self) -> None:
        if not self.public:  # public endpoints are called by clients with no Jupyter cookie
            super().check_xsrf_cookie()

    async def prepare(self) -> None:
        await super().prepare()  # Jupyter's handlers authenticate here
        if not self._finished:
            self._refuse_large_body()

    @allow_unauthenticated
    async def _endpoint(self, *args: str) -> None:
        _require_user(self)
        app, path = (args[0], args[1]) if len(args) == 2 else (DEFAULT_APP, args[-1])
        if not app_exists(self.host, self.keyring, app):
            raise web.HTTPError(404, f"No app named {app[:100]!r}")
        await self.serve_endpoint(app, path)

    get = head = post = put = delete = patch = options = _endpoint  # type: ignore[assignment]

    def finish_reply(self, reply: Reply) -> None:
        content_type = next((v for k, v in reply.headers if k.lower() == "content-type"), None)
        self.finish(reply.body, set_content_type=content_type or "application/octet-stream")


class JupyterAdminStateHandler(APIHandler):
    """``_/admin/state`` inside Jupyter: always behind Jupyter's authentication."""

    def initialize(self, host: Host, keys: Any, public: bool = False) -> None:  # noqa: ARG002
        self.host = host
        self.keys = keys

    @web.authenticated
    def get(self) -> None:
        app = self.get_query_argument("app", DEFAULT_APP)
        state = admin_state(self.host, self.keys, app)
        if state is None:
            self.set_status(404)
            state = no_app(app)
        self.finish(state)


class JupyterAdminAppsHandler(JupyterAdminStateHandler):
    """``_/admin/apps`` inside Jupyter: every app and its keys, behind Jupyter's authentication."""

    @web.authenticated
    def get(self) -> None:
        self.finish(json.dumps(apps_state(self.host, self.keys)))


class JupyterAdminTasksHandler(JupyterAdminStateHandler):
    """``_/admin/tasks`` (and ``_/admin/tasks/kill``) inside Jupyter: an app's background tasks,
    behind Jupyter's authentication (and its XSRF check for the kill).
    """

    @web.authenticated
    async def get(self) -> None:
        if self.request.path.endswith("/kill"):
            raise web.HTTPError(405, "POST to _/admin/tasks/kill")
        app = self.get_query_argument("app", DEFAULT_APP)
        tasks = await admin_tasks(self.host, self.keys, app)
        if tasks is None:
            self.set_status(404)
            self.finish(no_app(app))
        else:
            self.finish(json.dumps(tasks))

    @web.authenticated
    def post(self) -> None:
        if not self.request.path.endswith("/kill"):
            raise web.HTTPError(405, "GET _/admin/tasks; POST to _/admin/tasks/kill")
        status, answer = kill_request(self.host, self.request.body)
        self.set_status(status)
        self.finish(answer)


class JupyterAdminEventsHandler(EventStreaming, JupyterAdminStateHandler):
    """``_/admin/events`` inside Jupyter: the host's event stream, behind Jupyter's authentication."""

    @web.authenticated
    async def get(self) -> None:
        app = self.get_query_argument("app", None)
        if app is not None and app not in KeyRing.of(self.keys).names():
            self.set_status(404)
            self.finish(no_app(app))
            return
        await self.stream_events(self.host, app)


class AnvilNB(ExtensionApp):
    """Serve Anvil-style server functions from this Jupyter server."""

    name = "anvil_nb"
    description = "Anvil-style server functions, served from Jupyter."
    load_other_extensions = True

    server_key = Unicode(
        "",
        help=(
            "The uplink key that admits trusted uplinks (and the kernels of this server). Empty: "
            "use the one kept in data_dir/keys.json, generating it the first time."
        ),
    ).tag(config=True)
    client_key = Unicode(
        "",
        help=(
            "The uplink key that admits untrusted uplinks (scripts acting as clients). Empty: "
            "use the one kept in data_dir/keys.json, generating it the first time."
        ),
    ).tag(config=True)
    data_dir = Unicode(
        help="The folder for sessions, the capability MAC key and generated uplink keys."
    ).tag(config=True)
    public = Bool(
        False,
        help=(
            "Let browsers (_/ws) and HTTP clients (_/api/...) in without Jupyter authentication, "
            "as an Anvil app's users would be. The uplink route always uses the uplink keys."
        ),
    ).tag(config=True)

    limits = Dict(
        {},
        help=(
            "Bounds on what one connection may cost the host, overriding the defaults of "
            "anvil_nb.core.limits.Limits (docs/reliability.md), e.g. "
            '{"max_queued_bytes": 8388608, "ping_interval": 5, "handshake_timeout": 5}.'
        ),
    ).tag(config=True)

    @validate("limits")
    def _validate_limits(self, proposal: Any) -> dict[str, Any]:
        value = proposal["value"]
        known = {f.name: f.type for f in fields(Limits)}
        for name, bound in value.items():
            if name not in known:
                msg = f"AnvilNB.limits: unknown bound {name!r} (known: {', '.join(sorted(known))})"
                raise TraitError(msg)
            if isinstance(bound, bool) or not isinstance(bound, (int, float)) or bound <= 0:
                msg = f"AnvilNB.limits: {name} must be a positive number, not {bound!r}"
                raise TraitError(msg)
        return value

    def host_limits(self) -> Limits:
        """The host's :class:`Limits`: the defaults with what ``AnvilNB.limits`` sets."""
        return replace(DEFAULT_LIMITS, **self.limits)

    @default("data_dir")
    def _default_data_dir(self) -> str:
        return str(default_data_dir())

    def initialize_settings(self) -> None:
        """Create the host (on the server's loop) and load the keys."""
        data_dir = Path(self.data_dir)
        self.keys = KeyRing(data_dir, self.server_key or None, self.client_key or None)
        if self.keys.generated_default:
            self.log.info("anvil_nb: generated uplink keys, kept in %s", data_dir / "keys.json")
        self.service = HostService(self.keys, data_dir=data_dir, limits=self.host_limits())
        self.host = self.service.host
        self.settings["anvil_nb_host"] = self.host

    def initialize_handlers(self) -> None:
        """Mount the routes under ``{base_url}anvil/`` (the server prepends base_url)."""
        handlers = Handlers(
            uplink=JupyterUplinkHandler,
            browser=JupyterBrowserHandler,
            api=JupyterApiHandler,
            admin_state=JupyterAdminStateHandler,
            admin_apps=JupyterAdminAppsHandler,
            admin_events=JupyterAdminEventsHandler,
            admin_tasks=JupyterAdminTasksHandler,
            client_js=JupyterClientScriptHandler,
            example=JupyterExamplePageHandler,
        )
        self.handlers.extend(self.service.routes(PREFIX, handlers, public=self.public))

    def uplink_url(self) -> str:
        """The URL kernels and scripts on this machine use to reach the uplink route."""
        app = self.serverapp
        scheme = "wss" if app.certfile else "ws"
        local = ("", "localhost", "0.0.0.0", "::", "*")  # reach them over IPv4 loopback
        ip = "127.0.0.1" if app.ip in local else app.ip
        ip = f"[{ip}]" if ":" in ip else ip
        return f"{scheme}://{ip}:{app.port}{app.base_url}{PREFIX}_/uplink"

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:  # noqa: ARG002
        """Tell the kernels this server starts where the host is (the port is known now)."""
        http_url = self.uplink_url().replace("ws", "http", 1)
        self.host.origin = http_url.removesuffix("/_/uplink")
        os.environ[ENV_URL] = self.uplink_url()
        os.environ[ENV_KEY] = self.keys.default.server_key
        os.environ[ENV_ROOT] = str(self.serverapp.root_dir)  # notebook paths -> app names
        self.service.start()  # housekeeping, on the server's loop
        self.log.info("anvil_nb: host ready; uplinks connect to %s", self.uplink_url())

    async def stop_extension(self) -> None:
        """Stop the host with the server: calls in flight fail, connections close."""
        self.service.stop()
        for name in (ENV_URL, ENV_KEY, ENV_ROOT):
            os.environ.pop(name, None)
