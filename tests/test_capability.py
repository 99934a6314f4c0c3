"""Capabilities: ``unwrap_capability``, construction, narrowing, updates, MACs and update keys.

``unwrap_capability`` follows the reference page (``anvil.server`` module): the scope must be
at least as broad as the pattern, equal to it position by position except where the pattern
has ``Capability.ANY``, and the result is as long as the pattern, padded with ``None``.
MACs (PROTOCOL.md §6, DESIGN.md) are bound to a session and cover the canonical JSON of the
scope; ``capUpdates`` keys are ``json.dumps(full_scope)`` with Python's default spacing.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from anvil_nb.core.capability import (
    Capability,
    normalise_scope_key,
    scope_key,
    sign_scope,
    unwrap_capability,
    verify_scope,
)

ANY = Capability.ANY

# ---------------------------------------------------------------------------------------------
# unwrap_capability

UNWRAP_MATCHES = {
    "exact match returns the scope": (Capability(["doc", 42]), ["doc", 42], ["doc", 42]),
    "broader scope pads with None": (
        Capability(["doc"]),
        ["doc", 42, "page"],
        ["doc", None, None],
    ),
    "broader by one element": (Capability(["doc", 42]), ["doc", 42, "page"], ["doc", 42, None]),
    "ANY matches a value": (Capability(["doc", 42]), ["doc", ANY], ["doc", 42]),
    "ANY in the first position": (Capability(["doc", 42]), [ANY, 42], ["doc", 42]),
    "ANY matches a dict": (Capability(["doc", {"id": 1}]), ["doc", ANY], ["doc", {"id": 1}]),
    "ANY past a broader scope gives None": (Capability(["doc"]), ["doc", ANY], ["doc", None]),
    "tuple in the pattern matches a list": (
        Capability(["doc", [1, 2]]),
        ["doc", (1, 2)],
        ["doc", [1, 2]],
    ),
    "narrowed capability is matched by its full scope": (
        Capability(["doc"], mac="m").narrow([42]),
        ["doc", ANY, "page"],
        ["doc", 42, None],
    ),
    "a MAC does not matter": (Capability(["_", "s"], mac="m"), ["_", "s"], ["_", "s"]),
}


@pytest.mark.parametrize(
    ("cap", "pattern", "expected"), UNWRAP_MATCHES.values(), ids=UNWRAP_MATCHES.keys()
)
def test_unwrap_capability_returns_the_matched_scope(cap, pattern, expected):
    assert unwrap_capability(cap, pattern) == expected


UNWRAP_MISMATCHES = {
    "narrower than the pattern": (Capability(["doc", 42, "page"]), ["doc", 42], "too narrow"),
    "narrowed past the pattern": (
        Capability(["doc"]).narrow([42, "page"]),
        ["doc", ANY],
        "too narrow",
    ),
    "any scope against an empty pattern": (Capability(["doc"]), [], "too narrow"),
    "first element differs": (Capability(["doc", 42]), ["file", 42], "Incorrect"),
    "last element differs": (Capability(["doc", 42]), ["doc", 43], "Incorrect"),
    "str is not the int": (Capability(["doc", "42"]), ["doc", 42], "Incorrect"),
    "tuple with other values": (Capability(["doc", [1, 2]]), ["doc", (1, 3)], "Incorrect"),
    "a list in the pattern is a value, not a choice": (
        Capability(["doc", 1]),
        ["doc", [1, 2]],
        "Incorrect",
    ),
}


@pytest.mark.parametrize(
    ("cap", "pattern", "message"), UNWRAP_MISMATCHES.values(), ids=UNWRAP_MISMATCHES.keys()
)
def test_unwrap_capability_refuses_a_scope_that_does_not_match(cap, pattern, message):
    with pytest.raises(ValueError, match=message):
        unwrap_capability(cap, pattern)


UNWRAP_TYPE_ERRORS = {
    "a list instead of a capability": (["doc", 42], ["doc", 42]),
    "None instead of a capability": (None, ["doc"]),
    "a wire entry instead of a capability": ({"type": ["Capability"], "scope": ["doc"]}, ["doc"]),
    "a tuple pattern": (Capability(["doc"]), ("doc",)),
    "a str pattern": (Capability(["doc"]), "doc"),
    "a None pattern": (Capability(["doc"]), None),
}


@pytest.mark.parametrize(
    ("cap", "pattern"), UNWRAP_TYPE_ERRORS.values(), ids=UNWRAP_TYPE_ERRORS.keys()
)
def test_unwrap_capability_refuses_wrong_types_with_type_error(cap, pattern):
    with pytest.raises(TypeError):
        unwrap_capability(cap, pattern)


# ---------------------------------------------------------------------------------------------
# Construction


@pytest.mark.parametrize("scope", [[], ["_"], ["_", "session", 1]], ids=["empty", "_", "_ prefix"])
def test_a_reserved_scope_is_refused_without_a_mac_and_accepted_with_one(scope):
    with pytest.raises(ValueError):
        Capability(scope)

    assert Capability(scope, mac="host-minted").scope == scope


@pytest.mark.parametrize("scope", ["doc", None, 42, {"doc": 42}])
def test_a_scope_that_is_not_a_list_is_refused_with_type_error(scope):
    with pytest.raises(TypeError):
        Capability(scope)


NON_JSON_SCOPES = {
    "an object": ["doc", object()],
    "NaN": ["doc", float("nan")],
    "infinity": ["doc", float("inf")],
    "a non-str dict key": ["doc", {1: "a"}],
    "bytes": ["doc", b"42"],
    "nested object": ["doc", {"k": [object()]}],
    "a set": ["doc", {1, 2}],
}


@pytest.mark.parametrize("scope", NON_JSON_SCOPES.values(), ids=NON_JSON_SCOPES.keys())
@pytest.mark.parametrize("mac", [None, "m"])
def test_a_scope_with_non_json_elements_is_refused_with_type_error(scope, mac):
    with pytest.raises(TypeError):
        Capability(scope, mac=mac)


def test_narrow_appends_and_leaves_the_original_untouched():
    original = Capability(["doc", 42], mac="m")

    narrowed = original.narrow(["page", 1])
    narrower = narrowed.narrow(["line"])

    assert original.scope == ["doc", 42]
    assert narrowed.scope == ["doc", 42, "page", 1]
    assert narrower.scope == ["doc", 42, "page", 1, "line"]
    assert narrowed is not original
    # The wire keeps the original scope and MAC and sends the suffix apart (PROTOCOL.md §6).
    assert (narrowed._scope, narrowed._mac, narrowed._narrow) == (["doc", 42], "m", ["page", 1])


@pytest.mark.parametrize("suffix", ["page", None, ["page", object()], [float("nan")]])
def test_narrow_refuses_a_suffix_that_is_not_a_json_list(suffix):
    with pytest.raises(TypeError):
        Capability(["doc"]).narrow(suffix)


def test_scope_is_scope_plus_narrow_and_changing_it_changes_nothing():
    cap = Capability(["doc"], mac="m", narrow=[42])

    scope = cap.scope
    scope.append("widened")

    assert cap.scope == ["doc", 42]


def test_capabilities_are_equal_and_hash_alike_by_full_scope():
    whole = Capability(["doc", 42, "page"])
    narrowed = Capability(["doc", 42], mac="m").narrow(["page"])

    assert whole == narrowed
    assert hash(whole) == hash(narrowed)
    assert len({whole, narrowed}) == 1
    assert whole != Capability(["doc", 42])
    assert whole != Capability(["doc", 42, "line"])
    assert whole != ["doc", 42, "page"]


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([{"a": 1, "b": 2}], [{"b": 2, "a": 1}]),
        (["doc", {"x": {"p": 1, "q": 2}}], ["doc", {"x": {"q": 2, "p": 1}}]),
        (["doc", 1], ["doc", 1.0]),
    ],
    ids=["dict key order", "nested dict key order", "1 and 1.0"],
)
def test_equal_capabilities_have_equal_hashes(a, b):
    first, second = Capability(a), Capability(b)

    if first == second:
        assert hash(first) == hash(second)
        assert len({first, second}) == 1


def test_capabilities_whose_scopes_differ_only_in_dict_key_order_are_equal():
    assert Capability([{"a": 1, "b": 2}]) == Capability([{"b": 2, "a": 1}])


# ---------------------------------------------------------------------------------------------
# Updates


def test_dict_updates_are_merged_and_taken_once():
    cap = Capability(["doc"])

    cap.send_update({"a": 1})
    cap.send_update({"b": 2})
    cap.send_update({"a": 3})

    assert cap._take_update() == {"a": 3, "b": 2}
    assert cap._take_update() is None


def test_a_non_dict_update_replaces_the_pending_one():
    cap = Capability(["doc"])

    cap.send_update({"a": 1})
    cap.send_update("done")
    assert cap._take_update() == "done"

    cap.send_update([1])
    cap.send_update({"b": 2})
    assert cap._take_update() == {"b": 2}


def test_no_update_sent_means_none_to_take():
    assert Capability(["doc"])._take_update() is None


def test_an_update_handler_applies_each_update_and_its_getter_gives_what_is_sent():
    cap = Capability(["doc"])
    applied: list[Any] = []
    cap.set_update_handler(applied.append, lambda: {"count": len(applied)})

    cap.send_update({"x": 1})
    cap.send_update("y")

    assert applied == [{"x": 1}, "y"]
    assert cap._take_update() == {"count": 2}


def test_an_apply_handler_alone_still_leaves_the_default_merging():
    cap = Capability(["doc"])
    applied: list[Any] = []
    cap.set_update_handler(applied.append)

    cap.send_update({"x": 1})
    cap.send_update({"y": 2})

    assert applied == [{"x": 1}, {"y": 2}]
    assert cap._take_update() == {"x": 1, "y": 2}


def test_an_incoming_update_runs_the_apply_handler_like_a_sent_one():
    cap = Capability(["doc"])
    applied: list[Any] = []
    cap.set_update_handler(applied.append)

    cap._apply_update({"seen": True})

    assert applied == [{"seen": True}]


# ---------------------------------------------------------------------------------------------
# MACs and update keys

HOST = b"host secret"
SESSION = b"session one"
OTHER_SESSION = b"session two"
SCOPE = ["doc", 42, {"role": "editor", "pages": [1, 2]}]


def test_a_mac_verifies_with_the_session_it_was_signed_for():
    mac = sign_scope(HOST, SESSION, SCOPE)

    assert isinstance(mac, str)
    assert mac == sign_scope(HOST, SESSION, SCOPE)
    assert verify_scope(HOST, SESSION, SCOPE, mac) is True


def test_a_mac_from_another_session_is_refused():
    mac = sign_scope(HOST, OTHER_SESSION, SCOPE)

    assert mac != sign_scope(HOST, SESSION, SCOPE)
    assert verify_scope(HOST, SESSION, SCOPE, mac) is False


def test_a_mac_from_another_host_secret_is_refused():
    mac = sign_scope(b"another host", SESSION, SCOPE)

    assert verify_scope(HOST, SESSION, SCOPE, mac) is False


def _flip_last(mac: str) -> str:
    return mac[:-1] + ("A" if mac[-1] != "A" else "B")


@pytest.mark.parametrize(
    "forge",
    [
        _flip_last,
        lambda mac: "",
        lambda mac: mac.upper() if mac.upper() != mac else mac.lower(),
        lambda mac: mac + "=",
        lambda mac: sign_scope(HOST, SESSION, ["doc", 43]),
        lambda mac: sign_scope(HOST, SESSION, ["doc"]),  # a broader scope's MAC
    ],
    ids=["flipped char", "empty", "case changed", "padded", "other scope", "broader scope"],
)
def test_a_forged_mac_is_refused(forge):
    mac = forge(sign_scope(HOST, SESSION, SCOPE))

    assert verify_scope(HOST, SESSION, SCOPE, mac) is False


@pytest.mark.parametrize("mac", [None, 42, ["m"], {"mac": "m"}])
def test_a_mac_that_is_not_a_string_is_refused(mac):
    assert verify_scope(HOST, SESSION, SCOPE, mac) is False


def test_a_mac_as_bytes_is_refused():
    mac = sign_scope(HOST, SESSION, SCOPE).encode()

    assert verify_scope(HOST, SESSION, SCOPE, mac) is False


def test_a_non_json_scope_is_refused_rather_than_raising():
    mac = sign_scope(HOST, SESSION, SCOPE)

    assert verify_scope(HOST, SESSION, ["doc", float("nan")], mac) is False


def test_dict_elements_in_another_key_order_still_verify():
    signed = ["doc", {"b": 1, "a": {"y": 2, "x": [{"q": 1, "p": 2}]}}]
    received = ["doc", {"a": {"x": [{"p": 2, "q": 1}], "y": 2}, "b": 1}]

    mac = sign_scope(HOST, SESSION, signed)

    assert verify_scope(HOST, SESSION, received, mac) is True


@pytest.mark.parametrize(
    "scope", [["files", 42], ["doc", {"b": 1, "a": 2}], ["é", None, True, 1.5], []]
)
def test_scope_key_is_json_dumps_with_default_spacing(scope):
    assert scope_key(scope) == json.dumps(scope)


def test_scope_key_of_files_42():
    assert scope_key(["files", 42]) == '["files", 42]'


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ('["files",42]', '["files", 42]'),
        ('[ "files" , 42 ]', '["files", 42]'),
        ('["files", 42]', '["files", 42]'),
        ('["doc",{"a":1}]', '["doc", {"a": 1}]'),
        ('["\\u00e9"]', '["\\u00e9"]'),
    ],
)
def test_normalise_scope_key_re_encodes_like_scope_key(key, expected):
    assert normalise_scope_key(key) == expected
    assert normalise_scope_key(key) == scope_key(json.loads(key))


@pytest.mark.parametrize("key", ["not json", "[1,", ""])
def test_normalise_scope_key_of_non_json_is_none(key):
    assert normalise_scope_key(key) is None
