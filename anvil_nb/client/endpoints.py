"""HTTP endpoints on the provider's side: ``@server.http_endpoint`` and ``server.request``.

An endpoint is registered as ``http:`` + its path with each ``:name`` segment made a group
(the real client's names: PROTOCOL.md §2). The host calls it with the request's parts as
keyword arguments; the wrapper made here does what the real client's does — CORS preflights,
405 for other methods, HTTP Basic authentication against the app's users, the session of a
cross-site request — then calls the function with the path, query and form parameters as
keyword arguments and :data:`request` filled in, and answers ``{"status", "body", "headers"}``.

Where the real client's wrapper is terse, this one says what was wrong (every 401 and 405 body
names the reason), and it answers a CORS preflight before asking for credentials (browsers
send none with one).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from anvil_nb.client.client import current_call
from anvil_nb.core.errors import AnvilError

__all__ = [
    "HttpHeaders",
    "HttpRequest",
    "HttpResponse",
    "endpoint_name",
    "make_endpoint",
    "request",
]

log = logging.getLogger("anvil_nb.endpoints")

#: The realm of every ``WWW-Authenticate`` challenge.
REALM = 'Basic realm="anvil_nb app"'

_PARAM = re.compile(r":([^/]*)")


def endpoint_name(path: str, prefix: str = "http") -> tuple[str, list[str]]:
    """The registration name of an endpoint at *path*, and its parameter names in order:
    ``endpoint_name("/books/:id") == ("http:/books/([^/]*)", ["id"])``.
    """
    if not isinstance(path, str):
        raise TypeError(f"An endpoint's path must be a str, not {type(path).__name__}")
    names: list[str] = []

    def group(match: re.Match[str]) -> str:
        names.append(match.group(1))
        return "([^/]*)"

    return f"{prefix}:{_PARAM.sub(group, path)}", names


class HttpHeaders:
    """The headers of an :class:`HttpResponse`: names case-insensitive, repeats with :meth:`add`."""

    def __init__(self, headers: dict[str, str] | HttpHeaders | None = None):
        if isinstance(headers, HttpHeaders):
            self._pairs: list[tuple[str, str]] = list(headers._pairs)
            return
        if headers is not None and not isinstance(headers, dict):
            raise TypeError("headers must be a dict (or HttpHeaders)")
        self._pairs = [(str(k).lower(), v) for k, v in (headers or {}).items()]

    def __setitem__(self, name: str, value: str) -> None:
        del self[name]
        self.add(name, value)

    def __getitem__(self, name: str) -> str:
        key = name.lower()
        for k, v in self._pairs:
            if k == key:
                return v
        raise KeyError(name)

    def __delitem__(self, name: str) -> None:
        key = name.lower()
        self._pairs = [(k, v) for k, v in self._pairs if k != key]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(k == name.lower() for k, _ in self._pairs)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(k for k, _ in self._pairs))

    def add(self, name: str, value: str) -> None:
        """Add a header, keeping others of that name (``Set-Cookie`` twice, say)."""
        self._pairs.append((name.lower(), value))

    def items(self) -> list[tuple[str, str]]:
        """Every header, repeats included, in order."""
        return list(self._pairs)

    def __repr__(self) -> str:
        return f"HttpHeaders({self._pairs!r})"


class HttpResponse:
    """What an endpoint may return to choose its status and headers:
    ``HttpResponse(201, {"id": 7}, {"Location": "/books/7"})``. The body renders as the
    return value of an endpoint does (a string as text, a Media as itself, else JSON).
    """

    def __init__(self, status: int = 200, body: Any = "", headers: dict[str, str] | None = None):
        self.status = status
        self.body = body
        self.headers = headers  # type: ignore[assignment]

    @property
    def headers(self) -> HttpHeaders:
        """The response's headers (assign a dict to replace them)."""
        return self._headers

    @headers.setter
    def headers(self, value: dict[str, str] | HttpHeaders | None) -> None:
        self._headers = HttpHeaders(value)

    def __repr__(self) -> str:
        return f"HttpResponse({self.status}, {self.body!r}, {self.headers!r})"


