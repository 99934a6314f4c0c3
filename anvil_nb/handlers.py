"""HTTP handlers of the standalone host: ``_/api/...`` and ``_/admin/state``. They only translate.

Inside Jupyter, :mod:`anvil_nb.serverext` uses variants of these behind Jupyter's own auth.
Standalone, ``_/admin/...`` asks for the server key (``Authorization: Bearer <key>``), and
``_/api/...`` is public.
"""

from __future__ import annotations

import hmac
from typing import Any

import orjson
import tornado.web

from anvil_nb.apps import KeyRing, Keys
from anvil_nb.host import Host

__all__ = ["AdminStateHandler", "ApiHandler", "admin_state", "no_endpoint"]


def admin_state(host: Host, keys: Keys | KeyRing) -> dict[str, Any]:
    """What ``_/admin/state`` answers: the state of the app ``default`` and its client key
    (never a server key).
    """
    return {**host.state(), "client_key": KeyRing.of(keys).default.client_key}


class _Base(tornado.web.RequestHandler):
    def initialize(self, host: Host, keys: Keys | KeyRing, public: bool = False) -> None:
        self.host = host
        self.keys = KeyRing.of(keys).default
        self.public = public

    def write_json(self, status: int, body: Any) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps(body))


def no_endpoint(path: str) -> dict[str, str]:
    """The body of a 404 from ``_/api/...`` (as the App Server words it)."""
    return {"error": "No matching API endpoint", "path": "/" + path}


class ApiHandler(_Base):
    """``_/api/<path>``: HTTP endpoints. None are served yet, so every path is a 404."""

    def _no_endpoint(self, *args: str) -> None:
        self.write_json(404, no_endpoint(args[-1]))  # (app name,) path

    get = post = put = delete = patch = head = _no_endpoint  # type: ignore[assignment]


class AdminStateHandler(_Base):
    """``_/admin/state``: registrations and connected peers, for the server key's holder."""

    def get(self) -> None:  # noqa: D102
        given = self.request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.keys.server_key.encode()):
            self.write_json(
                403, {"error": "the server key is required (Authorization: Bearer <key>)"}
            )
            return
        self.write_json(200, admin_state(self.host, self.keys))
