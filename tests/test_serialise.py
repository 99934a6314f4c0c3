"""Round trips and refusals of the wire serialiser (PROTOCOL.md §4).

A property test sends arbitrary nestings of every plain value type through ``serialise``,
orjson and ``deserialise`` and checks that the same value comes back. The example tests pin the
edges: the 32-bit boundary of ``Long``, the fixed ``DateTime`` layout, naive datetimes, enum
and numpy values, media, live objects, and every way a value or a received message can be
refused (always with ``SerializationError``, never anything else).
"""

from __future__ import annotations

import collections
import datetime as dt
import enum
import math
import re
import time
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.wire import assert_same, cross, unique_portable_names

from anvil_nb.core.errors import SerializationError
from anvil_nb.core.liveobject import LiveObjectProxy
from anvil_nb.core.portable import SerializationInfo, portable_class, unregister
from anvil_nb.core.serialise import MAX_DEPTH, deserialise, serialise
from anvil_nb.media import BlobMedia

DATETIME_LAYOUT = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{6}[+-]\d{4}")
INT_LIMIT = 2147483647


class Box:
    """A portable class for the property test; registered by the module fixture below."""

    def __init__(self, x, y):
        self.x = x
        self.y = y


BOX_NAME = "tests.test_serialise.Box"


@pytest.fixture(autouse=True, scope="module")
def _box_is_portable():
    portable_class(Box, BOX_NAME)
    yield
    unregister(BOX_NAME)


unique_name = pytest.fixture(name="unique_name")(unique_portable_names)


def tz(minutes: int) -> dt.timezone:
    return dt.timezone(dt.timedelta(minutes=minutes))


def nested_lists(depth: int) -> Any:
    value = None
    for _ in range(depth):
        value = [value]
    return value


def nested_dicts(depth: int) -> Any:
    value = None
    for _ in range(depth):
        value = {"k": value}
    return value


def nested_boxes(depth: int) -> Any:
    value = None
    for _ in range(depth):
        value = Box(value, None)
    return value


def value_at(message: dict[str, Any], path: list[Any]) -> Any:
    value: Any = message
    for key in path:
        value = value[key]
    return value


def assert_wire_shape(message: dict[str, Any]) -> None:
    """The body is plain JSON the real client reads; each entry's place in the body is null."""

    def walk(v: Any, where: list[Any]) -> None:
        if isinstance(v, dict):
            for k, item in v.items():
                assert type(k) is str, f"non-str key {k!r} at {where}"
                walk(item, [*where, k])
        elif isinstance(v, list):
            for i, item in enumerate(v):
                walk(item, [*where, i])
        elif type(v) is int:
            assert -INT_LIMIT <= v <= INT_LIMIT, f"{v} at {where} should be a Long entry"
        elif type(v) is float:
            assert math.isfinite(v), f"{v} at {where} should be a Float entry"
        else:
            assert v is None or type(v) in (str, bool), f"{v!r} at {where} is not JSON"

    objects = message["objects"]
    walk({k: v for k, v in message.items() if k != "objects"}, [])
    for entry in objects:
        if entry["type"] == ["DateTime"]:
            assert DATETIME_LAYOUT.fullmatch(entry["value"]), entry
        if entry["type"][0] != "ValueType":
            assert value_at(message, entry["path"]) is None, entry


# ---------------------------------------------------------------------------------------------
# Property: whatever can be sent comes back the same

OFFSETS = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(tz)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.sampled_from([INT_LIMIT, INT_LIMIT + 1, -INT_LIMIT, -INT_LIMIT - 1, 2**63, -(2**64)]),
    st.floats(),  # includes NaN, ±inf, -0.0 and subnormals
    st.text(),
    st.dates(),
    st.datetimes(timezones=OFFSETS),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
        st.builds(Box, children, children),
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(value=VALUES)
def test_any_supported_value_survives_serialise_json_and_deserialise(value):
    encoded = serialise({"response": value})
    assert_wire_shape(encoded.message)

    message = orjson.loads(orjson.dumps(encoded.message))
    deserialise(message)

    assert message.keys() == {"response"}
    assert_same(value, message["response"])


