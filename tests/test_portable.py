"""Portable classes, following Anvil's "Writing Portable Classes" and "Custom serialisation" pages.

Each test plays both peers in one process: what one side serialises crosses the wire as JSON
bytes (or, for the copy rules, also without them, as a call inside one process would) and the
other side rebuilds it. Each test registers its classes under names of its own and forgets them
when it ends.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson
import pytest
from support.wire import assert_same, cross, unique_portable_names

from anvil_nb.core import portable
from anvil_nb.core.errors import SerializationError
from anvil_nb.core.portable import SerializationInfo, portable_class
from anvil_nb.core.serialise import deserialise, serialise

unique_name = pytest.fixture(name="unique_name")(unique_portable_names)


def wire(values: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """The message one side puts on the wire, as the other side decodes it."""
    return orjson.loads(orjson.dumps(serialise(values, **kw).message))


# ---------------------------------------------------------------------------------------------
# The Person example: passed in, returned, copied, __init__ not called on the receiving side


def test_a_person_passed_and_returned_arrives_as_a_new_object_without_init(unique_name):
    inits: list[str] = []

    @portable_class(unique_name("Person"))
    class Person:
        def __init__(self, name, age):
            inits.append(name)
            self.name = name
            self.age = age

    original = Person("Ada", 36)

    received = cross({"args": [original]})["args"][0]  # the server function's argument
    returned = cross({"response": received})["response"]  # what the caller gets back

    assert type(received) is Person
    assert type(returned) is Person
    assert received is not original
    assert returned is not received
    assert returned is not original
    assert vars(received) == {"name": "Ada", "age": 36}
    assert vars(returned) == {"name": "Ada", "age": 36}
    assert inits == ["Ada"]  # only the sender's constructor call


@pytest.mark.parametrize("via_json", [True, False], ids=["json", "in-process"])
def test_mutating_the_received_object_does_not_change_the_original(unique_name, via_json):
    @portable_class(unique_name("Person"))
    class Person:
        def __init__(self, name, tags):
            self.name = name
            self.tags = tags

    original = Person("Ada", ["math"])

    received = cross({"args": [original]}, via_json=via_json)["args"][0]
    received.name = "Grace"
    received.tags.append("navy")
    original.tags.append("engines")

    assert vars(original) == {"name": "Ada", "tags": ["math", "engines"]}
    assert vars(received) == {"name": "Grace", "tags": ["math", "navy"]}


@pytest.mark.parametrize("via_json", [True, False], ids=["json", "in-process"])
def test_two_attributes_sharing_a_dict_arrive_as_two_dicts(unique_name, via_json):
    @portable_class(unique_name("Pair"))
    class Pair:
        pass

    shared = {"k": 1}
    original = Pair()
    original.left = shared
    original.right = shared

    received = cross({"args": [original]}, via_json=via_json)["args"][0]

    assert received.left == received.right == {"k": 1}
    assert received.left is not received.right
    received.left["k"] = 2
    assert received.right == {"k": 1}
    assert shared == {"k": 1}


def test_a_circular_reference_between_portable_objects_is_refused_with_its_path(unique_name):
    @portable_class(unique_name("Person"))
    class Person:
        def __init__(self, name):
            self.name = name
            self.friend = None

    a, b = Person("a"), Person("b")
    a.friend = b
    b.friend = a

    with pytest.raises(SerializationError) as caught:
        serialise({"args": [a]})

    assert "msg['args'][0].friend.friend" in str(caught.value)


def test_nested_portable_objects_without_a_cycle_are_fine(unique_name):
    @portable_class(unique_name("Node"))
    class Node:
        def __init__(self, label, child=None):
            self.label = label
            self.child = child

    chain = Node("a", Node("b", Node("c", dt.date(2024, 1, 1))))

    assert_same(chain, cross({"response": chain})["response"])


# ---------------------------------------------------------------------------------------------
# Names


def test_a_unique_name_is_the_type_name_on_the_wire(unique_name):
    name = unique_name("my.Person")

    @portable_class(name)
    class Person:
        def __init__(self, name):
            self.name = name

    message = serialise({"args": [Person("Ada")]}).message

    assert message == {
        "args": [{"name": "Ada"}],
        "objects": [{"type": ["ValueType"], "path": ["args", 0], "typeName": name}],
    }


def test_the_receiver_needs_a_class_registered_under_the_same_name(unique_name):
    name = unique_name("my.Person")

    @portable_class(name)
    class Person:
        pass

    message = wire({"args": [Person()]})
    portable.unregister(name)  # the receiving side has no class of that name

    with pytest.raises(SerializationError) as caught:
        deserialise(message)

    assert name in str(caught.value)


def test_the_receiver_builds_whichever_class_is_registered_under_the_name(unique_name):
    name = unique_name("my.Person")

    @portable_class(name)
    class Sent:
        def __init__(self):
            self.n = 1

    message = wire({"args": [Sent()]})

    @portable_class(name)
    class Received:
        def total(self):
            return self.n + 1

    deserialise(message)

    assert type(message["args"][0]) is Received
    assert message["args"][0].total() == 2


def test_re_registering_a_name_replaces_the_old_class(unique_name):
    name = unique_name("Cell")

    @portable_class(name)
    class Cell:
        version = 1

    first = Cell

    @portable_class(name)
    class Cell:  # re-running the notebook cell that defines it
        version = 2

    assert portable.class_for_name(name) is Cell
    assert portable.name_of_class(first) is None
    message = wire({"response": Cell()})
    assert message["objects"][0]["typeName"] == name
    deserialise(message)
    assert type(message["response"]) is Cell
    assert message["response"].version == 2


@pytest.mark.usefixtures("unique_name")
def test_the_default_name_is_module_dot_qualname():
    @portable_class
    class Bare:
        pass

    @portable_class()
    class Called:
        pass

    message = serialise({"args": [Bare(), Called()]}).message

    prefix = f"{__name__}.test_the_default_name_is_module_dot_qualname.<locals>."
    assert [e["typeName"] for e in message["objects"]] == [prefix + "Bare", prefix + "Called"]
    assert portable.class_for_name(prefix + "Bare") is Bare


def test_the_class_itself_travels_as_class_type(unique_name):
    name = unique_name("Shape")

    @portable_class(name)
    class Shape:
        pass

    message = serialise({"response": {"cls": Shape}}).message

    assert message == {
        "response": {"cls": None},
        "objects": [{"type": ["ClassType"], "path": ["response", "cls"], "typeName": name}],
    }
    assert cross({"response": {"cls": Shape}})["response"]["cls"] is Shape


# ---------------------------------------------------------------------------------------------
# Custom serialisation


def test_custom_serialize_and_deserialize_shape_the_wire_and_rebuild_the_object(unique_name):
    name = unique_name("Person")

    @portable_class(name)
    class Person:
        def __init__(self, first_name, last_name):
            self.first_name = first_name
            self.last_name = last_name

        def get_full_name(self):
            return self.first_name + " " + self.last_name

        def __serialize__(self, global_data):
            return [self.first_name, self.last_name]

        def __deserialize__(self, data, global_data):
            self.__init__(data[0], data[1])

    message = serialise({"response": Person("John", "Smith")}).message

    assert message == {
        "response": ["John", "Smith"],
        "objects": [{"type": ["ValueType"], "path": ["response"], "typeName": name}],
    }
    received = cross({"response": Person("John", "Smith")})["response"]
    assert type(received) is Person
    assert received.get_full_name() == "John Smith"


def test_new_deserialized_is_used_instead_of_new_and_deserialize(unique_name):
    calls: list[str] = []

    @portable_class(unique_name("Colour"))
    class Colour:
        known: dict[str, Colour] = {}

        def __init__(self, name):
            self.name = name
            Colour.known[name] = self

        def __serialize__(self, info):
            return self.name

        def __deserialize__(self, data, info):
            calls.append("__deserialize__")

        @classmethod
        def __new_deserialized__(cls, data, info):
            calls.append(f"__new_deserialized__({data!r}, {type(info).__name__})")
            return cls.known[data]

    red = Colour("red")

    received = cross({"response": [red, red]})["response"]

    assert received[0] is red  # the very object __new_deserialized__ returned
    assert received[1] is red
    assert calls == ["__new_deserialized__('red', SerializationInfo)"] * 2


def _trust_probe_class(name: str, seen: list[tuple[str, bool]]):
    """A portable class that notes ``info.remote_is_trusted`` in *seen* at each step."""

    @portable_class(name)
    class Probe:
        def __serialize__(self, info):
            seen.append(("serialize", info.remote_is_trusted))
            return {}

        def __deserialize__(self, data, info):
            seen.append(("deserialize", info.remote_is_trusted))

    return Probe


@pytest.mark.parametrize("trusted", [True, False])
def test_info_remote_is_trusted_is_what_each_side_was_given(unique_name, trusted):
    seen: list[tuple[str, bool]] = []
    Probe = _trust_probe_class(unique_name("Probe"), seen)

    message = wire({"response": Probe()}, remote_is_trusted=trusted)
    deserialise(message, remote_is_trusted=trusted)

    assert seen == [("serialize", trusted), ("deserialize", trusted)]


def test_info_remote_is_trusted_defaults_to_untrusted_out_and_trusted_in(unique_name):
    seen: list[tuple[str, bool]] = []
    Probe = _trust_probe_class(unique_name("Probe"), seen)

    message = wire({"response": Probe()})
    deserialise(message)

    assert seen == [("serialize", False), ("deserialize", True)]


# ---------------------------------------------------------------------------------------------
# Shared data (vt_global)


def _tally_class(name: str, key: Any = None):
    """A portable class that counts its instances in the shared data under *key*."""

    @portable_class(name)
    class Tally:
        def __init__(self, label):
            self.label = label

        def __serialize__(self, info: SerializationInfo):
            tx, local = info.shared_data(key)
            tx.setdefault("labels", []).append(self.label)
            local["sent"] = local.get("sent", 0) + 1
            return self.label

        def __deserialize__(self, data, info: SerializationInfo):
            self.label = data
            self.shared, self.local = info.shared_data(key)

    return Tally


def test_shared_data_travels_once_in_vt_global_under_the_class_name(unique_name):
    name = unique_name("Tally")
    tally = _tally_class(name)

    message = serialise({"response": [tally("a"), tally("b")]}).message

    assert message["vt_global"] == [name, {"labels": ["a", "b"]}]
    assert message["response"] == ["a", "b"]


def test_shared_data_of_several_keys_is_one_flat_list(unique_name):
    first_name, second_name = unique_name("First"), unique_name("Second")
    first, second = _tally_class(first_name), _tally_class(second_name)
    keyed = _tally_class(unique_name("Keyed"), key="k")

    value = [second("s"), first("f"), keyed("k"), second("t")]
    message = serialise({"response": value}).message
    received = cross({"response": value})["response"]

    assert message["vt_global"] == [
        second_name,
        {"labels": ["s", "t"]},
        first_name,
        {"labels": ["f"]},
        ":k",
        {"labels": ["k"]},
    ]
    assert [r.shared for r in received] == [
        {"labels": ["s", "t"]},
        {"labels": ["f"]},
        {"labels": ["k"]},
        {"labels": ["s", "t"]},
    ]


def test_the_receiving_side_sees_the_same_shared_data_in_every_object(unique_name):
    tally = _tally_class(unique_name("Tally"))

    first, second = cross({"response": [tally("a"), tally("b")]})["response"]

    assert first.shared == {"labels": ["a", "b"]}
    assert second.shared is first.shared
    assert first.local == {}  # local data never crosses
    assert second.local is first.local


def test_shared_data_under_an_explicit_key_is_prefixed_with_a_colon(unique_name):
    tally = _tally_class(unique_name("Tally"), key="tallies")

    message = serialise({"response": [tally("a")]}).message
    received = cross({"response": [tally("a")]})["response"][0]

    assert message["vt_global"] == [":tallies", {"labels": ["a"]}]
    assert received.shared == {"labels": ["a"]}


def test_the_legacy_global_key_travels_as_a_plain_dict(unique_name):
    tally = _tally_class(unique_name("Tally"), key="GLOBAL")

    message = serialise({"response": [tally("a"), tally("b")]}).message
    received = cross({"response": [tally("a")]})["response"][0]

    assert message["vt_global"] == {"labels": ["a", "b"]}
    assert received.shared == {"labels": ["a"]}


def test_a_legacy_plain_dict_vt_global_from_a_peer_is_read_as_the_global_key(unique_name):
    name = unique_name("Tally")
    tally = _tally_class(name, key="GLOBAL")
    message = {
        "response": "a",
        "vt_global": {"labels": ["from", "peer"]},
        "objects": [{"type": ["ValueType"], "path": ["response"], "typeName": name}],
    }

    deserialise(message)

    assert type(message["response"]) is tally
    assert message["response"].shared == {"labels": ["from", "peer"]}
    assert "vt_global" not in message


def test_entries_inside_shared_data_come_first_and_are_rebuilt(unique_name):
    name = unique_name("Stamped")

    @portable_class(name)
    class Stamped:
        def __init__(self, when):
            self.when = when

        def __serialize__(self, info):
            info.shared_data()[0].setdefault("first", self.when)
            return {"when": self.when}

        def __deserialize__(self, data, info):
            self.when = data["when"]
            self.first = info.shared_data()[0]["first"]

    value = [Stamped(dt.date(2024, 1, 1)), Stamped(dt.date(2024, 1, 2))]

    message = serialise({"response": value}).message
    received = cross({"response": value})["response"]

    paths = [e["path"] for e in message["objects"]]
    assert paths[0] == ["vt_global", 1, "first"]
    assert all(p[0] != "vt_global" for p in paths[1:])
    assert message["vt_global"] == [name, {"first": None}]
    assert [r.first for r in received] == [dt.date(2024, 1, 1)] * 2
    assert [r.when for r in received] == [dt.date(2024, 1, 1), dt.date(2024, 1, 2)]


def test_vt_global_in_the_protocol_example_is_read(unique_name):
    shared_name = unique_name("my.Shared")
    point_name = unique_name("Point")
    tally = _tally_class(shared_name)

    @portable_class(point_name)
    class Point:
        pass

    message = {
        "response": {"t": "x", "pt": {"x": 1, "y": [{"x": 2, "y": 3}]}, "cls": None},
        "vt_global": [shared_name, {"labels": ["x"], "count": 2}],
        "objects": [
            {"type": ["ValueType"], "path": ["response", "t"], "typeName": shared_name},
            {"type": ["ValueType"], "path": ["response", "pt", "y", 0], "typeName": point_name},
            {"type": ["ValueType"], "path": ["response", "pt"], "typeName": point_name},
            {"type": ["ClassType"], "path": ["response", "cls"], "typeName": point_name},
        ],
    }

    deserialise(message)

    response = message["response"]
    assert type(response["t"]) is tally
    assert response["t"].shared == {"labels": ["x"], "count": 2}
    assert type(response["pt"]) is Point
    assert type(response["pt"].y[0]) is Point
    assert vars(response["pt"].y[0]) == {"x": 2, "y": 3}
    assert response["cls"] is Point
