"""Capabilities: unforgeable, narrowable permissions that travel with the data they guard.

A :class:`Capability` has a *scope*, a JSON list such as ``["doc", 42]``. Trusted code creates
one with ``Capability(scope)``; the host signs it with a MAC when it leaves for another peer and
checks the MAC when an untrusted peer sends it back. A holder can :meth:`~Capability.narrow`
it (append to the scope) but never widen it. The server side checks what it was given with
:func:`unwrap_capability`.

MACs (see :func:`sign_scope`) are HMAC-SHA256 over the canonical JSON of the scope, keyed by
the host's secret and bound to one session's secret: a capability minted for one session is
useless in another, and stops being valid when its session is reset or expires. Clients treat
MACs as opaque strings.

Updates: a callable that received a capability can ``send_update(x)``; when the call returns,
the update travels back to the caller that passed the capability in (and only to it), where the
caller's copy applies it. By default dict updates are merged and anything else replaces the
pending update; ``set_update_handler(apply, get)`` customises both ends.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["Capability", "scope_key", "sign_scope", "unwrap_capability", "verify_scope"]


class _Any:
    """The wildcard of :func:`unwrap_capability`: matches any value in that position."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Capability.ANY"


def _check_scope(scope: Any, what: str = "scope") -> list[Any]:
    """Return *scope* as plain JSON (tuples become lists), or raise TypeError naming the problem."""
    if not isinstance(scope, (list, tuple)):
        raise TypeError(f"The {what} of a Capability must be a list, not {type(scope).__name__}")
    return _plain_json(list(scope), what, 0)


_MAX_SCOPE_DEPTH = 32


def _plain_json(value: Any, what: str, depth: int) -> Any:
    if depth > _MAX_SCOPE_DEPTH:
        raise TypeError(
            f"The {what} of a Capability is nested more than {_MAX_SCOPE_DEPTH} levels deep"
        )
    t = type(value)
    if value is None or t in (str, bool, int):
        return value
    if t is float:
        if not math.isfinite(value):
            raise TypeError(f"The {what} of a Capability must be JSON data; {value!r} is not")
        return value
    if t in (list, tuple):
        return [_plain_json(v, what, depth + 1) for v in value]
    if t is dict:
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"The {what} of a Capability must be JSON data; key {k!r} is not a str"
                )
            out[k] = _plain_json(v, what, depth + 1)
        return out
    raise TypeError(f"The {what} of a Capability must be JSON data; {type(value).__name__} is not")


class Capability:
    """A permission to act on something, named by a scope.

    Parameters
    ----------
    scope : list
        A non-empty JSON list whose first element is not ``"_"`` (that prefix is reserved for
        capabilities the host mints).

    Examples
    --------
    >>> cap = Capability(["doc", 42])
    >>> cap.narrow(["page", 1]).scope
    ['doc', 42, 'page', 1]
    """

    #: Wildcard for :func:`unwrap_capability` patterns.
    ANY: _Any = _Any()

    __slots__ = (
        "__weakref__",
        "_apply_hook",
        "_get_hook",
        "_lock",
        "_mac",
        "_narrow",
        "_queued",
        "_scope",
        "_validity",
    )

    def __init__(self, scope: list[Any], mac: str | None = None, narrow: list[Any] | None = None):
        scope = _check_scope(scope)
        if mac is None:
            if not scope:
                raise ValueError("Cannot construct a Capability with an empty scope")
            if scope[0] == "_":
                raise ValueError(
                    "To construct a Capability from scratch, its scope cannot start with '_'"
                )
        self._scope = scope
        self._mac = mac
        self._narrow: list[Any] = _check_scope(narrow, "narrow argument") if narrow else []
        self._apply_hook: Callable[[Any], Any] | None = None
        self._get_hook: Callable[[], Any] | None = None
        self._queued: Any = {}
        self._lock = threading.Lock()
        #: Set by the runtime for capabilities that arrived signed: asks the host whether the
        #: MAC still holds for the current session.
        self._validity: Callable[[Capability], bool] | None = None

    @property
    def scope(self) -> list[Any]:
        """The full scope, including any narrowing."""
        return self._scope + self._narrow

    @property
    def is_valid(self) -> bool:
        """False once the session this capability was minted for has been reset or expired."""
        if self._mac is None or self._validity is None:
            return True
        return self._validity(self)

    def narrow(self, narrowing_suffix: list[Any]) -> Capability:
        """Return a new capability whose scope is this one's with *narrowing_suffix* appended."""
        suffix = _check_scope(narrowing_suffix, "narrow argument")
        cap = Capability.__new__(Capability)
        Capability.__init__(cap, self._scope, self._mac, self._narrow + suffix)
        cap._validity = self._validity
        return cap

    def set_update_handler(
        self, apply_update: Callable[[Any], Any] | None, get_update: Callable[[], Any] | None = None
    ) -> None:
        """Customise how updates are applied (*apply_update*) and collected (*get_update*)."""
        self._apply_hook = apply_update
        self._get_hook = get_update

    def send_update(self, update: Any) -> None:
        """Queue *update* for the caller that passed this capability in (applied locally too)."""
        if self._apply_hook is not None:
            self._apply_hook(update)
        if self._get_hook is None:
            with self._lock:
                if isinstance(update, dict):
                    if not isinstance(self._queued, dict):
                        self._queued = {}
                    self._queued.update(update)
                else:
                    self._queued = update

    # The caller side applies incoming updates exactly as send_update queues them.
    _apply_update = send_update

    def _take_update(self) -> Any:
        """The update to send back when the call returns, or ``None`` if there is none."""
        if self._get_hook is not None:
            return self._get_hook()
        with self._lock:
            update, self._queued = self._queued, {}
        return None if update == {} else update

    def __repr__(self) -> str:
        return f"<Capability:{self.scope!r}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Capability):
            return NotImplemented
        return self.scope == other.scope

    def __hash__(self) -> int:
        return hash(_freeze(self.scope))


