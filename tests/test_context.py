"""CallContext built from the ``client`` and ``call-stack`` of a CALL (PROTOCOL.md §3, §9).

The newest frame of the call stack is the remote caller and decides trust: ``server_module``,
``uplink`` and ``background_task`` are trusted, every other type is not. Without a call stack the
remote caller comes from the client's type. Location data may be partial or absent; reading it
never raises, and writing it back never produces a ``null`` (which breaks the real client).
"""

from __future__ import annotations

from typing import Any

import pytest

from anvil_nb.core.context import TRUSTED_TYPES, CallContext, ClientInfo, Location, StackFrame

#: The browser CALL of PROTOCOL.md §3, exactly.
BROWSER_CALL: dict[str, Any] = {
    "type": "CALL",
    "id": "server-1",
    "call-stack-id": "server-1",
    "command": "ctx",
    "args": [],
    "kwargs": {},
    "objects": [],
    "call-stack": [{"type": "browser", "protocol-version": 8}],
    "client": {
        "type": "browser",
        "ip": "1.2.3.4",
        "location": {
            "city": "Cambridge",
            "subdivision": {"name": "Cambridgeshire"},
            "location": {"lat": 52.2, "lng": 0.1},
            "country": {"code": "GB", "name": "United Kingdom"},
        },
    },
    "sessionData": {},
    "session-id": "SESS1",
    "app-info": {"id": "MYAPP", "branch": "master", "environment": {"description": "Notebook"}},
}

FULL_LOCATION = Location(
    city="Cambridge",
    subdivision="Cambridgeshire",
    country="United Kingdom",
    country_code="GB",
    latitude=52.2,
    longitude=0.1,
)


def context_of(msg: dict[str, Any], own_type: str = "uplink") -> CallContext:
    return CallContext.from_wire(own_type, msg.get("client"), msg.get("call-stack"))


def contains_none(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, dict):
        return any(contains_none(v) for v in value.values())
    if isinstance(value, list):
        return any(contains_none(v) for v in value)
    return False


# ---------------------------------------------------------------------------------------------
# The browser CALL of §3


def test_browser_call_gives_the_context_the_client_would_build() -> None:
    ctx = context_of(BROWSER_CALL, own_type="server_module")

    assert ctx.type == "server_module"
    assert ctx.client is not None
    assert ctx.client.type == "browser"
    assert ctx.client.ip == "1.2.3.4"
    assert ctx.client.location == FULL_LOCATION
    loc = ctx.client.location
    assert loc is not None
    assert loc.city == "Cambridge"
    assert loc.subdivision == "Cambridgeshire"
    assert loc.country == "United Kingdom"
    assert loc.country_code == "GB"
    assert loc.latitude == 52.2
    assert loc.longitude == 0.1
    assert ctx.remote_caller is not None
    assert ctx.remote_caller.type == "browser"
    assert ctx.remote_caller.protocol_version == 8
    assert ctx.remote_caller.is_trusted is False
    assert ctx.call_stack == (StackFrame(type="browser", protocol_version=8),)
    assert ctx.background_task_id is None


@pytest.mark.parametrize("own_type", ["uplink", "client_uplink", "server_module"])
def test_context_type_is_the_own_type_passed(own_type: str) -> None:
    assert context_of(BROWSER_CALL, own_type=own_type).type == own_type


# ---------------------------------------------------------------------------------------------
# Trust


@pytest.mark.parametrize(
    ("frame_type", "trusted"),
    [
        ("server_module", True),
        ("uplink", True),
        ("background_task", True),
        ("browser", False),
        ("client_uplink", False),
        ("client-uplink", False),
        ("http", False),
        ("scheduled_task", False),
        ("unknown", False),
    ],
)
def test_remote_caller_is_trusted_exactly_for_server_side_frame_types(
    frame_type: str, trusted: bool
) -> None:
    ctx = CallContext.from_wire("uplink", {"type": "browser"}, [{"type": frame_type}])

    assert ctx.remote_caller is not None
    assert ctx.remote_caller.type == frame_type
    assert ctx.remote_caller.is_trusted is trusted
    assert StackFrame(type=frame_type).is_trusted is trusted


def test_trusted_types_are_exactly_the_three_server_side_types() -> None:
    assert frozenset({"server_module", "uplink", "background_task"}) == TRUSTED_TYPES


def test_newest_frame_decides_trust_and_every_frame_is_kept() -> None:
    stack = [
        {"type": "browser", "protocol-version": 8},
        {"type": "server_module"},
        {"type": "uplink"},
    ]

    ctx = CallContext.from_wire("uplink", {"type": "uplink"}, stack)

    assert ctx.remote_caller == StackFrame(type="browser", protocol_version=8)
    assert ctx.remote_caller.is_trusted is False
    assert [f.type for f in ctx.call_stack] == ["browser", "server_module", "uplink"]
    assert [f.protocol_version for f in ctx.call_stack] == [8, None, None]


# ---------------------------------------------------------------------------------------------
# Missing or partial fields