def test_assert_same_is_strict_about_types_offsets_and_copies():
    """The helper the property relies on must be able to fail."""
    utc_noon = dt.datetime(2020, 1, 1, 12, tzinfo=dt.timezone.utc)
    box = Box(1, 2)
    for expected, actual in [
        (1, 1.0),
        (1, True),
        (0.0, -0.0),
        (float("nan"), 0.0),
        ((1, 2), (1, 2)),
        (dt.date(2020, 1, 1), dt.datetime(2020, 1, 1)),
        (utc_noon, utc_noon.astimezone(tz(60))),
        (box, box),
        (box, Box(1, 3)),
    ]:
        with pytest.raises(AssertionError):
            assert_same(expected, actual)
    assert_same((1, [float("nan")]), [1, [float("nan")]])


# ---------------------------------------------------------------------------------------------
# Ints: the real client sends anything outside ±2147483647 as Long


@pytest.mark.parametrize("n", [INT_LIMIT, -INT_LIMIT, 0])
def test_ints_within_the_32_bit_limit_travel_as_plain_json(n):
    encoded = serialise({"response": n})

    assert encoded.message == {"response": n, "objects": []}


@pytest.mark.parametrize(
    "n",
    [INT_LIMIT + 1, -2147483648, -2147483649, 2**64, -(10**40)],
    ids=[
        "2147483648",
        "-2147483648 (Long, as the real client sends it)",
        "-2147483649",
        "2**64",
        "-10**40",
    ],
)
def test_ints_beyond_the_32_bit_limit_travel_as_long_entries(n):
    encoded = serialise({"response": n})

    assert encoded.message == {
        "response": None,
        "objects": [{"type": ["Long"], "value": str(n), "path": ["response"]}],
    }
    assert cross({"response": n})["response"] == n


def test_an_int_too_long_for_a_decimal_string_raises_serialization_error_naming_the_path():
    with pytest.raises(SerializationError, match=re.escape("msg['response'][1]")):
        serialise({"response": [0, 10**5000]})


BIG_INTS = {
    "4000 digits": 10**3999,
    "4001 digits": 10**4000,
    "4300 digits": 10**4299,
    "largest of 4300 digits": 10**4300 - 1,
    "negative, 4300 digits": -(10**4299),
    "negative, largest of 4300 digits": -(10**4300 - 1),
}


@pytest.mark.parametrize("n", BIG_INTS.values(), ids=BIG_INTS.keys())
def test_an_int_that_serialise_accepts_is_accepted_back(n):
    try:
        encoded = serialise({"response": n})
    except SerializationError:
        return  # refusing to send it is fine; sending what the receiver refuses is not
    message = orjson.loads(orjson.dumps(encoded.message))

    deserialise(message)

    assert message["response"] == n


def test_ints_of_4000_digits_are_sent():
    n = -(10**3999)

    assert cross({"response": n})["response"] == n


