"""The routes of a host, in one table, for every placement.

The same routes serve the standalone host (prefix ``/``) and the Jupyter server extension
(prefix ``{base_url}anvil/``); each placement picks the handler classes, which decide who may
use a route:

==========================  ======================================================
``_/uplink``                uplink WebSocket; the uplink key authenticates (and selects
                            the app), any Origin
``_/ws``                    browser WebSocket (untrusted) of the app ``default``
``_/api/<path>``            HTTP endpoints of ``default``
``app/<name>/_/ws``         browser WebSocket of the app *name*
``app/<name>/_/api/<path>`` HTTP endpoints of the app *name*
``_/client.js``             the browser client (public: code, no secrets; also under
                            ``app/<name>/``; 503 saying how to build it if it is not built)
``_/example``               a page calling a server function through ``./client.js`` (also
                            under ``app/<name>/``; public standalone, Jupyter auth in Jupyter)
``_/admin/state[?app=N]``   one app's registrations and peers (server key standalone,
                            Jupyter auth in Jupyter)
``_/admin/apps``            every app with its URLs, keys, functions and portable classes
                            (the same rules)
``_/admin/events[?app=N]``  the host's event stream (Server-Sent Events; the same rules)
``_/admin/tasks[?app=N]``   an app's background tasks, live state for running ones (GET);
                            ``POST _/admin/tasks/kill`` ``{"app", "id"}`` kills one (the
                            same rules)
==========================  ======================================================

An app route names an app that exists (it has keys); others are a 404: apps are made by
their keys (``anvil-nb keys NAME``) or by a kernel that joins one, never by a browser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tornado.web

from anvil_nb.config import KeyRing, Keys
from anvil_nb.core.limits import Limits
from anvil_nb.host.dispatcher import Host
from anvil_nb.web.api import ApiHandler
from anvil_nb.web.handlers import (
    AdminAppsHandler,
    AdminEventsHandler,
    AdminStateHandler,
    AdminTasksHandler,
    StatusPageHandler,
)
from anvil_nb.web.static import ClientScriptHandler, ExamplePageHandler
from anvil_nb.web.uplink import BrowserHandler, UplinkHandler

__all__ = ["Handlers", "make_app", "routes", "websocket_settings"]


@dataclass(frozen=True)
class Handlers:
    """The handler class of each route (the Jupyter extension swaps in authenticated ones)."""

    uplink: type = UplinkHandler
    browser: type = BrowserHandler
    api: type = ApiHandler
    admin_state: type = AdminStateHandler
    admin_apps: type = AdminAppsHandler
    admin_events: type = AdminEventsHandler
    admin_tasks: type = AdminTasksHandler
    client_js: type = ClientScriptHandler
    example: type = ExamplePageHandler


def _join(prefix: str, path: str) -> str:
    return prefix.rstrip("/") + "/" + path


#: An app's name in a route (what :func:`~anvil_nb.config.app_name` makes).
APP = "app/([a-z0-9][a-z0-9-]*)/"


def routes(
    host: Host,
    keys: Keys | KeyRing,
    prefix: str = "/",
    handlers: Handlers = Handlers(),
    public: bool = True,
) -> list[tuple[str, type, dict[str, Any]]]:
    """The host's routes under *prefix* (one key ring for all of them)."""
    kwargs = {"host": host, "keys": KeyRing.of(keys), "public": public}
    return [
        (_join(prefix, "_/uplink"), handlers.uplink, kwargs),
        (_join(prefix, "_/ws"), handlers.browser, kwargs),
        (_join(prefix, APP + "_/ws"), handlers.browser, kwargs),
        (_join(prefix, "_/api/(.*)"), handlers.api, kwargs),
        (_join(prefix, APP + "_/api/(.*)"), handlers.api, kwargs),
        (_join(prefix, r"_/client\.js"), handlers.client_js, kwargs),
        (_join(prefix, APP + r"_/client\.js"), handlers.client_js, kwargs),
        (_join(prefix, "_/example"), handlers.example, kwargs),
        (_join(prefix, APP + "_/example"), handlers.example, kwargs),
        (_join(prefix, "_/admin/state"), handlers.admin_state, kwargs),
        (_join(prefix, "_/admin/apps"), handlers.admin_apps, kwargs),
        (_join(prefix, "_/admin/events"), handlers.admin_events, kwargs),
        (_join(prefix, "_/admin/tasks(?:/kill)?"), handlers.admin_tasks, kwargs),
    ]


def websocket_settings(limits: Limits) -> dict[str, Any]:
    """The tornado application settings for a host's WebSockets.

    The host's own handlers read the frame limit and the keep-alive from ``host.limits``
    themselves (see :class:`~anvil_nb.web.uplink.UplinkHandler`), so that Jupyter's
    application, whose settings are Jupyter's, applies the same bounds. These settings give
    the same frame limit to anything else on the application, and turn tornado's own pings
    off: they cap the timeout at the interval, and only detach a frozen peer after a further
    5 s wait for a close handshake it never answers.
    """
    return {
        "websocket_max_message_size": limits.max_frame_bytes,
        "websocket_ping_interval": 0,
    }


def _no_access_log(handler: tornado.web.RequestHandler) -> None:  # noqa: ARG001
    return


def make_app(
    host: Host, keys: Keys | KeyRing, prefix: str = "/", access_log: bool = True
) -> tornado.web.Application:
    """A tornado application serving *host* under *prefix* (the standalone placement).

    Without *access_log*, requests are not logged (tornado logs each one otherwise).
    Frames larger than the host's ``limits.max_frame_bytes`` close the connection (larger data
    goes as Media). Pings every ``limits.ping_interval`` seconds find dead and frozen peers
    (within ``ping_interval + ping_timeout``); the real client answers them. Serve it with
    :class:`anvil_nb.web.listener.HTTPServer`, which bounds the time and the accept
    errors before the upgrade.
    """
    table = routes(host, keys, prefix)
    kwargs = table[0][2]
    table += [  # the status page: the standalone and embedded hosts' own front door
        (prefix, StatusPageHandler, kwargs),
        (_join(prefix, APP), StatusPageHandler, kwargs),
    ]
    settings = websocket_settings(host.limits)
    if not access_log:
        settings["log_function"] = _no_access_log
    return tornado.web.Application(table, **settings)
