"""What one connection may cost the host: the bounds in one place, with their defaults.

Every placement (``anvil-nb serve``, the Jupyter extension, the embedded host) builds its host
and routes from one :class:`Limits`. The defaults suit a notebook host on one machine; each is
documented in ``docs/reliability.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_LIMITS", "Limits"]


@dataclass(frozen=True)
class Limits:
    """Per-connection bounds of a host.

    Attributes
    ----------
    max_frame_bytes : int
        The largest frame a connection may send or be sent (16 MiB, as on the App Server). A
        call or response whose relayed form would be larger fails that call alone.
    max_calls_in_flight : int
        Calls one connection may have waiting at once; more fail with ``QuotaExceededError``.
    max_queued_bytes : int
        Bytes written to a connection that it has not read yet. Past this bound the host stops
        reading from that connection, refuses its new calls and fails the responses that would
        grow its queue further (``QuotaExceededError``); other connections are unaffected.
    max_media_bytes : int
        Media bytes one connection may have arriving (not yet complete) at once.
    handshake_timeout : float
        Seconds a new WebSocket has to authenticate (send its key); then it gets a fatal error
        and is closed. On the standalone and embedded hosts' listener the same bound closes TCP
        connections that never finish their HTTP request (idle sockets, half-sent headers or
        bodies). ``0``: no bound.
    ping_interval, ping_timeout : float
        WebSocket keep-alive: a ping *ping_interval* seconds after the last answer, and a peer
        that within *ping_timeout* seconds neither answers it, nor sends anything, nor reads
        any of what waits for it, is declared lost at once (its callers get
        ``UplinkDisconnectedError``). A frozen peer is found within
        ``ping_interval + ping_timeout`` seconds (25 s by default). *ping_timeout* may be
        longer than *ping_interval*. ``ping_interval = 0``: no pings.
    accept_backoff : float
        Seconds the standalone and embedded hosts stop accepting after an accept error such as
        EMFILE (too many open files), instead of spinning. (Inside ``jupyter server`` the
        listener is Jupyter's.)
    log_interval : float
        A repeated warning is logged at most once per this many seconds (with a count).
    max_http_body_bytes : int
        The largest request body an HTTP endpoint accepts (16 MiB). A request that declares a
        larger one gets 413 from its headers alone, before any of it is read; a chunked body
        that grows past it gets 413 when it does.
    """

    max_frame_bytes: int = 16 * 1024 * 1024
    max_calls_in_flight: int = 1024
    max_queued_bytes: int = 32 * 1024 * 1024
    max_media_bytes: int = 256 * 1024 * 1024
    handshake_timeout: float = 10.0
    ping_interval: float = 10.0
    ping_timeout: float = 15.0
    accept_backoff: float = 0.5
    log_interval: float = 10.0
    max_http_body_bytes: int = 16 * 1024 * 1024


#: The bounds used when a placement sets none.
DEFAULT_LIMITS = Limits()