# ---------------------------------------------------------------------------------------------
# Dates and datetimes


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (dt.datetime(2024, 1, 31, 12, 30, 5, 123456, tz(60)), "2024-01-31 12:30:05.123456+0100"),
        (dt.datetime(2023, 6, 1, 0, 0, 0, 0, tz(-330)), "2023-06-01 00:00:00.000000-0530"),
        (dt.datetime(2023, 6, 1, 23, 59, 59, 999999, tz(330)), "2023-06-01 23:59:59.999999+0530"),
        (dt.datetime(2020, 2, 29, 1, 2, 3, 4, tz(345)), "2020-02-29 01:02:03.000004+0545"),
        (dt.datetime(2020, 1, 1, tzinfo=tz(-1)), "2020-01-01 00:00:00.000000-0001"),
        (dt.datetime(2020, 1, 1, tzinfo=tz(1439)), "2020-01-01 00:00:00.000000+2359"),
        (dt.datetime(2020, 1, 1, tzinfo=tz(-1439)), "2020-01-01 00:00:00.000000-2359"),
        (dt.datetime(1, 1, 1, tzinfo=dt.timezone.utc), "0001-01-01 00:00:00.000000+0000"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_datetimes_use_the_fixed_layout_and_keep_their_offset(value, wire):
    encoded = serialise({"response": value})

    assert encoded.message["objects"] == [
        {"type": ["DateTime"], "value": wire, "path": ["response"]}
    ]
    assert_same(value, cross({"response": value})["response"])


@pytest.fixture
def local_zone(monkeypatch):
    """Switch the process's local time zone (a POSIX TZ string needs no tz database)."""

    def use(posix_tz: str) -> None:
        monkeypatch.setenv("TZ", posix_tz)
        time.tzset()

    yield use
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize(
    ("posix_tz", "offset", "suffix"),
    [("IST-5:30", 330, "+0530"), ("NST+3:30", -210, "-0330"), ("UTC0", 0, "+0000")],
)
def test_a_naive_datetime_arrives_aware_with_the_local_offset_and_the_same_instant(
    local_zone, posix_tz, offset, suffix
):
    local_zone(posix_tz)
    naive = dt.datetime(2024, 1, 15, 12, 0, 0, 250)
    assert naive.astimezone().utcoffset() == dt.timedelta(minutes=offset)  # the zone took effect

    encoded = serialise({"response": naive})
    received = cross({"response": naive})["response"]

    assert encoded.message["objects"][0]["value"] == "2024-01-15 12:00:00.000250" + suffix
    assert received.utcoffset() == dt.timedelta(minutes=offset)
    assert received == naive.astimezone()
    assert received.replace(tzinfo=None) == naive


def test_a_date_is_not_mistaken_for_a_datetime():
    value = [dt.date(2024, 2, 29), dt.datetime(2024, 2, 29, tzinfo=dt.timezone.utc)]

    encoded = serialise({"response": value})

    assert [e["type"] for e in encoded.message["objects"]] == [["Date"], ["DateTime"]]
    assert_same(value, cross({"response": value})["response"])


# ---------------------------------------------------------------------------------------------
# Subclasses of plain types and numpy values


class Colour(str, enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


def test_str_and_int_enum_members_travel_as_their_plain_values():
    encoded = serialise({"response": [Colour.RED, Level.HIGH]})

    assert encoded.message == {"response": ["red", 3], "objects": []}
    assert [type(v) for v in encoded.message["response"]] == [str, int]


def test_a_str_enum_dict_key_travels_as_its_plain_value():
    encoded = serialise({"response": {Colour.RED: 1}})

    assert encoded.message == {"response": {"red": 1}, "objects": []}
    assert [type(k) for k in encoded.message["response"]] == [str]


def test_a_large_int_enum_member_still_becomes_a_long():
    big = enum.IntEnum("Big", {"HUGE": 2**40})

    encoded = serialise({"response": big.HUGE})

    assert encoded.message["objects"] == [
        {"type": ["Long"], "value": str(2**40), "path": ["response"]}
    ]


def test_numpy_scalars_and_arrays_become_plain_json():
    value = [np.int64(3), np.float32(1.5), np.arange(6).reshape(2, 3), np.bool_(True)]

    encoded = serialise({"response": value})

    assert encoded.message == {"response": [3, 1.5, [[0, 1, 2], [3, 4, 5]], True], "objects": []}
    body = encoded.message["response"]
    assert [type(body[0]), type(body[1]), type(body[2][1][2]), type(body[3])] == [
        int,
        float,
        int,
        bool,
    ]


Point = collections.namedtuple("Point", "x y")


class Row(list):
    pass


def test_a_namedtuple_and_a_list_subclass_travel_as_lists():
    # The real client checks isinstance(value, (list, tuple)), so it sends these as lists.
    value = [Point(1, dt.date(2024, 1, 1)), Row([2, 3]), collections.OrderedDict(a=4)]

    encoded = serialise({"response": value})

    assert encoded.message == {
        "response": [[1, None], [2, 3], {"a": 4}],
        "objects": [{"type": ["Date"], "value": "2024-01-01", "path": ["response", 0, 1]}],
    }
    assert [type(v) for v in encoded.message["response"]] == [list, list, dict]


# ---------------------------------------------------------------------------------------------
# Values that cannot be sent


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ({1: "a"}, "msg['response'][1]"),
        ({"a": [{(1, 2): 3}]}, "msg['response']['a'][0][(1, 2)]"),
        ({None: 1}, "msg['response'][None]"),
    ],
)
def test_a_non_str_dict_key_raises_naming_the_path(value, shown):
    with pytest.raises(SerializationError) as caught:
        serialise({"response": value})

    assert (
        str(caught.value)
        == f"Cannot serialize dictionaries with keys that aren't strings at {shown}"
    )


