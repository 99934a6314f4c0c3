"""The HTTP door of a host: one request in, one call routed, one response out.

:class:`EndpointDoor` takes a request the web layer has read (:class:`~anvil_nb.host.http.Incoming`),
decides its session, routes the endpoint call through the host like any caller's (events,
limits, timeouts and all), waits for the answer and renders it. The web layer only reads the
request and writes the :class:`Outcome`.

Sessions (DESIGN.md, "Cookie sessions"): a browser's session is named by a signed cookie
(``anvil_nb_session_<app>``, ``HttpOnly``, ``SameSite=Lax``, the app's path) and kept in the app's
SQLite file, so it survives a restart. A request with no valid cookie runs in a fresh session,
which is kept (and the cookie set) only if the call left something in it; a request from
another site (its ``Origin`` is not the host's, or ``Sec-Fetch-Site: cross-site``) runs in a
fresh session too, with the cookie's session as the one an endpoint with
``cross_site_session=True`` switches to. When a call logs in or out, its session gets a new id,
and the response carries the new cookie.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from anvil_nb.core import protocol
from anvil_nb.core.errors import error_from_wire
from anvil_nb.core.logs import RateLimiter, clip
from anvil_nb.core.media import BlobMedia
from anvil_nb.core.serialise import deserialise, serialise
from anvil_nb.host.dispatcher import Host
from anvil_nb.host.http import (
    BAD_GATEWAY,
    Incoming,
    Reply,
    endpoint_kwargs,
    json_problem,
    plain,
    render,
)
from anvil_nb.host.sessions import SessionManager, SessionRecord
from anvil_nb.host.state import Media

__all__ = ["COOKIE_PREFIX", "EndpointDoor", "Outcome", "cookie_name", "door_of", "is_cross_site"]

log = logging.getLogger("anvil_nb.host.endpoints")

#: Session cookies are named this + the app's name.
COOKIE_PREFIX = "anvil_nb_session_"


def cookie_name(app: str) -> str:
    """The name of *app*'s session cookie."""
    return COOKIE_PREFIX + app.replace("-", "_")


@dataclass(frozen=True)
class Outcome:
    """What the web layer writes: the reply, and the session cookie's new value if it changed
    (``""``: delete it).
    """

    reply: Reply
    cookie: str | None = None


class _Exchange:
    """The caller side of one endpoint call: the host sends its answer here."""

    kind = "http"
    name = "http"
    queued_bytes = 0

    def __init__(self, client: dict[str, Any]):
        self.client = client
        self.answer: asyncio.Future[tuple[dict[str, Any], Media]] = (
            asyncio.get_running_loop().create_future()
        )

    def send(self, data: bytes, media: Media | None = None, request_id: Any = None) -> None:  # noqa: ARG002
        if not self.answer.done():
            self.answer.set_result((protocol.decode(data), media or {}))

    def close(self, reason: str) -> None:  # noqa: ARG002 - a door has no connection to close
        return


#: How the host's own failures of an endpoint call become statuses (others are a 500).
_STATUS_OF_ERROR = {
    "anvil.server.TimeoutError": (504, "The endpoint did not answer in time."),
    "anvil.server.QuotaExceededError": (503, "The endpoint is overloaded; try again later."),
    "anvil.server.UplinkDisconnectedError": (
        502,
        "The connection serving this endpoint was lost; try again.",
    ),
    "anvil.server.RuntimeUnavailableError": (503, "The host is shutting down."),
}


