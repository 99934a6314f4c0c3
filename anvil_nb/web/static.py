"""Files the host serves as they are: the browser client and its example page.

``{app root}_/client.js``
    The browser client (docs/browser.md), one ES module built from ``labextension/src/client``
    into ``anvil_nb/static/client.js`` by the package build (hatch-jupyter-builder runs
    ``npm run build``). Public everywhere, like the uplink route: it is code and carries no
    secrets. A source checkout that was never built answers 503, saying how to build it.
``{app root}_/example``
    ``anvil_nb/static/example.html``: a form that calls a server function through
    ``./client.js`` (the client beside it) and shows the result or the error.

Both are read from disk on each request (small; a rebuild shows up without a restart), and
tornado's ETag answers a repeated request with 304. An app route naming an app that does not
exist is a 404, as for ``_/ws``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tornado.web

from anvil_nb.config import DEFAULT_APP
from anvil_nb.web.api import app_exists

__all__ = ["CLIENT_JS", "EXAMPLE_PAGE", "ClientScriptHandler", "ExamplePageHandler"]

STATIC = Path(__file__).resolve().parent.parent / "static"
#: The built browser client (a build output: not in a source checkout until it is built).
CLIENT_JS = STATIC / "client.js"
#: The example page (source, committed).
EXAMPLE_PAGE = STATIC / "example.html"

NOT_BUILT = (
    "anvil_nb's browser client (anvil_nb/static/client.js) has not been built in this "
    "installation. Build it with `pip install -e .` in the source checkout (which runs the "
    "build hook), or with `npm ci && npm run build` in labextension/ (Node 20 or later).\n"
)


class _StaticFile(tornado.web.RequestHandler):
    """One file, for every app that exists."""

    path: Path
    content_type: str

    def initialize(self, host: Any, keys: Any, public: bool = True) -> None:
        self.host = host
        self.keyring = keys
        self.public = public

    def check_app(self, app: str) -> None:
        """404 for an app the host does not have."""
        if not app_exists(self.host, self.keyring, app):
            raise tornado.web.HTTPError(404, f"no app named {app[:100]!r}")

    def missing(self) -> None:
        """The answer when the file is not there (a packaging error: 500)."""
        raise tornado.web.HTTPError(500, f"{self.path.name} is missing from the installation")

    def serve(self, app: str) -> None:
        """Write the file (``app`` checked first)."""
        self.check_app(app)
        try:
            body = self.path.read_bytes()
        except FileNotFoundError:
            self.missing()
            return
        self.set_header("Content-Type", self.content_type)
        self.set_header("Cache-Control", "no-cache")  # revalidate: the ETag makes that cheap
        self.finish(body)

    def get(self, app: str = DEFAULT_APP) -> None:
        self.serve(app)

    def head(self, app: str = DEFAULT_APP) -> None:
        self.serve(app)


class ClientScriptHandler(_StaticFile):
    """``{app root}_/client.js``: the browser client; 503 with how to build it if it is not built."""

    path = CLIENT_JS
    content_type = "text/javascript; charset=utf-8"

    def missing(self) -> None:  # noqa: D102
        self.set_status(503)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(NOT_BUILT)


class ExamplePageHandler(_StaticFile):
    """``{app root}_/example``: a form that calls a server function through the client."""

    path = EXAMPLE_PAGE
    content_type = "text/html; charset=utf-8"
