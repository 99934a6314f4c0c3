"""Shared helpers for the wire tests.

``assert_same(expected, actual)`` compares a value with what came back from the wire: it is
stricter than ``==`` (types must match, datetimes must keep their UTC offset, portable objects
are compared attribute by attribute) and looser only where the protocol says so (a tuple
travels as a list, NaN arrives as NaN). ``cross(values)`` sends values across the wire the way
a peer would: serialise, encode to JSON bytes with orjson, decode, deserialise.

Every test leaves the portable-class registry as it found it, so tests can register classes
under their own names without leaking them into other tests.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import orjson
import pytest

from anvil_nb import portable
from anvil_nb.capability import Capability
from anvil_nb.liveobject import LiveObjectProxy
from anvil_nb.media import BlobMedia
from anvil_nb.serialise import deserialise, serialise


def _assert_same(expected: Any, actual: Any, where: str = "value") -> None:
    if isinstance(expected, (list, tuple)):
        # Tuples travel as lists; what arrives is always a list.
        assert type(actual) is list, f"{where}: expected a list, got {actual!r}"
        assert len(actual) == len(expected), f"{where}: {actual!r} != {expected!r}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            _assert_same(e, a, f"{where}[{i}]")
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
            _assert_same(expected[k], actual[k], f"{where}[{k!r}]")
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
        _assert_same(vars(expected), vars(actual), f"{where}.__dict__")
    else:
        # str, int, bool, None, date: plain equality (types already checked).
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def _cross(values: dict[str, Any], *, via_json: bool = True, **serialise_kw: Any) -> dict[str, Any]:
    encoded = serialise(values, **serialise_kw)
    message = encoded.message
    if via_json:
        message = orjson.loads(orjson.dumps(message))
    media = {media_id: m.get_bytes() for media_id, m in encoded.media}
    deserialise(message, media=media)
    assert "objects" not in message
    assert "vt_global" not in message
    return message


@pytest.fixture(scope="session")
def assert_same():
    """``assert_same(expected, actual)``: *actual* is what *expected* becomes on the far side."""
    return _assert_same


@pytest.fixture(scope="session")
def cross():
    """``cross(values, via_json=True, **serialise_kw)``: the message as the receiver rebuilds it."""
    return _cross


@pytest.fixture(autouse=True)
def _restore_portable_registry():
    before = portable.registered_names()
    yield
    after = portable.registered_names()
    for name, cls in after.items():
        if before.get(name) is not cls:
            portable.unregister(name)
    for name, cls in before.items():
        if portable.class_for_name(name) is not cls:
            portable.portable_class(cls, name)