def test_missing_call_stack_takes_the_remote_caller_from_the_client_type() -> None:
    msg = {k: v for k, v in BROWSER_CALL.items() if k != "call-stack"}

    ctx = context_of(msg)

    assert ctx.remote_caller is not None
    assert ctx.remote_caller.type == "browser"
    assert ctx.remote_caller.is_trusted is False
    assert ctx.call_stack == ()


def test_missing_call_stack_with_a_trusted_client_type_is_trusted() -> None:
    ctx = CallContext.from_wire("uplink", {"type": "background_task"}, None)

    assert ctx.remote_caller is not None
    assert ctx.remote_caller.type == "background_task"
    assert ctx.remote_caller.is_trusted is True


def test_missing_client_gives_no_client_info() -> None:
    msg = {k: v for k, v in BROWSER_CALL.items() if k != "client"}

    ctx = context_of(msg)

    assert ctx.client is None
    assert ctx.background_task_id is None
    assert ctx.remote_caller == StackFrame(type="browser", protocol_version=8)


def test_missing_client_and_call_stack_give_no_remote_caller() -> None:
    ctx = CallContext.from_wire("uplink", None, None)

    assert ctx.client is None
    assert ctx.remote_caller is None
    assert ctx.call_stack == ()
    assert ctx.background_task_id is None


def test_background_task_id_comes_from_the_client() -> None:
    client = {"type": "background_task", "ip": "10.0.0.1", "background-task-id": "task-42"}

    ctx = CallContext.from_wire("uplink", client, [{"type": "background_task"}])

    assert ctx.background_task_id == "task-42"
    assert ctx.client == ClientInfo(type="background_task", ip="10.0.0.1", location=None)


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ({}, Location()),
        ({"city": "Cambridge"}, Location(city="Cambridge")),
        ({"subdivision": {"name": "Kent"}}, Location(subdivision="Kent")),
        ({"subdivision": {"code": "KEN"}}, Location()),
        ({"subdivision": None, "country": None, "location": None}, Location()),
        ({"country": {"code": "GB"}}, Location(country_code="GB")),
        ({"country": {"name": "France"}}, Location(country="France")),
        ({"location": {"lat": 1.5}}, Location(latitude=1.5)),
        ({"location": {}}, Location()),
        ({"subdivision": "Kent", "country": "GB", "location": [1, 2]}, Location()),
    ],
)
def test_partial_location_gives_none_fields_and_never_raises(
    location: dict[str, Any], expected: Location
) -> None:
    client = {"type": "browser", "ip": "1.2.3.4", "location": location}

    ctx = CallContext.from_wire("uplink", client, [{"type": "browser"}])

    assert ctx.client is not None
    assert ctx.client.location == expected


@pytest.mark.parametrize("location", [None, "Cambridge", 5])
def test_absent_or_non_dict_location_gives_no_location(location: Any) -> None:
    ctx = CallContext.from_wire("uplink", {"type": "browser", "location": location}, None)

    assert ctx.client is not None
    assert ctx.client.location is None
    assert ctx.client.ip is None


def test_client_without_location_key_gives_no_location() -> None:
    info = ClientInfo.from_wire({"type": "http", "ip": "5.6.7.8"})

    assert info == ClientInfo(type="http", ip="5.6.7.8", location=None)


# ---------------------------------------------------------------------------------------------
# Location.to_wire


def test_full_location_goes_to_the_wire_in_the_shape_it_came_in() -> None:
    assert FULL_LOCATION.to_wire() == BROWSER_CALL["client"]["location"]


@pytest.mark.parametrize(
    ("location", "wire"),
    [
        (Location(), {}),
        (Location(city="Cambridge"), {"city": "Cambridge"}),
        (Location(subdivision="Kent"), {"subdivision": {"name": "Kent"}}),
        (Location(country_code="GB"), {"country": {"code": "GB"}}),
        (Location(country="France"), {"country": {"name": "France"}}),
        (Location(latitude=1.0, longitude=2.0), {"location": {"lat": 1.0, "lng": 2.0}}),
    ],
)
def test_location_to_wire_leaves_out_unknown_keys(location: Location, wire: dict) -> None:
    assert location.to_wire() == wire


@pytest.mark.parametrize(
    "location",
    [
        FULL_LOCATION,
        Location(),
        Location(city="Cambridge"),
        Location(latitude=1.0, longitude=None),
        Location(latitude=None, longitude=2.0),
        Location(country_code="GB", subdivision="Kent"),
    ],
)
def test_location_to_wire_never_contains_null(location: Location) -> None:
    assert not contains_none(location.to_wire())


@pytest.mark.parametrize(
    "location",
    [
        FULL_LOCATION,
        Location(),
        Location(city="Cambridge"),
        Location(latitude=0.0, longitude=0.0),
        Location(country_code="GB", subdivision="Kent"),
        Location(country="France"),
    ],
)
def test_location_round_trips_through_to_wire_and_from_wire(location: Location) -> None:
    assert Location.from_wire(location.to_wire()) == location
