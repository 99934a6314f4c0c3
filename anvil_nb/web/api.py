"""``{app root}_/api/<path>``: HTTP endpoints, translated to and from the host's door.

:class:`EndpointServing` reads a request (its body streamed, so that one larger than the limit
is refused from its headers alone, with 413) and writes what
:class:`~anvil_nb.host.endpoints.EndpointDoor` answers. The standalone host uses
:class:`ApiHandler`; inside Jupyter, :mod:`anvil_nb.jupyter.serverext` adds Jupyter's
authentication in front of the same mixin.
"""

from __future__ import annotations

import asyncio

import tornado.httputil
import tornado.web

from anvil_nb.config import DEFAULT_APP, KeyRing, Keys
from anvil_nb.host.dispatcher import Host
from anvil_nb.host.endpoints import Outcome, cookie_name, door_of, is_cross_site
from anvil_nb.host.http import Incoming, Reply, plain

__all__ = ["ApiHandler", "EndpointServing", "app_exists", "app_root"]

#: Every method an endpoint may be asked for (the endpoint decides which it serves: 405).
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")


def app_exists(host: Host, keyring: KeyRing, app: str) -> bool:
    """Whether *app* exists (it has keys). The host's own apps are known without a look at the
    data dir, which a request would otherwise pay for every time.
    """
    return app == DEFAULT_APP or app in host.apps or app in keyring.names()


def app_root(path: str, marker: str) -> str:
    """The path of the app root in a request *path* that ends in ``{marker}...``, which the
    app's session cookie is scoped to (``/app/books/_/api/x`` -> ``/app/books/``).
    """
    return path[: path.index(marker)] if marker in path else "/"


@tornado.web.stream_request_body
class EndpointServing(tornado.web.RequestHandler):
    """Reads an endpoint request and writes the door's answer (mix into a handler that has
    ``self.host``).
    """

    SUPPORTED_METHODS = METHODS  # type: ignore[assignment]
    host: Host

    def compute_etag(self) -> None:
        """No ETag: an endpoint's answer is the endpoint's to cache (it may set one)."""
        return

    def _refuse_large_body(self) -> bool:
        """413 from the headers alone when the declared body is over the limit (True if so)."""
        limit = self.host.limits.max_http_body_bytes
        declared = self.request.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            self._write_reply(
                plain(
                    413,
                    f"The request body is {int(declared):,} bytes, over the limit of {limit:,} bytes",
                )
            )
            return True
        self.request.connection.set_max_body_size(limit)  # type: ignore[union-attr]
        self._chunks: list[bytes] = []
        self._size = 0
        return False

    def data_received(self, chunk: bytes) -> None:  # noqa: D102
        if self._finished:
            return
        self._size += len(chunk)
        limit = self.host.limits.max_http_body_bytes
        if self._size > limit:  # a chunked body with no declared length
            self._write_reply(plain(413, f"The request body is over the limit of {limit:,} bytes"))
            return
        self._chunks.append(chunk)

    def _incoming(self, path: str) -> Incoming:
        request = self.request
        body = b"".join(self._chunks)
        form: dict[str, list[bytes]] = {}
        content_type = request.headers.get("Content-Type", "")
        if content_type.split(";", 1)[0].strip().lower() == "application/x-www-form-urlencoded":
            tornado.httputil.parse_body_arguments(content_type, body, form, {}, request.headers)
        return Incoming(
            method=request.method or "GET",
            path="/" + path,
            query=tornado.httputil.parse_qs_bytes(request.query, keep_blank_values=True),
            form=form,
            headers=list(request.headers.get_all()),
            body=body,
            remote_ip=request.remote_ip,
        )

    async def serve_endpoint(self, app: str, path: str) -> None:
        """Serve one request for ``_/api/<path>`` of *app*."""
        if self._finished:
            return
        request = self.request
        same_site = not is_cross_site(
            request.headers.get("Origin"),
            request.headers.get("Sec-Fetch-Site"),
            f"{request.protocol}://{request.host}",
        )
        door = door_of(self.host)
        self._serving = asyncio.current_task()
        try:
            outcome = await door.serve(
                app, self._incoming(path), self.get_cookie(cookie_name(app)), same_site=same_site
            )
        except asyncio.CancelledError:
            return  # the client went away; the door gave the call up
        self._write_outcome(app, outcome)

    def on_connection_close(self) -> None:  # noqa: D102 - the client went away mid-call
        task = getattr(self, "_serving", None)
        if task is not None and not task.done():
            task.cancel()
        super().on_connection_close()

    def _write_outcome(self, app: str, outcome: Outcome) -> None:
        if outcome.cookie is not None:
            path = app_root(self.request.path, "_/api/")
            if outcome.cookie:
                self.set_cookie(
                    cookie_name(app), outcome.cookie, path=path, httponly=True, samesite="Lax",
                    secure=self.request.protocol == "https",
                )  # fmt: skip
            else:
                self.clear_cookie(cookie_name(app), path=path)
        self._write_reply(outcome.reply)

    def _write_reply(self, reply: Reply) -> None:
        self.set_status(reply.status)
        self.clear_header("Content-Type")
        for name, value in reply.headers:
            self.add_header(name, value)
        self.finish_reply(reply)

    def finish_reply(self, reply: Reply) -> None:
        """Send the body (a placement whose ``finish`` sets its own headers overrides this)."""
        self.finish(reply.body)


class ApiHandler(EndpointServing):
    """``_/api/<path>`` of the standalone and embedded hosts: public, as on Anvil."""

    def initialize(self, host: Host, keys: Keys | KeyRing, public: bool = True) -> None:  # noqa: D102, ARG002
        self.host = host
        self.keyring = KeyRing.of(keys)

    def prepare(self) -> None:  # noqa: D102
        self._refuse_large_body()

    async def _endpoint(self, *args: str) -> None:
        app, path = (args[0], args[1]) if len(args) == 2 else (DEFAULT_APP, args[-1])
        if not app_exists(self.host, self.keyring, app):
            self._write_reply(plain(404, f"No app named {app[:100]!r}"))
            return
        await self.serve_endpoint(app, path)

    get = head = post = put = delete = patch = options = _endpoint  # type: ignore[assignment]
