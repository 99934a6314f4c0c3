"""Live objects: server-side objects that clients reach through ``liveObjectCall``.

anvil_nb passes them through unchanged (a :class:`LiveObjectProxy` keeps the spec it arrived
with). Background tasks (PROTOCOL.md §8) and users are the live objects anvil_nb uses. A user
is a row, as on Anvil: ``user["email"]`` reads its ``itemCache``, ``user.get_id()`` its id.
On the wire, ``methods`` is left out for later objects of the same backend in one message when
the list is the same; both directions remember the list per backend per message.
"""

from __future__ import annotations

import functools
import json
from typing import Any

__all__ = ["LiveObjectProxy"]


class LiveObjectProxy:
    """A live object's spec: ``backend``, ``id``, ``mac``, ``permissions``, ``methods``, ..."""

    __slots__ = ("_call", "_items", "_spec")

    def __init__(self, spec: dict[str, Any], items: dict[str, Any] | None = None):
        self._spec = spec
        #: The ``itemCache`` values, read (the spec keeps them as they travel).
        self._items = items if items is not None else {}
        #: How its methods are called (``call(spec, method, *args, **kwargs)``), when it came
        #: over a connection that can call them.
        self._call: Any = None

    def __getattr__(self, name: str) -> Any:
        # Its methods (``task.get_state()``), called on the host that made it.
        if name.startswith("_"):
            raise AttributeError(name)
        call = self._call
        if call is None or name not in (self._spec.get("methods") or ()):
            raise AttributeError(f"this {self._spec.get('backend')} has no method {name!r}")
        return functools.partial(call, self._spec, name)

    @property
    def backend(self) -> str:
        """The backend that serves this object."""
        return str(self._spec.get("backend"))

    def get_id(self) -> Any:
        """The object's id (a user row's is the user's id; a background task's is sent
        JSON-encoded, and is given here as it was made).
        """
        task_id = self._spec.get("id")
        if self._spec.get("backend") == "anvil.private.BackgroundTask" and isinstance(task_id, str):
            try:
                return json.loads(task_id)
            except ValueError:
                return task_id
        return task_id

    def __getitem__(self, key: str) -> Any:
        if key not in self._items:
            raise KeyError(f"{key!r}: this {self.backend} has no such column here")
        return self._items[key]

    def get(self, key: str, default: Any = None) -> Any:
        """A column's value, or *default*."""
        return self._items.get(key, default)

    def keys(self) -> list[str]:
        """The columns this object carries."""
        return list(self._items)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, LiveObjectProxy)
            and self._spec.get("backend") == other._spec.get("backend")
            and self._spec.get("id") == other._spec.get("id")
        )

    def __hash__(self) -> int:
        return hash((self._spec.get("backend"), str(self._spec.get("id"))))

    @classmethod
    def _from_wire(
        cls,
        entry: dict[str, Any],
        known_methods: dict[str, Any],
        items: dict[str, Any] | None = None,
    ) -> LiveObjectProxy:
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
        return cls(spec, items)

    def _to_wire(self, known_methods: dict[str, Any]) -> dict[str, Any]:
        entry = {"type": ["LiveObject"], **self._spec}
        entry.setdefault("itemCache", {})
        if known_methods.get(entry.get("backend")) == entry.get("methods"):
            entry.pop("methods", None)
        else:
            known_methods[entry.get("backend")] = entry.get("methods")
        return entry

    def __repr__(self) -> str:
        if self._spec.get("backend") == "anvil.tables.Row":
            return f"<Row {self._items!r}>"
        return f"<LiveObject {self._spec.get('backend')} {self._spec.get('id')!r}>"