def test_an_unregistered_object_raises_naming_the_path():
    class Thing:
        pass

    with pytest.raises(SerializationError) as caught:
        serialise({"args": [1, {"k": Thing()}]})

    assert str(caught.value) == f"Cannot serialize {Thing} object at msg['args'][1]['k']"


def test_a_subclass_of_a_portable_class_that_is_not_registered_is_refused_saying_so(unique_name):
    @portable_class(unique_name("Base"))
    class Base:
        pass

    class Derived(Base):
        pass

    with pytest.raises(SerializationError) as caught:
        serialise({"args": [Derived()]})

    message = str(caught.value)
    assert "Derived" in message
    assert "not registered" in message
    assert message.endswith("at msg['args'][0]")


@pytest.mark.parametrize("build", [nested_lists, nested_dicts, nested_boxes])
@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 10_000])
def test_nesting_deeper_than_max_depth_raises_serialization_error_not_recursion_error(build, depth):
    value = build(depth)

    with pytest.raises(SerializationError, match="nested more than"):
        serialise({"response": value})


@pytest.mark.parametrize("build", [nested_lists, nested_dicts])
def test_nesting_max_depth_deep_is_sent_and_received(build):
    value = build(MAX_DEPTH)

    assert cross({"response": value})["response"] == value


def test_a_self_containing_list_is_refused_as_a_circular_reference():
    loop: list[Any] = [1]
    loop.append(loop)

    with pytest.raises(SerializationError) as caught:
        serialise({"response": {"x": loop}})

    assert str(caught.value) == "Cannot serialize a circular reference at msg['response']['x'][1]"


def test_a_self_containing_dict_is_refused_as_a_circular_reference():
    loop: dict[str, Any] = {}
    loop["me"] = loop

    with pytest.raises(SerializationError) as caught:
        serialise({"args": [loop]})

    assert str(caught.value) == "Cannot serialize a circular reference at msg['args'][0]['me']"


def test_a_self_containing_ordered_dict_is_refused_as_a_circular_reference():
    loop: collections.OrderedDict[str, Any] = collections.OrderedDict()
    loop["me"] = loop

    with pytest.raises(SerializationError) as caught:
        serialise({"args": [loop]})

    assert str(caught.value) == "Cannot serialize a circular reference at msg['args'][0]['me']"


@pytest.mark.parametrize("via_json", [True, False])
def test_one_list_referenced_twice_is_not_a_cycle_and_arrives_as_two_lists(via_json):
    shared = [1, 2]

    received = cross({"response": [shared, shared]}, via_json=via_json)["response"]

    assert received == [[1, 2], [1, 2]]
    assert received[0] is not received[1]
    assert received[0] is not shared


# ---------------------------------------------------------------------------------------------
# Media


