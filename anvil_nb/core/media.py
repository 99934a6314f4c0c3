"""Media: binary data with a content type and an optional name.

``Media`` is the abstract interface (the same as ``anvil.Media``): ``content_type``, ``name``,
``length``, ``url`` and ``get_bytes()``. ``BlobMedia`` holds its bytes in memory.

On the wire a Media object is a ``DataMedia`` entry in the message's ``objects`` list; its
bytes follow in chunks (PROTOCOL.md §5). Media is copied on every crossing like every other
value: what a callable receives is a new ``BlobMedia`` with the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["BlobMedia", "LazyMedia", "Media"]


class Media:
    """Binary data with a content type. Subclasses implement :meth:`get_bytes`."""

    @property
    def content_type(self) -> str:
        """The MIME type, e.g. ``"text/plain"``."""
        raise NotImplementedError

    @property
    def name(self) -> str | None:
        """The file name, if any."""
        return None

    @property
    def url(self) -> str | None:
        """A URL that serves the data, if there is one."""
        return None

    @property
    def length(self) -> int:
        """The size in bytes."""
        return len(self.get_bytes())

    def get_bytes(self) -> bytes:
        """Return the content as bytes."""
        raise NotImplementedError

    def get_url(self, download: bool = True) -> str | None:  # noqa: ARG002 - Anvil's signature
        """A URL for the data, or ``None`` (in-memory media has none)."""
        return self.url

    def get_content_type(self) -> str:
        """Anvil's older spelling of :attr:`content_type`."""
        return self.content_type

    def get_length(self) -> int:
        """Anvil's older spelling of :attr:`length`."""
        return self.length

    def get_name(self) -> str | None:
        """Anvil's older spelling of :attr:`name`."""
        return self.name

    def __repr__(self) -> str:
        name = f", name={self.name!r}" if self.name else ""
        return f"<{type(self).__name__} {self.content_type!r}, {self.length} bytes{name}>"


class BlobMedia(Media):
    """Media whose bytes are held in memory.

    Parameters
    ----------
    content_type : str
        The MIME type.
    content : bytes
        The data (a ``str`` is encoded as UTF-8).
    name : str, optional
        A file name.

    Examples
    --------
    >>> m = BlobMedia("text/plain", b"hello", name="h.txt")
    >>> m.get_bytes(), m.length, m.name
    (b'hello', 5, 'h.txt')
    """

    __slots__ = ("_content", "_content_type", "_name")

    def __init__(
        self, content_type: str, content: bytes | bytearray | str, name: str | None = None
    ):
        if isinstance(content, str):
            content = content.encode("utf-8")
        if not isinstance(content, (bytes, bytearray, memoryview)):
            raise TypeError(f"BlobMedia content must be bytes, not {type(content).__name__}")
        if not isinstance(content_type, str):
            raise TypeError(
                f"BlobMedia content_type must be a str, not {type(content_type).__name__}"
            )
        self._content_type = content_type
        self._content = bytes(content)
        self._name = name

    @property
    def content_type(self) -> str:  # noqa: D102
        return self._content_type

    @property
    def name(self) -> str | None:  # noqa: D102
        return self._name

    @property
    def length(self) -> int:  # noqa: D102
        return len(self._content)

    def get_bytes(self) -> bytes:  # noqa: D102
        return self._content

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlobMedia):
            return NotImplemented
        return (self._content_type, self._content, self._name) == (
            other._content_type,
            other._content,
            other._name,
        )

    __hash__ = None  # type: ignore[assignment]


class LazyMedia(Media):
    """Media that an Anvil App Server serves on request (``LazyMedia`` on the wire).

    anvil_nb hosts never create these; they arrive only from an App Server. The spec is kept
    exactly as received and sent back unchanged. *fetch* gets the bytes over the connection
    the media came by (the client that rebuilt it passes its own).
    """

    def __init__(
        self, spec: dict[str, Any], fetch: Callable[[dict[str, Any]], Media] | None = None
    ):
        self._spec = {k: v for k, v in spec.items() if k != "path"}
        self._fetch = fetch

    @property
    def content_type(self) -> str:  # noqa: D102
        return str(self._spec.get("mime-type", "application/octet-stream"))

    @property
    def name(self) -> str | None:  # noqa: D102
        return self._spec.get("name")

    @property
    def length(self) -> int:  # noqa: D102
        return int(self._spec.get("length") or 0)

    def get_bytes(self) -> bytes:
        """Fetch the bytes from the host (``anvil.private.fetch_lazy_media``)."""
        if self._fetch is None:
            raise RuntimeError(
                f"{self!r} came by no connection, so there is nowhere to fetch it from"
            )
        return self._fetch(self._spec).get_bytes()
