"""What crossing the wire does to a value (for ``test_vectors``, ``test_serialise``, ``test_portable``).

``assert_same(expected, actual)`` compares a value with what came back from the wire: it is
stricter than ``==`` (types must match, datetimes must keep their UTC offset, portable objects
are compared attribute by attribute) and looser only where the protocol says so (a tuple
travels as a list, NaN arrives as NaN). ``cross(values)`` sends values across the wire the way
a peer would: serialise, encode to JSON bytes with orjson, decode, deserialise.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Iterator
from typing import Any

import orjson

from anvil_nb.core import portable
from anvil_nb.core.capability import Capability
from anvil_nb.core.liveobject import LiveObjectProxy
from anvil_nb.core.serialise import deserialise, serialise
from anvil_nb.media import BlobMedia


def assert_same(expected: Any, actual: Any, where: str = "value") -> None:
    """Assert that *actual* is what *expected* becomes after crossing the wire."""
    if isinstance(expected, (list, tuple)):
        # Tuples travel as lists; what arrives is always a list.
        assert type(actual) is list, f"{where}: expected a list, got {actual!r}"
        assert len(actual) == len(expected), f"{where}: {actual!r} != {expected!r}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_same(e, a, f"{where}[{i}]")
        return
    if isinstance(expected, type):
        assert actual is expected, f"{where}: expected the class {expected!r}, got {actual!r}"
        return
    assert type(actual) is type(expected), (
        f"{where}: expected {type(expected).__name__} {expected!r}, "
        f"got {type(actual).__name__} {actual!r}"
    )
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), f"{where}: keys {list(actual)} != {list(expected)}"
        for k in expected:
            assert_same(expected[k], actual[k], f"{where}[{k!r}]")
    elif isinstance(expected, float):
        if math.isnan(expected):
            assert math.isnan(actual), f"{where}: expected NaN, got {actual!r}"
        else:
            assert actual == expected, f"{where}: {actual!r} != {expected!r}"
            assert math.copysign(1, actual) == math.copysign(1, expected), f"{where}: sign of zero"
    elif isinstance(expected, dt.datetime):
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"
        assert actual.utcoffset() == expected.utcoffset(), (
            f"{where}: offset {actual.utcoffset()!r} != {expected.utcoffset()!r}"
        )
    elif isinstance(expected, Capability):
        assert actual.scope == expected.scope, f"{where}: {actual.scope!r} != {expected.scope!r}"
        assert actual._mac == expected._mac, f"{where}: mac {actual._mac!r} != {expected._mac!r}"
    elif isinstance(expected, BlobMedia):
        assert (actual.content_type, actual.name) == (expected.content_type, expected.name), where
        assert actual.get_bytes() == expected.get_bytes(), f"{where}: media bytes differ"
    elif isinstance(expected, LiveObjectProxy):
        assert actual._spec == expected._spec, f"{where}: {actual._spec!r} != {expected._spec!r}"
    elif portable.name_of_class(type(expected)) is not None:
        assert actual is not expected, f"{where}: a portable object must arrive as a copy"
        assert_same(vars(expected), vars(actual), f"{where}.__dict__")
    else:
        # str, int, bool, None, date: plain equality (types already checked).
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def cross(values: dict[str, Any], *, via_json: bool = True, **serialise_kw: Any) -> dict[str, Any]:
    """The message as the receiver rebuilds it; ``via_json=False`` skips the JSON bytes."""
    encoded = serialise(values, **serialise_kw)
    message = encoded.message
    if via_json:
        message = orjson.loads(orjson.dumps(message))
    media = {media_id: m.get_bytes() for media_id, m in encoded.media}
    deserialise(message, media=media)
    assert "objects" not in message
    assert "vt_global" not in message
    return message


def unique_portable_names(request: Any) -> Iterator[Callable[[str], str]]:
    """Body of the ``unique_name`` fixture: ``unique_name(suffix)`` names a class after the test.

    Use it as ``unique_name = pytest.fixture(name="unique_name")(unique_portable_names)``.
    Teardown unregisters every portable class the test registered, under any name.
    """
    before = set(portable.registered_names())
    yield lambda suffix: f"tests.{request.node.name}.{suffix}"
    for name in set(portable.registered_names()) - before:
        portable.unregister(name)