class EndpointDoor:
    """Serves ``_/api/<path>`` requests of every app of *host* (one per host)."""

    def __init__(self, host: Host):
        self.host = host
        self.in_flight = 0
        self._quiet = RateLimiter(host.limits.log_interval)

    # -- cookies -------------------------------------------------------------------------------
    def _mac(self, app: str, session_id: str) -> str:
        key = hashlib.sha256(b"anvil_nb session cookie\0" + self.host.secret).digest()
        msg = f"{app}\0{session_id}".encode()
        return hmac.new(key, msg, hashlib.sha256).hexdigest()[:32]

    def cookie_value(self, app: str, session_id: str) -> str:
        """The signed cookie value naming *session_id* in *app*."""
        return f"{session_id}.{self._mac(app, session_id)}"

    def cookie_session(self, app: str, value: str | None) -> SessionRecord | None:
        """The live cookie session a cookie value names (``None`` if unsigned, tampered,
        unknown, expired or not a cookie session).
        """
        if not value or "." not in value or len(value) > 200:
            return None
        session_id, _, mac = value.rpartition(".")
        if not hmac.compare_digest(
            mac.encode("utf-8", "replace"), self._mac(app, session_id).encode()
        ):
            return None
        sessions = self.host.app(app).sessions
        record = sessions.get(session_id)
        if record is None or not (record.cookie or record.persistent):
            return None
        if sessions.is_expired(record):
            return None
        return record

    def browser_session(
        self, app: str, cookie: str | None, client: dict[str, Any]
    ) -> tuple[SessionRecord, str | None]:
        """The session of a browser's ``_/ws`` connection: its cookie's, else a new one named
        by a new cookie (kept in memory until it holds something); and the cookie to set.
        """
        known = self.cookie_session(app, cookie)
        if known is not None:
            return known, None
        fresh = self.host.app(app).sessions.new(client=client)
        fresh.cookie = True
        return fresh, self.cookie_value(app, fresh.id)

    # -- requests ------------------------------------------------------------------------------
    async def serve(
        self, app: str, request: Incoming, cookie: str | None = None, *, same_site: bool = True
    ) -> Outcome:
        """Serve one request for ``_/api{request.path}`` of *app*.

        *same_site* is False for a request from another site (the web layer reads ``Origin``
        and ``Sec-Fetch-Site``; see :func:`is_cross_site`).
        """
        command = self.host.endpoint_command(app, request.path)
        if command is None:
            return Outcome(plain(404, f"No matching API endpoint: {clip(request.path, 200)}"))
        content_type = next((v for k, v in request.headers if k.lower() == "content-type"), None)
        problem = json_problem(content_type, request.body)
        if problem is not None:
            return Outcome(plain(400, problem))
        if self.in_flight >= self.host.limits.max_calls_in_flight:
            return Outcome(
                plain(503, "Too many requests in flight; try again later.", ("Retry-After", "1"))
            )
        body = (
            BlobMedia(content_type or "application/octet-stream", request.body)
            if request.body
            else None
        )
        try:
            kwargs = endpoint_kwargs(request, body, hidden_cookie=cookie_name(app))
        except ValueError as exc:
            return Outcome(plain(400, str(exc)))
        self.in_flight += 1
        try:
            return await self._call(app, command, kwargs, cookie, same_site, request.remote_ip)
        finally:
            self.in_flight -= 1

    async def _call(
        self,
        app: str,
        command: str,
        kwargs: dict[str, Any],
        cookie: str | None,
        same_site: bool,
        ip: str | None,
    ) -> Outcome:
        sessions = self.host.app(app).sessions
        known = self.cookie_session(app, cookie)
        client = {"type": "http", "ip": ip or "", "location": None}
        fresh = None
        if known is not None and same_site:
            session_id = known.id
        else:
            fresh = sessions.new(client=client)
            session_id = fresh.id
        enc = serialise({"kwargs": kwargs})
        msg = {
            "type": "CALL",
            "id": 1,
            "command": command,
            "args": [],
            "kwargs": enc.message["kwargs"],
            "objects": enc.message.get("objects") or [],
        }
        media = {media_id: m.get_bytes() for media_id, m in enc.media}
        exchange = _Exchange(client)
        alternate = known.id if known is not None and not same_site else None
        req = self.host.call_once(exchange, app, session_id, msg, media, alternate)
        try:
            answer, answer_media = await exchange.answer
        except asyncio.CancelledError:  # the client went away
            if req is not None:
                self.host.abandon(req)
            if fresh is not None:
                sessions.drop(fresh.id)
            raise
        final = req.session_id if req is not None else session_id
        reply = self._reply(command, answer, answer_media)
        return Outcome(reply, self._settle(app, sessions, known, fresh, final, same_site))

    def _reply(self, command: str, answer: dict[str, Any], media: Media) -> Reply:
        error = answer.get("error")
        if error is not None:
            wire_type = error.get("type") if isinstance(error, dict) else None
            status_text = _STATUS_OF_ERROR.get(str(wire_type))
            if status_text is not None:
                return plain(*status_text)
            self._quiet.warning(
                log, "endpoint-error:" + command[:60], "endpoint %s failed: %s", clip(command),
                clip(str(error_from_wire(error))),
            )  # fmt: skip
            return plain(500, BAD_GATEWAY)
        try:
            deserialise(answer, media=media)
            return render(answer.get("response"))
        except Exception as exc:
            self._quiet.warning(
                log, "endpoint-answer:" + command[:60], "endpoint %s answered badly: %s",
                clip(command), clip(str(exc)),
            )  # fmt: skip
            return plain(500, BAD_GATEWAY)

    def _settle(
        self,
        app: str,
        sessions: SessionManager,
        known: SessionRecord | None,
        fresh: SessionRecord | None,
        final_id: str,
        same_site: bool,
    ) -> str | None:
        """Keep or drop the request's sessions; the cookie to set, if it changed."""
        final = sessions.get(final_id)
        if fresh is not None and (final is None or final.id != fresh.id):
            sessions.drop(fresh.id)  # switched away (cross_site_session) or replaced (login)
        if final is None:  # the cookie's session ended (reset, or it expired meanwhile)
            return "" if known is not None and same_site else None
        if known is not None and final.id == known.id:
            return None
        if not final.persistent:
            if not same_site or not _worth_keeping(final):
                sessions.drop(final.id)
                return None
            final.cookie = True
            sessions.persist(final)
        return self.cookie_value(app, final.id) if same_site else None


def door_of(host: Host) -> EndpointDoor:
    """The host's HTTP door (made on first use; one per host)."""
    door = getattr(host, "_http_door", None)
    if door is None:
        door = EndpointDoor(host)
        host._http_door = door  # type: ignore[attr-defined]
    return door


def _worth_keeping(record: SessionRecord) -> bool:
    """Whether a fresh session holds anything (data or a user) worth a cookie."""
    data = record.data
    return bool(record.user_id) or (isinstance(data, dict) and bool(data.get("session")))


def is_cross_site(origin: str | None, fetch_site: str | None, own_origin: str | None) -> bool:
    """Whether a request comes from another site: ``Sec-Fetch-Site: cross-site``, or an
    ``Origin`` whose scheme, host and port differ from the host's own.
    """
    if fetch_site is not None and fetch_site.strip().lower() == "cross-site":
        return True
    if not origin or origin == "null":
        return origin == "null"
    if not own_origin:
        return True
    mine, theirs = urlsplit(own_origin), urlsplit(origin)
    return (mine.scheme, mine.hostname, mine.port) != (theirs.scheme, theirs.hostname, theirs.port)
