"""HTTP endpoints: a request as the call the uplink protocol makes of it, and the provider's
answer as the response. No I/O: :mod:`anvil_nb.web.api` reads and writes the sockets.

An endpoint is a registration named ``http:`` + a path regex (``@server.http_endpoint``) or
``route:`` + one (``@server.route`` of the real client). A request for ``{app root}_/api/<rest>``
becomes a call of ``http:/<rest>`` (else ``route:/<rest>``) with the keyword arguments of
PROTOCOL.md §2 (``method``, ``path``, ``query_params``, ``form_params``, ``origin``, ``headers``,
``remote_address``, ``body``, ``username``, ``password``); the provider's wrapper answers
``{"status", "body", "headers"}``, which :func:`render` turns into status, headers and bytes.

Everything a peer sends back is checked before it reaches the socket: a status outside
100-599, a header that is not a pair of strings or carries a line break, or a body that cannot
be rendered is the provider's error, answered with a generic 500 (the reason goes to the log).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from anvil_nb.core.media import Media

__all__ = [
    "BAD_GATEWAY",
    "DEFAULT_MAX_BODY_BYTES",
    "ENDPOINT_PREFIXES",
    "Incoming",
    "RenderError",
    "Reply",
    "basic_credentials",
    "endpoint_kwargs",
    "json_problem",
    "plain",
    "render",
]

#: The prefixes of endpoint registrations, in the order a request tries them.
ENDPOINT_PREFIXES = ("http:", "route:")

#: The largest request body an endpoint is sent, unless the host is told otherwise.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024

#: The body of a 500: nothing about what failed or where (that goes to the provider's log).
BAD_GATEWAY = "Internal server error: the endpoint failed. Its log says why."

_UNSAFE = re.compile(r"[\r\n\x00]")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


@dataclass(frozen=True)
class Incoming:
    """An HTTP request, as the web layer read it (nothing decoded beyond the HTTP framing)."""

    method: str
    #: The path below ``_/api``, starting with ``/`` (``/books/42``), percent-decoded.
    path: str
    query: Mapping[str, list[bytes]]
    #: The parameters of an ``application/x-www-form-urlencoded`` body (else empty).
    form: Mapping[str, list[bytes]]
    #: Every header, in order, repeats included, names as sent.
    headers: list[tuple[str, str]]
    body: bytes
    remote_ip: str | None


@dataclass(frozen=True)
class Reply:
    """An HTTP response: status, headers (repeats allowed, in order) and the body's bytes."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


class RenderError(ValueError):
    """A provider's answer cannot be an HTTP response; the message says why (for the log)."""


def plain(status: int, text: str, *headers: tuple[str, str]) -> Reply:
    """A short ``text/plain`` reply that says what was wrong."""
    return Reply(
        status, [("Content-Type", "text/plain; charset=utf-8"), *headers], text.encode() + b"\n"
    )


def basic_credentials(authorization: str | None) -> tuple[str | None, str | None]:
    """The username and password of an ``Authorization: Basic`` header (``None`` for each if
    there is none, or it is not Basic, or it does not decode).
    """
    if not authorization:
        return None, None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    username, sep, password = decoded.partition(":")
    return (username, password) if sep else (None, None)


def _text(name: str, values: list[bytes], where: str) -> str:
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"The {where} parameter {name[:100]!r} is not UTF-8") from None


def _params(params: Mapping[str, list[bytes]], where: str) -> dict[str, str]:
    """Parameters as strings; of a repeated name, the first value (as Flask and tornado do)."""
    return {name: _text(name, values, where) for name, values in params.items() if values}


def _headers(headers: Iterable[tuple[str, str]], hidden_cookie: str | None) -> dict[str, str]:
    """Headers with lower-case names, repeats joined by ``", "``; the host's own session cookie
    is taken out of ``cookie`` (it is a bearer token: endpoints never see it).
    """
    out: dict[str, str] = {}
    for name, raw in headers:
        key, value = name.lower(), raw
        if key == "cookie" and hidden_cookie:
            kept = (c.strip() for c in raw.split(";"))
            value = "; ".join(c for c in kept if c and c.split("=", 1)[0] != hidden_cookie)
            if not value:
                continue
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def json_problem(content_type: str | None, body: bytes) -> str | None:
    """Why a body declared JSON does not parse (``None`` if it is not declared JSON, or parses)."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json" or not body:
        return None
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return f"The request body is declared application/json but is not valid JSON: {exc}"
    return None


def endpoint_kwargs(
    request: Incoming, body: Media | None, hidden_cookie: str | None = None
) -> dict[str, Any]:
    """The keyword arguments of an endpoint call (PROTOCOL.md §2), *body* as Media.

    Raises
    ------
    ValueError
        A query or form parameter is not UTF-8 (the message names it).
    """
    headers = _headers(request.headers, hidden_cookie)
    username, password = basic_credentials(headers.get("authorization"))
    return {
        "method": request.method.upper(),
        "path": request.path,
        "query_params": _params(request.query, "query"),
        "form_params": _params(request.form, "form"),
        "origin": headers.get("origin"),
        "headers": headers,
        "remote_address": request.remote_ip,
        "body": body,
        "username": username,
        "password": password,
    }


def _status(value: Any) -> int:
    if type(value) is not int or not 100 <= value <= 599:
        raise RenderError(f"the status {str(value)[:40]!r} is not an HTTP status (100-599)")
    return value


def _header_pairs(value: Any) -> list[tuple[str, str]]:
    if value is None:
        return []
    pairs = value.items() if isinstance(value, dict) else value
    if not isinstance(pairs, Iterable) or isinstance(pairs, (str, bytes)):
        raise RenderError("the headers are neither a dict nor a list of [name, value] pairs")
    out = []
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RenderError(f"the header {str(pair)[:60]!r} is not a [name, value] pair")
        name, text = pair
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            text = str(text)
        if not isinstance(name, str) or not isinstance(text, str):
            raise RenderError(f"the header {str(name)[:60]!r} is not a pair of strings")
        if not _TOKEN.match(name) or _UNSAFE.search(text):
            raise RenderError(f"the header {name[:60]!r} has a bad name or a line break")
        out.append((name, text))
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    raise TypeError(f"a {type(value).__name__} is not JSON")


def _body(value: Any) -> tuple[bytes, str]:
    """The bytes of a body and their default content type (PROTOCOL.md §2)."""
    if value is None:
        return b"", "text/plain; charset=utf-8"
    if isinstance(value, str):
        return value.encode("utf-8"), "text/plain; charset=utf-8"
    if isinstance(value, Media):
        return value.get_bytes(), value.content_type
    try:
        return orjson.dumps(value, default=_json_default), "application/json"
    except TypeError as exc:
        raise RenderError(f"the body cannot be rendered: {exc}") from None


def render(answer: Any) -> Reply:
    """The HTTP response for a provider's answer ``{"status", "body", "headers"}``.

    Raises
    ------
    RenderError
        The answer is not of that shape, or a part of it cannot go on the wire.
    """
    if not isinstance(answer, dict) or "status" not in answer:
        raise RenderError("the answer is not {status, body, headers}: is the endpoint registered?")
    status = _status(answer["status"])
    headers = _header_pairs(answer.get("headers"))
    body, content_type = _body(answer.get("body"))
    if not any(name.lower() == "content-type" for name, _ in headers) and (
        body or answer.get("body") is not None
    ):
        headers.append(("Content-Type", content_type))
    return Reply(status, headers, body)