def _freeze(value: Any) -> Any:
    """A hashable form of JSON data that is equal exactly when the data is (like ``==``)."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return frozenset((k, _freeze(v)) for k, v in value.items())
    return value


def unwrap_capability(capability: Capability, scope_pattern: list[Any]) -> list[Any]:
    """Check that *capability* is a Capability whose scope matches *scope_pattern*.

    To match, the scope must be at least as broad as the pattern (the same length or shorter)
    and hold the same values in the same positions, except where the pattern has
    :attr:`Capability.ANY`, which matches any value.

    Parameters
    ----------
    capability : Capability
        The capability to check.
    scope_pattern : list
        The required scope, possibly with ``Capability.ANY`` elements.

    Returns
    -------
    list
        The matched scope elements, as long as the pattern. Where the scope is broader than the
        pattern, the missing elements are ``None``.

    Raises
    ------
    TypeError
        *capability* is not a Capability, or *scope_pattern* is not a list.
    ValueError
        The scope is narrower than the pattern, or differs from it.

    Examples
    --------
    >>> unwrap_capability(Capability(["doc", 42]), ["doc", Capability.ANY, "page"])
    ['doc', 42, None]
    """
    if not isinstance(capability, Capability):
        raise TypeError(f"Not a valid Capability: found {type(capability).__name__}")
    if not isinstance(scope_pattern, list):
        raise TypeError(f"scope_pattern should be a list, not {type(scope_pattern).__name__}")
    scope = capability.scope
    if len(scope) > len(scope_pattern):
        raise ValueError(f"Capability is too narrow: required {scope_pattern!r}; got {scope!r}")
    matched: list[Any] = [None] * len(scope_pattern)
    for i, value in enumerate(scope):
        want = scope_pattern[i]
        if (
            want is Capability.ANY
            or value == want
            or (isinstance(want, tuple) and value == list(want))
        ):
            matched[i] = value
        else:
            raise ValueError(f"Incorrect Capability: required {scope_pattern!r}; got {scope!r}")
    return matched


# ---------------------------------------------------------------------------------------------
# MACs and update keys (pure functions; the host holds the secrets)


def canonical_scope(scope: list[Any]) -> bytes:
    """The bytes a MAC covers: compact JSON with dict keys sorted at every depth."""
    return json.dumps(scope, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def sign_scope(host_secret: bytes, session_secret: bytes, scope: list[Any]) -> str:
    """The MAC of *scope* for one session: HMAC-SHA256, URL-safe base64 without padding."""
    digest = hmac.new(
        host_secret, session_secret + b"\x00" + canonical_scope(scope), hashlib.sha256
    )
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode("ascii")


def verify_scope(host_secret: bytes, session_secret: bytes, scope: list[Any], mac: Any) -> bool:
    """True if *mac* is the MAC of *scope* for that session (constant-time comparison)."""
    if not isinstance(mac, str):
        return False
    try:
        expected = sign_scope(host_secret, session_secret, scope)
    except (TypeError, ValueError):
        return False
    return hmac.compare_digest(expected.encode("ascii"), mac.encode("utf-8", "replace"))


def scope_key(scope: list[Any]) -> str:
    """The ``capUpdates`` key of a scope: ``json.dumps`` with Python's default spacing."""
    return json.dumps(scope)


def normalise_scope_key(key: str) -> str | None:
    """Re-encode a ``capUpdates`` key the way :func:`scope_key` does; ``None`` if it is not JSON."""
    try:
        return json.dumps(json.loads(key))
    except (TypeError, ValueError):
        return None
