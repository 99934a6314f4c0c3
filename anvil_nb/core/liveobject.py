"""Live objects: server-side objects that clients reach through ``liveObjectCall``.

anvil_nb passes them through unchanged (a :class:`LiveObjectProxy` keeps the spec it arrived
with). Background tasks are the live objects the protocol uses today (PROTOCOL.md §8).
On the wire, ``methods`` is left out for later objects of the same backend in one message when
the list is the same; both directions remember the list per backend per message.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LiveObjectProxy"]


class LiveObjectProxy:
    """A live object's spec: ``backend``, ``id``, ``mac``, ``permissions``, ``methods``, ..."""

    __slots__ = ("_spec",)

    def __init__(self, spec: dict[str, Any]):
        self._spec = spec

    @property
    def backend(self) -> str:
        """The backend that serves this object."""
        return str(self._spec.get("backend"))

    @classmethod
    def _from_wire(cls, entry: dict[str, Any], known_methods: dict[str, Any]) -> LiveObjectProxy:
        spec = {k: v for k, v in entry.items() if k not in ("path", "type")}
        backend = spec.get("backend")
        if not isinstance(backend, str):
            raise TypeError("a LiveObject needs a string 'backend'")
        if spec.get("methods") is not None:
            known_methods[backend] = spec["methods"]
        else:
            spec["methods"] = known_methods.get(backend, [])
        if not isinstance(spec.get("itemCache", {}), dict):
            raise TypeError("a LiveObject's itemCache must be a dict")
        return cls(spec)

    def _to_wire(self, known_methods: dict[str, Any]) -> dict[str, Any]:
        entry = {"type": ["LiveObject"], **self._spec}
        entry.setdefault("itemCache", {})
        if known_methods.get(entry.get("backend")) == entry.get("methods"):
            entry.pop("methods", None)
        else:
            known_methods[entry.get("backend")] = entry.get("methods")
        return entry

    def __repr__(self) -> str:
        return f"<LiveObject {self._spec.get('backend')} {self._spec.get('id')!r}>"