def test_a_one_mebibyte_blob_media_travels_beside_the_message():
    content = bytes(range(256)) * 4096
    media = BlobMedia("application/octet-stream", content, name="big.bin")

    encoded = serialise({"response": media}, new_media_id=lambda: "m0")

    assert encoded.message == {
        "response": None,
        "objects": [
            {
                "type": ["DataMedia"],
                "id": "m0",
                "mime-type": "application/octet-stream",
                "name": "big.bin",
                "path": ["response"],
            }
        ],
    }
    assert encoded.media == [("m0", media)]
    message = orjson.loads(orjson.dumps(encoded.message))
    deserialise(message, media={"m0": content})
    assert len(message["response"].get_bytes()) == 1 << 20
    assert_same(media, message["response"])


def test_each_media_in_a_message_gets_its_own_id():
    a, b = BlobMedia("text/plain", b"a"), BlobMedia("text/plain", b"b")

    encoded = serialise({"args": [a, b]})

    ids = [entry["id"] for entry in encoded.message["objects"]]
    assert len(set(ids)) == 2
    assert encoded.media == [(ids[0], a), (ids[1], b)]


@pytest.mark.parametrize("media", [None, {}, {"other": b"x"}])
def test_a_data_media_entry_whose_content_did_not_arrive_raises(media):
    message = {
        "response": None,
        "objects": [
            {
                "type": ["DataMedia"],
                "id": "m0",
                "mime-type": "text/plain",
                "name": None,
                "path": ["response"],
            }
        ],
    }

    with pytest.raises(SerializationError, match="m0"):
        deserialise(message, media=media)


# ---------------------------------------------------------------------------------------------
# Malformed messages


def _entry(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"type": [type_name], "path": ["response"], **fields}


def _long_at(*path: Any) -> dict[str, Any]:
    return {"type": ["Long"], "path": list(path), "value": "1"}


def _live_entry(**fields: Any) -> dict[str, Any]:
    return _entry("LiveObject", backend="b", id="1", permissions=[], mac="m", **fields)


# Each case: (the decoded body under "response", the "objects" list).
MALFORMED = {
    "objects is a dict": (1, {"type": ["Long"]}),
    "objects is a string": (1, "objects"),
    "entry is not a dict": (1, [5]),
    "entry is a list": (1, [["Long"]]),
    "entry without path": (1, [{"type": ["Long"], "value": "1"}]),
    "entry with empty path": (1, [_long_at()]),
    "entry with type not a list": (1, [{"type": "Long", "path": ["response"]}]),
    "entry with an empty type list": (1, [{"type": [], "path": ["response"]}]),
    "type name a list": (1, [{"type": [["Long"]], "path": ["response"], "value": "1"}]),
    "type name a dict": (1, [{"type": [{}], "path": ["response"]}]),
    "path to a missing key": ({}, [_long_at("response", "x")]),
    "path to a missing root key": (1, [_long_at("args")]),
    "path through a string": ("abc", [_long_at("response", 0)]),
    "path through a number": (7, [_long_at("response", "x")]),
    "negative list index": ([1], [_long_at("response", -1)]),
    "list index out of range": ([1], [_long_at("response", 1)]),
    "str index into a list": ([1], [_long_at("response", "0")]),
    "int key into a dict": ({"0": 1}, [_long_at("response", 0)]),
    "bool index into a list": ([1], [_long_at("response", True)]),
    "unknown type name": (1, [_entry("Nope")]),
    "Long of 5000 digits": (1, [_entry("Long", value="7" * 5000)]),
    "Long not a number": (1, [_entry("Long", value="12abc")]),
    "Long a bool": (1, [_entry("Long", value=True)]),
    "Float not a name": (1, [_entry("Float", value="nan")]),
    "Float a list": (1, [_entry("Float", value=[1])]),
    "Date impossible": (1, [_entry("Date", value="2023-02-29")]),
    "Date not a string": (1, [_entry("Date", value=20230228)]),
    "DateTime words": (1, [_entry("DateTime", value="yesterday at noon")]),
    "DateTime month 13": (1, [_entry("DateTime", value="2020-13-01 00:00:00.000000+0000")]),
    "DateTime letters": (1, [_entry("DateTime", value="2020-01-01 00:00:00.abcdef+0000")]),
    "DateTime offset 24h": (1, [_entry("DateTime", value="2020-01-01 00:00:00.000000+2400")]),
    "DateTime a number": (1, [_entry("DateTime", value=1577836800)]),
    "Capability scope a string": (1, [_entry("Capability", scope="doc", mac=None)]),
    "Capability scope a dict": (1, [_entry("Capability", scope={"a": 1}, mac="m")]),
    "Capability no mac, scope _": (1, [_entry("Capability", scope=["_", "s"], mac=None)]),
    "Capability no mac, no scope": (1, [_entry("Capability", scope=[], mac=None)]),
    "Capability mac a number": (1, [_entry("Capability", scope=["a"], mac=5)]),
    "Capability narrow a string": (1, [_entry("Capability", scope=["a"], mac="m", narrow="b")]),
    "ValueType unknown typeName": ({}, [_entry("ValueType", typeName="no.Such")]),
    "ValueType without typeName": ({}, [_entry("ValueType")]),
    "ClassType unknown typeName": (None, [_entry("ClassType", typeName="no.Such")]),
    "LiveObject itemCache null": (None, [_live_entry(itemCache=None)]),
    "LiveObject without backend": (None, [_entry("LiveObject", id="1")]),
}


