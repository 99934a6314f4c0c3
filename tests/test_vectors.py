"""anvil_nb's serialiser against wire vectors recorded from the real anvil-uplink 0.7.0 client.

Each vector in ``shared/vectors/uplink-0.7.0.json`` is a Python expression and the client's
serialisation of ``{'id': 'v1', 'response': <expr>}``. Both directions are checked:

* write: anvil_nb produces the same body and the same ``objects`` entries. The entries are
  compared as a multiset, because the order is free within what PROTOCOL.md §4 allows (a
  portable object's nested entries before its own ``ValueType`` entry; ``vt_global`` first).
* read: anvil_nb rebuilds the original value from the client's wire form.

The ``errors`` vectors must raise ``SerializationError`` with the client's exact message.
"""

from __future__ import annotations

import datetime
import itertools
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from support.wire import assert_same

from anvil_nb.core import portable
from anvil_nb.core.capability import Capability
from anvil_nb.core.errors import SerializationError
from anvil_nb.core.serialise import deserialise, serialise
from anvil_nb.media import BlobMedia

_HERE = Path(__file__).resolve()
_CANDIDATES = (
    _HERE.parents[2] / "shared" / "vectors" / "uplink-0.7.0.json",
    _HERE.parents[1] / ".." / "shared" / "vectors" / "uplink-0.7.0.json",
)
VECTORS_FILE = next((p for p in _CANDIDATES if p.is_file()), None)
if VECTORS_FILE is None:
    pytest.skip(
        "wire vectors not found; looked for " + " and ".join(str(p) for p in _CANDIDATES),
        allow_module_level=True,
    )

DATA = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))
VECTORS = DATA["vectors"]
ERRORS = DATA["errors"]
MEDIA_CONTENT = {"m0": b"hello"}  # the bytes of the one media vector, sent beside the message


@pytest.fixture(scope="module")
def namespace():
    """The names the vectors' expressions use, with the preamble's classes registered."""
    ns: dict[str, Any] = {"__name__": "vectors_preamble", "portable_class": portable.portable_class}
    before = portable.registered_names()
    exec(DATA["preamble"], ns)
    added = portable.registered_names().keys() - before.keys()
    assert added == {"vec.Point", "vec.Pair"}
    ns.update(
        dt=datetime,
        anvil=SimpleNamespace(server=SimpleNamespace(Capability=Capability), BlobMedia=BlobMedia),
    )
    yield ns
    for name in added:
        portable.unregister(name)


def media_ids():
    """A ``new_media_id`` that gives ``m0``, ``m1``, ... like the vectors' client did."""
    counter = itertools.count()
    return lambda: f"m{next(counter)}"


def canonical(value: Any) -> str:
    """JSON with sorted keys; unlike ``==`` it tells ``1`` from ``1.0`` and ``True``."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def assert_order_allowed(objects: list[dict[str, Any]]) -> None:
    """PROTOCOL.md §4: ``vt_global`` entries first; children before their ``ValueType`` entry."""
    paths = [tuple(entry["path"]) for entry in objects]
    in_global = [p[0] == "vt_global" for p in paths]
    assert in_global == sorted(in_global, reverse=True), f"vt_global must come first: {paths}"
    for i, entry in enumerate(objects):
        if entry["type"][0] != "ValueType":
            continue
        parent = paths[i]
        for j, p in enumerate(paths):
            if len(p) > len(parent) and p[: len(parent)] == parent:
                assert j < i, f"the entry at {list(p)} must precede its parent's at {list(parent)}"


def test_order_check_refuses_a_parent_before_its_child():
    """The ordering helper itself must be able to fail."""
    child = {"type": ["Date"], "value": "2020-01-01", "path": ["response", "x"]}
    parent = {"type": ["ValueType"], "typeName": "vec.Point", "path": ["response"]}
    glob = {"type": ["Date"], "value": "2020-01-01", "path": ["vt_global", 1]}
    assert_order_allowed([glob, child, parent])
    with pytest.raises(AssertionError):
        assert_order_allowed([parent, child])
    with pytest.raises(AssertionError):
        assert_order_allowed([child, glob, parent])


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_serialise_writes_what_the_real_client_writes(vector, namespace):
    value = eval(vector["expr"], namespace)
    wire = vector["wire"]

    encoded = serialise({"response": value}, new_media_id=media_ids())
    message = {"id": "v1", **encoded.message}

    assert message.keys() == wire.keys()
    assert message["response"] == wire["response"]
    assert canonical(message["response"]) == canonical(wire["response"])
    assert Counter(map(canonical, message["objects"])) == Counter(map(canonical, wire["objects"]))
    assert_order_allowed(message["objects"])
    if isinstance(value, BlobMedia):
        assert encoded.media == [("m0", value)]
        assert encoded.media[0][1] is value
    else:
        assert encoded.media == []
    assert encoded.capabilities == ([value] if isinstance(value, Capability) else [])


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_deserialise_rebuilds_what_the_real_client_sent(vector, namespace):
    original = eval(vector["expr"], namespace)
    message = orjson.loads(orjson.dumps(vector["wire"]))

    deserialise(message, media=MEDIA_CONTENT)

    assert message.keys() == {"id", "response"}
    assert message["id"] == "v1"
    assert_same(original, message["response"])


@pytest.mark.parametrize("vector", ERRORS, ids=[v["name"] for v in ERRORS])
def test_serialise_refuses_what_the_real_client_refuses(vector, namespace):
    assert vector["error"] == "SerializationError"
    value = eval(vector["expr"], namespace)

    with pytest.raises(SerializationError) as caught:
        serialise({"response": value})

    assert str(caught.value) == vector["message"]