class HttpRequest:
    """The HTTP request an endpoint is serving: ``server.request`` during an endpoint call."""

    def __init__(self, **fields: Any):
        #: The path after ``_/api`` (``/books/42``).
        self.path: str = fields.get("path", "")
        self.method: str = fields.get("method", "GET")
        self.query_params: dict[str, str] = fields.get("query_params") or {}
        self.form_params: dict[str, str] = fields.get("form_params") or {}
        #: The ``Origin`` header, or ``None``.
        self.origin: str | None = fields.get("origin")
        #: Every header, names in lower case.
        self.headers: dict[str, str] = fields.get("headers") or {}
        self.remote_address: str | None = fields.get("remote_address")
        #: The body as a Media, or ``None``.
        self.body: Any = fields.get("body")
        self.username: str | None = fields.get("username")
        self.password: str | None = fields.get("password")
        #: The logged-in user (with ``authenticate_users``, or a session's login), or ``None``.
        self.user: Any = fields.get("user")

    @functools.cached_property
    def body_json(self) -> Any:
        """The body parsed as JSON when it is declared ``application/json``; else ``None``."""
        content_type = self.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if self.body is None or content_type != "application/json":
            return None
        return json.loads(self.body.get_bytes())

    def __repr__(self) -> str:
        return f"<HttpRequest {self.method} {self.path}>"


class _RequestProxy:
    """``server.request``: the request of the endpoint call being served."""

    def _request(self) -> HttpRequest:
        state = current_call()
        found = getattr(state, "request", None)
        if found is None:
            raise RuntimeError("server.request is only available inside an HTTP endpoint call")
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request(), name)

    def __repr__(self) -> str:
        state = current_call()
        found = getattr(state, "request", None)
        return repr(found) if found is not None else "<server.request (outside an endpoint call)>"


#: The request of the endpoint call being served (attributes raise outside one).
request: Any = _RequestProxy()


def _unauthorized(why: str) -> dict[str, Any]:
    return {"status": 401, "body": f"Unauthorized: {why}", "headers": {"WWW-Authenticate": REALM}}


def _cors_headers(enable_cors: bool | str, request_headers: dict[str, str]) -> dict[str, str]:
    if not enable_cors:
        return {}
    allow = ["content-type"]
    asked = request_headers.get("access-control-request-headers", "")
    allow += [h for h in (x.strip().lower() for x in asked.split(",")) if h and h not in allow]
    return {
        "Access-Control-Allow-Origin": enable_cors if isinstance(enable_cors, str) else "*",
        "Access-Control-Allow-Headers": ", ".join(allow),
    }


def _call_host(name: str, *args: Any, **kwargs: Any) -> Any:
    state = current_call()
    if state is None:
        raise RuntimeError(f"{name} is only available inside a server call")
    return state.client.call(name, *args, **kwargs)


def _user_of(
    authenticate_users: bool, require_credentials: bool, username: str | None, password: str | None
) -> tuple[Any, dict[str, Any] | None]:
    """The request's user, or the 401 to answer instead."""
    if authenticate_users:
        user = _call_host("anvil.private.users.get_current_user")
        if user is not None:
            return user, None
        if username is None or password is None:
            return None, _unauthorized("this endpoint needs a username and password (HTTP Basic)")
        try:
            return _call_host("anvil.private.users.login_with_email", username, password), None
        except AnvilError as exc:
            return None, _unauthorized(str(exc) or "wrong username or password")
    if require_credentials and (username is None or password is None):
        return None, _unauthorized("this endpoint needs a username and password (HTTP Basic)")
    return None, None


def _switch_session() -> None:
    """Move this call to the cookie session of its cross-site request, if it has one."""
    state = current_call()
    if state is None:
        return
    blob = _call_host("anvil.private.switch_session!")
    state.replace_session(blob=blob if isinstance(blob, dict) else {"session": {}, "objects": []})