@pytest.mark.parametrize(("body", "objects"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_input_to_deserialise_raises_serialization_error_and_nothing_else(body, objects):
    with pytest.raises(SerializationError):
        deserialise({"response": body, "objects": objects}, media={})


def test_a_portable_class_whose_deserialize_fails_raises_serialization_error(unique_name):
    @portable_class(unique_name("Fussy"))
    class Fussy:
        def __deserialize__(self, data, info):
            raise KeyError(data)

    message = orjson.loads(orjson.dumps(serialise({"response": Fussy()}).message))

    with pytest.raises(SerializationError, match="Fussy"):
        deserialise(message)


# ---------------------------------------------------------------------------------------------
# Live objects


def _live(backend: str, obj_id: str, methods: list[str]) -> LiveObjectProxy:
    return LiveObjectProxy(
        {
            "backend": backend,
            "id": obj_id,
            "permissions": [],
            "mac": "mac-" + obj_id,
            "methods": methods,
            "itemCache": {},
        }
    )


def test_live_objects_of_one_backend_send_methods_once_and_all_arrive_with_them():
    methods = ["get_id", "is_running"]
    value = [
        _live("anvil.private.BackgroundTask", '"t1"', methods),
        _live("anvil.private.BackgroundTask", '"t2"', methods),
        _live("other.Backend", "x", ["ping"]),
    ]

    encoded = serialise({"response": value})
    entries = encoded.message["objects"]
    message = orjson.loads(orjson.dumps(encoded.message))
    deserialise(message)

    assert [e["type"] for e in entries] == [["LiveObject"]] * 3
    assert entries[0]["methods"] == methods
    assert "methods" not in entries[1]
    assert entries[2]["methods"] == ["ping"]
    assert_same(value, message["response"])


def test_a_live_object_in_shared_data_arrives_with_its_methods(unique_name):
    methods = ["get_id", "is_running"]

    @portable_class(unique_name("Holder"))
    class Holder:
        def __init__(self, task):
            self.task = task

        def __serialize__(self, info: SerializationInfo):
            info.shared_data()[0]["task"] = self.task
            return {}

        def __deserialize__(self, data, info: SerializationInfo):
            self.task = info.shared_data()[0]["task"]

    value = [
        _live("anvil.private.BackgroundTask", '"t1"', methods),
        Holder(_live("anvil.private.BackgroundTask", '"t2"', methods)),
    ]

    message = orjson.loads(orjson.dumps(serialise({"response": value}).message))
    deserialise(message)

    first, holder = message["response"]
    assert first._spec["methods"] == methods
    assert holder.task._spec["methods"] == methods