@dataclass(frozen=True)
class _Endpoint:
    """One endpoint's options, and what it does with a request before and after the function."""

    fn: Callable[..., Any]
    pattern: re.Pattern[str]
    params: list[str]
    methods: list[str]
    authenticate_users: bool
    require_credentials: bool
    cross_site_session: bool
    enable_cors: bool | str
    require_user: Any

    def serve(self, method: str, path: str, request: HttpRequest) -> dict[str, Any]:
        """The answer to *request* (``{"status", "body", "headers"}``)."""
        cors = _cors_headers(self.enable_cors, request.headers)
        if method not in self.methods:
            if method == "OPTIONS" and self.enable_cors:
                return {"status": 200, "body": "", "headers": cors}
            return {
                "status": 405,
                "body": f"Method {method} not allowed: this endpoint serves {', '.join(self.methods)}",
                "headers": {"Allow": ", ".join(self.methods)},
            }
        if self.cross_site_session:
            _switch_session()
        refusal = self._authorise(request)
        if refusal is not None:
            return refusal
        state = current_call()
        if state is not None:
            state.request = request
        kwargs = {**request.form_params, **request.query_params}
        match = self.pattern.fullmatch(path)
        if match is not None:
            kwargs.update(zip(self.params, match.groups(), strict=True))
        try:
            result = self.fn(**kwargs)
        except Exception:
            # The client gets a bare 500; what went wrong is told here and in the call log.
            log.exception("HTTP endpoint %s %s failed", method, path)
            raise
        if isinstance(result, HttpResponse):
            pairs = result.headers.items()
            have = {k for k, _ in pairs}
            pairs += [(k, v) for k, v in cors.items() if k.lower() not in have]
            return {
                "status": result.status,
                "body": result.body,
                "headers": [list(p) for p in pairs],
            }
        return {"status": 200, "body": result, "headers": cors}

    def _authorise(self, request: HttpRequest) -> dict[str, Any] | None:
        """Set ``request.user``; the 401 or 403 to answer instead, if any."""
        user, refusal = _user_of(
            self.authenticate_users, self.require_credentials, request.username, request.password
        )
        if refusal is not None:
            return refusal
        if self.require_user:
            user = user or _call_host("anvil.private.users.get_current_user")
            if user is None:
                return _unauthorized("you must be logged in")
            if self.require_user is not True and not self.require_user(user):
                return {
                    "status": 403,
                    "body": "Forbidden: this user may not use this endpoint",
                    "headers": {},
                }
        request.user = user
        return None


def make_endpoint(
    fn: Callable[..., Any],
    path: str,
    *,
    methods: list[str] | tuple[str, ...] | None = None,
    authenticate_users: bool = False,
    require_credentials: bool = False,
    cross_site_session: bool = False,
    enable_cors: bool | str = False,
    require_user: Any = None,
    prefix: str = "http",
) -> tuple[str, Callable[..., Any]]:
    """The registration name and the wrapper that serves *fn* as an endpoint at *path*."""
    name, params = endpoint_name(path, prefix)
    spec = _Endpoint(
        fn, re.compile(name.split(":", 1)[1]), params,
        [m.upper() for m in (methods if methods is not None else ("GET", "POST"))],
        authenticate_users, require_credentials, cross_site_session, enable_cors, require_user,
    )  # fmt: skip

    @functools.wraps(fn)
    def endpoint(
        method: str, path: str, query_params: dict[str, str], form_params: dict[str, str],
        origin: str | None, headers: dict[str, str], remote_address: str | None, body: Any,
        username: str | None, password: str | None, **_more: Any,
    ) -> dict[str, Any]:  # fmt: skip
        request = HttpRequest(
            method=method, path=path, query_params=query_params, form_params=form_params,
            origin=origin, headers=headers, remote_address=remote_address, body=body,
            username=username, password=password,
        )  # fmt: skip
        return spec.serve(method, path, request)

    return name, endpoint
