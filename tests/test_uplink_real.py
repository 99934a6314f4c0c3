"""Integration tests: the REAL ``anvil-uplink`` client (PyPI 0.7.0) against ``anvil_nb serve``.

Nothing here is simulated. A real ``python -m anvil_nb serve`` subprocess is the host (temp data
dir, random keys, stopped with SIGTERM and checked to exit 0), and every uplink is a separate
Python process:

* ``real`` processes run the unmodified ``anvil-uplink`` 0.7.0 from PyPI. It installs a top-level
  ``anvil`` package, so it never goes into the project's venv: the session fixture
  ``anvil_uplink_dir`` installs it once with ``pip install --target`` into
  the user cache folder (``anvil-uplink-0.7.0`` in ``platformdirs.user_cache_dir("anvil_nb")``,
  outside the checkout; a lock file keeps two pytest processes from
  installing at once), and the scripts that use it run with ``PYTHONPATH`` set to that folder;
* ``nb`` processes run anvil_nb's own client (``anvil_nb.server.connect``) from the project's
  venv, where ``anvil`` is not importable (each such process checks it).

Each process is an *agent*: it reads snippets of Python from stdin (one JSON line each), runs
them, and answers ``RESULT <json>`` or ``ERROR <json>`` on its own stdout; server functions it
serves may report ``EVENT <json>`` lines (e.g. "I am now inside the call"). Everything else a
client prints goes to the agent's stderr log, which failures show. Tests synchronise only on
those lines, with bounded timeouts; nothing sleeps.

Two providers (one ``real``, one ``nb``, both with the server key) serve the same functions
under the prefixes ``real_`` and ``nb_`` for the whole module; each test starts its own callers,
and tests that kill or refuse a provider start their own.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.agents import (
    AGENT_SCRIPT,
    MODES,
    WAIT,
    Agent,
    HostProc,
    Spawn,
    spawner,
)
from support.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
PAIRS = [(p, c) for p in MODES for c in MODES]
PAIR_IDS = [f"{p}-provider-{c}-caller" for p, c in PAIRS]


# ---------------------------------------------------------------------------------------------
# Subprocesses


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostProc]:
    base = tmp_path_factory.mktemp("anvil_nb_host")
    h = HostProc(base / "data", base / "host.log")
    yield h
    code, took = h.stop()
    assert code == 0, f"host exited with {code} after SIGTERM (took {took:.1f} s)\n{h.log()}"
    assert took < 5.0, f"host took {took:.1f} s to exit after SIGTERM"


@pytest.fixture(scope="module")
def agent_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("agents") / "agent.py"
    path.write_text(AGENT_SCRIPT)
    return path


@pytest.fixture
def spawn(agent_script: Path, tmp_path: Path, anvil_uplink_dir: Path) -> Iterator[Spawn]:
    """``spawn(mode, name=None)`` starts an agent; every one is stopped after the test."""
    agents: list[Agent] = []
    make = spawner(agent_script, tmp_path, anvil_uplink_dir, agents)
    yield lambda mode, name=None, setup=CLASSES: make(mode, name, setup)
    for a in agents:
        a.stop()


# ---------------------------------------------------------------------------------------------
# What the agents define

#: Portable classes, defined the same way (same unique names) in every agent.
CLASSES = """
import datetime, hashlib, threading

@S.portable_class("tests.uplink_real.Point")
class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def __eq__(self, other):
        return type(other) is Point and (self.x, self.y) == (other.x, other.y)

    def __repr__(self):
        return f"Point({self.x!r}, {self.y!r})"


@S.portable_class("tests.uplink_real.Money")
class Money:
    # Travels as one string, not as its __dict__.
    def __init__(self, cents, currency):
        self.cents = cents
        self.currency = currency

    def __serialize__(self, info):
        return {"s": f"{self.currency}:{self.cents}"}

    def __deserialize__(self, data, info):
        currency, cents = data["s"].split(":")
        self.currency = currency
        self.cents = int(cents)
        self.restored = True

    def __eq__(self, other):
        return type(other) is Money and (self.cents, self.currency) == (other.cents, other.currency)

    def __repr__(self):
        return f"Money({self.cents!r}, {self.currency!r})"


@S.portable_class("tests.uplink_real.Label")
class Label:
    # Its text travels in the message's shared data (vt_global), keyed by a short id.
    def __init__(self, text):
        self.text = text

    def __serialize__(self, info):
        table, _ = info.shared_data("labels")
        key = next((k for k, v in table.items() if v == self.text), f"k{len(table)}")
        table[key] = self.text
        return {"k": key}

    def __deserialize__(self, data, info):
        table, _ = info.shared_data("labels")
        self.text = table[data["k"]]
        self.from_trusted = info.remote_is_trusted
"""

#: The provider's functions; ``P`` is the name prefix (``real_`` or ``nb_``).
PROVIDES = """
@S.callable(P + "add")
def _add(a, b):
    return a + b


@S.callable(P + "echo")
def _echo(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}


@S.callable(P + "ctx")
def _ctx():
    c = S.context
    return {
        "type": c.type,
        "remote_type": c.remote_caller.type,
        "trusted": c.remote_caller.is_trusted,
        "client_type": c.client.type,
        "client_ip": c.client.ip,
        "stack": [f.type for f in c.call_stack],
    }


@S.callable(P + "make_point")
def _make_point(x, y):
    return Point(x, y)


@S.callable(P + "move")
def _move(p, dx):
    if type(p) is not Point:
        raise TypeError(f"move() got a {type(p).__name__}, not a Point")
    return Point(p.x + dx, p.y)


@S.callable(P + "double")
def _double(m):
    if type(m) is not Money or not getattr(m, "restored", False):
        raise TypeError(f"double() got {m!r} without __deserialize__ having run")
    assert "s" not in vars(m)
    return Money(m.cents * 2, m.currency)


@S.callable(P + "nest")
def _nest(p):
    # A portable object inside a portable object inside a list, both ways.
    assert type(p) is Point and type(p.x) is Money and type(p.y[0]) is Point, repr(p)
    return {"same": p, "types": [type(p.x).__name__, type(p.y[0]).__name__]}


@S.callable(P + "media_reverse")
def _media_reverse(m):
    data = m.get_bytes()
    return {
        "sha": hashlib.sha256(data).hexdigest(),
        "len": len(data),
        "content_type": m.content_type,
        "name": m.name,
        "back": BlobMedia("application/x-reversed", data[::-1], name="back.bin"),
    }


@S.callable(P + "bump")
def _bump():
    s = session()
    s["n"] = s.get("n", 0) + 1
    return s["n"]


@S.callable(P + "mint")
def _mint():
    return S.Capability(["doc", 42])


@S.callable(P + "inspect_cap")
def _inspect_cap(cap):
    if type(cap) is not S.Capability:
        raise TypeError(f"not a Capability: {cap!r}")
    pattern = ["doc", 42, S.Capability.ANY, S.Capability.ANY]
    return {"scope": cap.scope, "unwrapped": S.unwrap_capability(cap, pattern)}


@S.callable(P + "touch")
def _touch(cap, update):
    cap.send_update(update)
    return cap.scope


@S.callable(P + "fail")
def _fail(message):
    raise ValueError(message)


@S.callable(P + "block")
def _block():
    event("in_block")
    threading.Event().wait()


@S.callable(P + "relay")
def _relay(name, *args):
    # A nested call: made while serving a call, so it belongs to that call's chain.
    return S.call(name, *args)


@S.callable(P + "remember")
def _remember(value):
    session()["v"] = value
    return True


@S.callable(P + "recall")
def _recall():
    v = session().get("v")
    return {"v": v, "type": type(v).__name__}


@S.callable(P + "labels")
def _labels(labels):
    return {
        "texts": [x.text for x in labels],
        "from_trusted": [x.from_trusted for x in labels],
        "back": [Label(x.text.upper()) for x in labels],
    }


@S.callable(P + "media_list")
def _media_list(items):
    return {
        "seen": [[m.content_type, m.name, hashlib.sha256(m.get_bytes()).hexdigest()] for m in items],
        "back": [BlobMedia(m.content_type, m.get_bytes(), name=m.name) for m in items],
    }


@S.callable(P + "sid")
def _sid():
    return S.get_session_id()


@S.callable(P + "deny")
def _deny(message):
    raise S.PermissionDenied(message)


_gates = {}
_barriers = {}
_barriers_lock = threading.Lock()


@S.callable(P + "gate")
def _gate(token):
    # Returns once release(token) was called.
    with _barriers_lock:
        gate = _gates.setdefault(token, threading.Event())
    event("in_gate", token=token)
    if not gate.wait(20):
        raise TimeoutError("never released")
    event("gate_done", token=token)
    return "released"


@S.callable(P + "release")
def _release(token):
    with _barriers_lock:
        _gates.setdefault(token, threading.Event()).set()
    return True


@S.callable(P + "gather")
def _gather(i, n, token):
    # Returns only once n calls with this token are in flight at the same time.
    with _barriers_lock:
        barrier = _barriers.setdefault(token, threading.Barrier(n, timeout=15))
    barrier.wait()
    return i
"""


def _start_provider(spawn: Spawn, host: HostProc, mode: str, prefix: str) -> Agent:
    p = spawn(mode, f"{mode}-provider-{prefix.rstrip('_')}")
    p.run(f"P = {prefix!r}\n" + PROVIDES)
    assert p.connect(host.server_key, host.url) == "READY"
    return p


@pytest.fixture(scope="module")
def providers(
    agent_script: Path,
    tmp_path_factory: pytest.TempPathFactory,
    anvil_uplink_dir: Path,
    host: HostProc,
) -> Iterator[dict[str, Agent]]:
    """One provider per client (``real``, ``nb``), serving ``real_*`` and ``nb_*``."""
    agents: list[Agent] = []
    make = spawner(agent_script, tmp_path_factory.mktemp("providers"), anvil_uplink_dir, agents)

    def spawn(mode: str, name: str | None = None) -> Agent:
        return make(mode, name, CLASSES)

    try:
        yield {mode: _start_provider(spawn, host, mode, f"{mode}_") for mode in MODES}
    finally:
        for a in agents:
            a.stop()


@pytest.fixture
def caller_for(spawn: Spawn, host: HostProc) -> Callable[..., Agent]:
    """``caller_for(mode, key="client")``: a connected caller agent."""

    def make(mode: str, key: str = "client", name: str | None = None) -> Agent:
        a = spawn(mode, name or f"{mode}-{key}-caller")
        assert (
            a.connect(host.client_key if key == "client" else host.server_key, host.url) == "READY"
        )
        return a

    return make


# ---------------------------------------------------------------------------------------------
# 1. Calls and their values


@pytest.mark.parametrize(("pmode", "cmode"), PAIRS, ids=PAIR_IDS)
def test_call_round_trips_arguments_and_result(providers, caller_for, pmode, cmode):
    caller = caller_for(cmode)
    out = caller.run(f"""
        P = {pmode + "_"!r}
        value = {{
            "ints": [0, -1, 2**31 - 1, 2**31, -(2**40), 10**20],
            "float": 2.5, "text": "héllo ✓ \\u0000 \\"q\\"", "none": None, "flags": [True, False],
            "nested": {{"a": [{{"b": []}}, {{}}]}},
            "tuple": (1, 2),
            "day": datetime.date(2024, 1, 31),
            "when": datetime.datetime(2024, 1, 31, 12, 30, 5, 123456,
                                      tzinfo=datetime.timezone(datetime.timedelta(hours=1))),
        }}
        expected = dict(value, tuple=[1, 2])
        back = S.call(P + "echo", value, 7, key="word", other=[value["when"]])
        result = {{
            "add": S.call(P + "add", 40, 2),
            "args_equal": back["args"] == [expected, 7],
            "kwargs_equal": back["kwargs"] == {{"key": "word", "other": [value["when"]]}},
            "types": [type(back["args"][0]["day"]).__name__, type(back["args"][0]["when"]).__name__],
            "back": repr(back),
        }}
    """)
    assert out["add"] == 42
    assert out["types"] == ["date", "datetime"], out["back"]
    assert out["args_equal"], out["back"]
    assert out["kwargs_equal"], out["back"]


# ---------------------------------------------------------------------------------------------
# 2. CallContext seen by the provider


@pytest.mark.parametrize(("pmode", "cmode"), PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("key", ["client", "server"])
def test_provider_sees_caller_type_and_trust(providers, caller_for, pmode, cmode, key):
    caller = caller_for(cmode, key)
    ctx = caller.run(f"result = S.call({pmode + '_ctx'!r})")
    if key == "client":
        want = {"remote_type": "client_uplink", "trusted": False, "client_type": "client_uplink"}
    else:
        want = {"remote_type": "uplink", "trusted": True, "client_type": "uplink"}
    assert {k: ctx[k] for k in want} == want, ctx
    assert ctx["stack"] == [want["remote_type"]], ctx
    assert ctx["type"] == "uplink", ctx  # the provider's own side: a server uplink
    assert ctx["client_ip"] == "127.0.0.1", ctx


# ---------------------------------------------------------------------------------------------
# 3. Portable classes


@pytest.mark.parametrize(("pmode", "cmode"), PAIRS, ids=PAIR_IDS)
def test_portable_classes_round_trip(providers, caller_for, pmode, cmode):
    caller = caller_for(cmode)
    out = caller.run(f"""
        P = {pmode + "_"!r}
        made = S.call(P + "make_point", 1, 2)
        moved = S.call(P + "move", made, 10)
        doubled = S.call(P + "double", Money(250, "EUR"))
        nested = S.call(P + "nest", Point(Money(5, "GBP"), [Point(1, 2)]))
        same = nested["same"]
        result = {{
            "made": [type(made).__name__, made == Point(1, 2)],
            "moved": [type(moved).__name__, moved == Point(11, 2)],
            "doubled": [type(doubled).__name__, doubled == Money(500, "EUR"),
                        getattr(doubled, "restored", False)],
            "nested": [nested["types"], type(same).__name__, type(same.x).__name__,
                       same.x == Money(5, "GBP"), same.y == [Point(1, 2)]],
        }}
    """)
    assert out == {
        "made": ["Point", True],
        "moved": ["Point", True],
        "doubled": ["Money", True, True],
        "nested": [["Money", "Point"], "Point", "Money", True, True],
    }


# ---------------------------------------------------------------------------------------------
# 4. Media


@pytest.mark.parametrize(("pmode", "cmode"), PAIRS, ids=PAIR_IDS)
def test_one_megabyte_media_both_ways(providers, caller_for, pmode, cmode):
    caller = caller_for(cmode)
    out = caller.run(f"""
        import random
        data = random.Random(1234).randbytes(1024 * 1024 + 17)  # not a multiple of any chunk
        r = S.call({pmode + "_media_reverse"!r}, BlobMedia("application/x-test", data, name="in.bin"))
        back = r["back"].get_bytes()
        result = {{
            "sha_sent": hashlib.sha256(data).hexdigest(), "sha_seen": r["sha"], "len_seen": r["len"],
            "meta_seen": [r["content_type"], r["name"]],
            "back_identical": back == data[::-1], "back_len": len(back),
            "back_meta": [r["back"].content_type, r["back"].name],
        }}
    """)
    assert out["len_seen"] == 1024 * 1024 + 17
    assert out["sha_seen"] == out["sha_sent"]
    assert out["meta_seen"] == ["application/x-test", "in.bin"]
    assert out["back_len"] == 1024 * 1024 + 17
    assert out["back_identical"]
    assert out["back_meta"] == ["application/x-reversed", "back.bin"]


# ---------------------------------------------------------------------------------------------
# 5. One session per connection


@pytest.mark.parametrize(("pmode", "cmode"), PAIRS, ids=PAIR_IDS)
def test_each_connection_has_its_own_session(providers, caller_for, pmode, cmode):
    a = caller_for(cmode, name="caller-a")
    b = caller_for(cmode, name="caller-b")
    bump = f"result = S.call({pmode + '_bump'!r})"
    assert [a.run(bump) for _ in range(3)] == [1, 2, 3]
    assert b.run(bump) == 1
    assert a.run(bump) == 4
    assert b.run(bump) == 2


# ---------------------------------------------------------------------------------------------
# 6, 7. Capabilities


@pytest.mark.parametrize(("pmode", "cmode"), PAIRS, ids=PAIR_IDS)
def test_capability_round_trip_narrow_and_forgery(providers, caller_for, pmode, cmode):
    caller = caller_for(cmode)
    caller.run(f"""
        P = {pmode + "_"!r}
        cap = S.call(P + "mint")
        assert type(cap) is S.Capability, repr(cap)
    """)
    back = caller.run("result = S.call(P + 'inspect_cap', cap)")
    assert back == {"scope": ["doc", 42], "unwrapped": ["doc", 42, None, None]}
    narrowed = caller.run("result = S.call(P + 'inspect_cap', cap.narrow(['page', 1]))")
    assert narrowed == {"scope": ["doc", 42, "page", 1], "unwrapped": ["doc", 42, "page", 1]}

    forged = caller.run(
        "result = catch(S.call, P + 'inspect_cap', S.Capability(['doc', 42], mac='forged'))"
    )
    assert forged["raised"], forged
    assert "PermissionDenied" in forged["is"], forged
    tampered = caller.run(
        """
        mac = cap._mac
        bad = S.Capability(['doc', 42], mac=mac[:-1] + ('0' if mac[-1] != '0' else '1'))
        other_scope = S.Capability(['doc', 43], mac=mac)
        result = [catch(S.call, P + 'inspect_cap', bad), catch(S.call, P + 'inspect_cap', other_scope)]
        """
    )
    for t in tampered:
        assert t["raised"] and "PermissionDenied" in t["is"], tampered
    # A forged capability hidden in kwargs, a dict or a portable object is found all the same.
    hidden = caller.run(
        """
        forged = S.Capability(['doc', 42], mac='forged')
        result = [catch(S.call, P + 'echo', x={'deep': [forged]}),
                  catch(S.call, P + 'echo', Point(forged, 1)),
                  catch(S.call, P + 'echo', cap, forged)]
        """
    )
    for h in hidden:
        assert h["raised"] and "PermissionDenied" in h["is"], hidden
    # The connection still works, and the genuine capability is still accepted.
    assert caller.run("result = S.call(P + 'inspect_cap', cap)")["scope"] == ["doc", 42]
    # A capability that went back and forth (re-signed by the host each time) stays usable.
    again = caller.run(
        """
        plain = S.call(P + 'echo', cap)['args'][0]
        page = S.call(P + 'echo', cap.narrow(['page', 1]))['args'][0]
        result = [plain.scope, S.call(P + 'inspect_cap', plain)['scope'],
                  page.scope, S.call(P + 'inspect_cap', page)['scope'],
                  S.call(P + 'echo', page.narrow(['line']))['args'][0].scope]
        """
    )
    assert again == [
        ["doc", 42],
        ["doc", 42],
        ["doc", 42, "page", 1],
        ["doc", 42, "page", 1],
        ["doc", 42, "page", 1, "line"],
    ], again
    assert caller.run("result = S.call(P + 'add', 1, 1)") == 2


@pytest.mark.parametrize(("pmode", "cmode"), PAIRS, ids=PAIR_IDS)
def test_capability_update_reaches_the_callers_handler(providers, caller_for, pmode, cmode):
    caller = caller_for(cmode)
    out = caller.run(f"""
        P = {pmode + "_"!r}
        cap = S.call(P + "mint")
        seen = []
        cap.set_update_handler(seen.append)
        scope = S.call(P + "touch", cap, {{"seen": True}})
        page = cap.narrow(["page", 1])
        seen_page = []
        page.set_update_handler(seen_page.append)
        page_scope = S.call(P + "touch", page, {{"page": 1}})
        result = {{"scope": scope, "seen": seen, "page_scope": page_scope, "seen_page": seen_page}}
    """)
    assert out["scope"] == ["doc", 42]
    assert out["seen"] == [{"seen": True}]
    assert out["page_scope"] == ["doc", 42, "page", 1]
    assert out["seen_page"] == [{"page": 1}]


# ---------------------------------------------------------------------------------------------
# 8. Errors


@pytest.mark.parametrize(("pmode", "cmode"), PAIRS, ids=PAIR_IDS)
def test_errors_keep_their_message_and_unknown_names_are_typed(providers, caller_for, pmode, cmode):
    caller = caller_for(cmode)
    out = caller.run(f"""
        result = {{
            "fail": catch(S.call, {pmode + "_fail"!r}, "kaboom"),
            "missing": catch(S.call, "no_such_function_anywhere"),
            "after": S.call({pmode + "_add"!r}, 2, 3),
        }}
    """)
    assert out["fail"]["raised"], out
    assert "kaboom" in out["fail"]["message"], out["fail"]
    if cmode == "nb":
        assert out["fail"]["name"] == "ValueError", out["fail"]  # built-ins are rebuilt as such
    missing = out["missing"]
    assert missing["raised"] and "NoServerFunctionError" in missing["is"], missing
    assert missing["name"] == "NoServerFunctionError", missing
    assert "no_such_function_anywhere" in missing["message"], missing
    assert out["after"] == 5


# ---------------------------------------------------------------------------------------------
# 9. A client-key uplink may not register


def _wait_for_log(agent: Agent, pattern: str, timeout: float = WAIT) -> str:
    """Poll *agent*'s log until a line matches *pattern*."""
    rx = re.compile(pattern)

    def matching() -> str | None:
        lines = agent.log_path.read_text(errors="replace").splitlines()
        return next((line for line in lines if rx.search(line)), None)

    if not wait_until(matching, timeout, interval=0.05):  # polling a file: nothing to block on
        pytest.fail(f"{agent.name}: no log line matching {pattern!r}\n{agent.diagnostics()}")
    return matching() or ""


CLIENT_REGISTER = (
    "Cannot register @anvil.server.callable functions from an unprivileged (client) uplink."
)


@pytest.mark.parametrize("mode", MODES)
def test_client_key_uplink_that_registers_is_refused(providers, spawn, caller_for, host, mode):
    bystander = caller_for("real", name="bystander")
    rogue = spawn(mode, f"{mode}-rogue")
    out = rogue.run(f"""
        @S.callable("rogue_fn")
        def rogue_fn():
            return "should never be served"

        connected = catch(S.connect, {host.client_key!r}, url={host.url!r})
        first = catch(S.call, "anvil.private.echo", "x")
        result = {{"connected": connected, "first": first}}
    """)
    if mode == "real":
        # connect() returns; the fatal error frame arrives and the socket closes. The call in
        # flight fails with "connection lost" or with the stored fatal error, depending on
        # whether the frame or the call came first; the client's log shows the frame itself.
        assert not out["connected"]["raised"], out
        assert out["first"]["raised"], out
        _wait_for_log(rogue, r"Fatal error from Anvil server: " + re.escape(CLIENT_REGISTER))
        _wait_for_log(rogue, r"Anvil websocket closed \(code 1008")
    else:
        msgs = [out["connected"].get("message", ""), out["first"].get("message", "")]
        assert any(CLIENT_REGISTER in m for m in msgs), out

    # Its function was never registered, and the other connections are unaffected.
    missing = bystander.run("result = catch(S.call, 'rogue_fn')")
    assert missing["raised"] and "NoServerFunctionError" in missing["is"], missing
    assert bystander.run("result = S.call('real_add', 1, 2)") == 3
    assert bystander.run("result = S.call('nb_add', 1, 2)") == 3
    assert caller_for("nb").run("result = S.call('real_add', 2, 2)") == 4


# ---------------------------------------------------------------------------------------------
# 10. A wrong key


@pytest.mark.parametrize("mode", MODES)
def test_wrong_key(spawn, host, mode):
    agent = spawn(mode)
    out = agent.run(f"""
        connected = catch(S.connect, "not-a-key-" + "x" * 8, url={host.url!r})
        first = catch(S.call, "anvil.private.echo", "x")
        result = {{"connected": connected, "first": first}}
    """)
    if mode == "real":
        # Quirk of the real client: connect() returns; the calls raise the stored fatal error.
        assert not out["connected"]["raised"], out
        assert out["first"]["raised"], out
        assert "Anvil fatal error: Incorrect uplink key" in out["first"]["message"], out
    else:
        # anvil_nb's client refuses at connect() already (documented: AppOfflineError).
        assert out["connected"]["raised"], out
        assert "Incorrect uplink key" in out["connected"]["message"], out
        assert "AppOfflineError" in out["connected"]["is"], out
        # (A later server.call starts an embedded host, as documented: not checked here.)


# ---------------------------------------------------------------------------------------------
# 11. The provider dies mid-call


@pytest.mark.parametrize(("pmode", "cmode"), PAIRS, ids=PAIR_IDS)
def test_provider_killed_mid_call_fails_the_call(providers, spawn, caller_for, host, pmode, cmode):
    doomed = _start_provider(spawn, host, pmode, "doomed_")
    caller = caller_for(cmode)
    caller.send("result = catch(S.call, 'doomed_block')")
    doomed.wait_event("in_block")
    killed_at = time.monotonic()
    doomed.kill()
    out = caller.result(timeout=10)
    took = time.monotonic() - killed_at
    assert out["raised"], out
    assert took < 5.0, f"the call failed only {took:.1f} s after the provider died"
    assert "UplinkDisconnectedError" in out["is"], out
    # The caller's connection still works.
    assert caller.run("result = S.call('real_add', 1, 2)") == 3
    gone = caller.run("result = catch(S.call, 'doomed_block')")
    assert gone["raised"] and "NoServerFunctionError" in gone["is"], gone


# ---------------------------------------------------------------------------------------------
# More of the same paths: nested calls, several media, shared data, concurrency, trust, helpers


@pytest.mark.parametrize(("outer", "inner"), PAIRS, ids=[f"{o}-then-{i}" for o, i in PAIRS])
def test_nested_call_context(providers, caller_for, outer, inner):
    caller = caller_for("real")
    ctx = caller.run(f"result = S.call({outer + '_relay'!r}, {inner + '_ctx'!r})")
    assert ctx["remote_type"] == "uplink", ctx  # the outer provider made the inner call
    assert ctx["trusted"] is True, ctx
    assert ctx["stack"] == ["uplink", "client_uplink"], ctx
    assert ctx["client_type"] == "client_uplink", ctx  # the client of the whole chain


@pytest.mark.parametrize(("outer", "inner"), PAIRS, ids=[f"{o}-then-{i}" for o, i in PAIRS])
def test_nested_call_shares_the_callers_session(providers, caller_for, outer, inner):
    """A nested call runs in the session of the call it is nested in (the caller's).

    So a count kept by ``inner_bump`` goes on across the direct and the nested calls. The real
    client neither sends its session with a nested call nor adopts the one that comes back, so
    when the outer function returns, its ``sessionData`` is the copy it got at the start: the
    App Server stores a returned blob only if the session did not change since the request
    went out (PROTOCOL.md section 7), so the nested call's change survives.
    """
    caller = caller_for("real")
    assert caller.run(f"result = S.call({inner + '_bump'!r})") == 1
    assert caller.run(f"result = S.call({outer + '_relay'!r}, {inner + '_bump'!r})") == 2
    assert caller.run(f"result = S.call({inner + '_bump'!r})") == 3


@pytest.mark.parametrize(("pmode", "cmode"), PAIRS, ids=PAIR_IDS)
def test_a_slow_call_does_not_undo_session_changes_made_meanwhile(
    providers, caller_for, pmode, cmode
):
    """Two calls of one connection overlap; only the short one changes the session.

    The slow call returns the (unchanged) copy it got at the start. The App Server keeps a
    returned blob only if the session has not changed since the request went out (PROTOCOL.md
    section 7), so the short call's change survives.
    """
    caller = caller_for(cmode)
    token = f"t-{secrets.token_hex(4)}"
    caller.run(f"""
        P = {pmode + "_"!r}
        box = []
        slow = threading.Thread(target=lambda: box.append(S.call(P + "gate", {token!r})))
        slow.start()
    """)
    providers[pmode].wait_event("in_gate", token=token)
    assert caller.run("result = S.call(P + 'bump')") == 1
    out = caller.run(f"""
        S.call(P + "release", {token!r})
        slow.join(20)
        result = [box, S.call(P + "bump")]
    """)
    assert out == [["released"], 2], out


@pytest.mark.parametrize(("pmode", "cmode"), PAIRS, ids=PAIR_IDS)
def test_session_keeps_typed_values(providers, caller_for, pmode, cmode):
    caller = caller_for(cmode)
    caller.run(f"""
        P = {pmode + "_"!r}
        when = datetime.datetime(2024, 2, 29, 23, 59, 59, 1, tzinfo=datetime.timezone.utc)
        assert S.call(P + "remember", {{"when": when, "pt": Point(1, [2]), "big": 2**70}}) is True
    """)
    out = caller.run("""
        r = S.call(P + "recall")
        v = r["v"]
        result = [r["type"], type(v["when"]).__name__, v["when"] == when, v["pt"] == Point(1, [2]),
                  v["big"] == 2**70]
    """)
    assert out == ["dict", "datetime", True, True, True]


@pytest.mark.parametrize(("pmode", "cmode"), PAIRS, ids=PAIR_IDS)
def test_several_media_in_one_call_including_empty(providers, caller_for, pmode, cmode):
    caller = caller_for(cmode)
    out = caller.run(f"""
        items = [BlobMedia("text/plain", b"", name="empty.txt"),
                 BlobMedia("text/plain", "héllo".encode(), name="small.txt"),
                 BlobMedia("application/octet-stream", bytes(range(256)) * 1000, name=None)]
        r = S.call({pmode + "_media_list"!r}, items)
        result = {{
            "seen": r["seen"],
            "sent": [[m.content_type, m.name, hashlib.sha256(m.get_bytes()).hexdigest()] for m in items],
            "back": [[m.content_type, m.name, hashlib.sha256(m.get_bytes()).hexdigest()] for m in r["back"]],
        }}
    """)
    assert out["seen"] == out["sent"]
    assert out["back"] == out["sent"]


@pytest.mark.parametrize(("pmode", "cmode"), PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("key", ["client", "server"])
def test_shared_data_portables_and_remote_is_trusted(providers, caller_for, pmode, cmode, key):
    caller = caller_for(cmode, key)
    out = caller.run(f"""
        r = S.call({pmode + "_labels"!r}, [Label("a"), Label("b"), Label("a")])
        result = {{"texts": r["texts"], "provider_saw_trusted": r["from_trusted"],
                  "back": [x.text for x in r["back"]], "caller_saw_trusted": [x.from_trusted for x in r["back"]]}}
    """)
    assert out["texts"] == ["a", "b", "a"]
    assert out["back"] == ["A", "B", "A"]
    assert out["provider_saw_trusted"] == [key == "server"] * 3, out
    assert out["caller_saw_trusted"] == [True] * 3, out  # responses come from the host


@pytest.mark.parametrize(("pmode", "cmode"), PAIRS, ids=PAIR_IDS)
def test_concurrent_calls_from_one_connection(providers, caller_for, pmode, cmode):
    caller = caller_for(cmode)
    out = caller.run(f"""
        import concurrent.futures, uuid
        n, token = 8, uuid.uuid4().hex
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(S.call, {pmode + "_gather"!r}, i, n, token) for i in range(n)]
            result = [f.result(timeout=20) for f in futures]
    """)
    assert out == list(range(8))


@pytest.mark.parametrize("cmode", MODES)
def test_untrusted_caller_cannot_reach_prefixed_names(providers, caller_for, cmode):
    caller = caller_for(cmode)
    out = caller.run("result = [catch(S.call, 'task:anything'), catch(S.call, 'http:/x')]")
    for r in out:
        assert r["raised"] and "PermissionDenied" in r["is"], out
    assert caller.run("result = S.call('real_add', 1, 2)") == 3


def test_real_client_helpers_and_wire_form(providers, caller_for, host):
    caller = caller_for("real")
    origin = host.http_url.rstrip("/")
    out = caller.run("""
        result = {"app_origin": S.get_app_origin(), "api_origin": S.get_api_origin(),
                  "session_id": S.get_session_id(), "app_id": anvil.app.id,
                  "environment": anvil.app.environment.name,
                  # (S.context.type stays "uplink" in the main thread: a quirk of the client)
                  "own_type": S.CallContext._DEFAULT_TYPE}
    """)
    assert out["app_origin"] == origin
    assert out["api_origin"] == origin + "/_/api"
    assert isinstance(out["session_id"], str) and out["session_id"], out
    assert out["environment"] == "Notebook", out
    assert out["own_type"] == "client", out  # priv "client": the real client logs "as CLIENT"
    _wait_for_log(caller, r'Connected to "Notebook" as CLIENT')

    # What an untrusted caller receives: responses without "type" and without session contents.
    frames = caller.run("""
        FRAMES.clear()
        S.call("real_remember", "secret-value")
        S.call("nb_remember", "secret-value")
        S.call("real_relay", "nb_bump")
        result = FRAMES
    """)
    responses = [f for f in frames if "id" in f]
    assert len(responses) == 3, frames
    for f in responses:
        assert "type" not in f, f
        assert "sessionData" not in f, f
        assert "secret-value" not in json.dumps(f), f


@pytest.mark.parametrize(("outer", "inner"), PAIRS, ids=[f"{o}-then-{i}" for o, i in PAIRS])
def test_nested_calls_pass_on_updates_and_errors(providers, caller_for, outer, inner):
    caller = caller_for("real" if outer == "nb" else "nb")
    out = caller.run(f"""
        cap = S.call({inner + "_mint"!r})
        seen = []
        cap.set_update_handler(seen.append)
        scope = S.call({outer + "_relay"!r}, {inner + "_touch"!r}, cap, {{"via": "nested"}})
        result = {{"scope": scope, "seen": seen,
                  "fail": catch(S.call, {outer + "_relay"!r}, {inner + "_fail"!r}, "deep kaboom")}}
    """)
    assert out["scope"] == ["doc", 42]
    assert out["seen"] == [{"via": "nested"}], out
    assert out["fail"]["raised"] and "deep kaboom" in out["fail"]["message"], out


@pytest.mark.parametrize(("pmode", "cmode"), PAIRS, ids=PAIR_IDS)
def test_anvil_error_classes_cross_as_themselves(providers, caller_for, pmode, cmode):
    caller = caller_for(cmode)
    out = caller.run(f"result = catch(S.call, {pmode + '_deny'!r}, 'not yours')")
    assert out["raised"] and "PermissionDenied" in out["is"], out
    assert "not yours" in out["message"], out


@pytest.mark.parametrize("cmode", MODES)
def test_capabilities_are_bound_to_the_callers_session(providers, caller_for, cmode):
    a = caller_for(cmode, name="owner")
    b = caller_for(cmode, name="thief")
    scope, mac = a.run("cap = S.call('real_mint')\nresult = [cap._scope, cap._mac]")
    assert scope == ["doc", 42] and mac, (scope, mac)
    stolen = b.run(
        f"result = catch(S.call, 'real_inspect_cap', S.Capability({scope!r}, mac={mac!r}))"
    )
    assert stolen["raised"] and "PermissionDenied" in stolen["is"], stolen
    assert a.run("result = S.call('nb_inspect_cap', cap)")["scope"] == ["doc", 42]


@pytest.mark.parametrize("cmode", MODES)
def test_trusted_caller_capability_rules(providers, caller_for, cmode):
    caller = caller_for(cmode, "server")
    out = caller.run("""
        result = {
            "unsigned": catch(S.call, "real_inspect_cap", S.Capability(["doc", 42])),
            "reserved": catch(S.call, "real_inspect_cap", S.Capability(["_", 1], mac="forged")),
        }
    """)
    assert not out["unsigned"]["raised"], out  # trusted code may mint capabilities
    assert out["unsigned"]["value"]["scope"] == ["doc", 42], out
    assert out["reserved"]["raised"] and "PermissionDenied" in out["reserved"]["is"], out


@pytest.mark.parametrize(("pmode", "cmode"), PAIRS, ids=PAIR_IDS)
def test_caller_killed_mid_call_leaves_the_provider_working(providers, caller_for, pmode, cmode):
    doomed = caller_for(cmode, name="doomed-caller")
    other = caller_for("real" if cmode == "nb" else "nb", name="other-caller")
    token = f"t-{secrets.token_hex(4)}"
    doomed.send(f"result = S.call({pmode + '_gate'!r}, {token!r})")
    providers[pmode].wait_event("in_gate", token=token)
    doomed.kill()
    assert other.run(f"result = S.call({pmode + '_release'!r}, {token!r})") is True
    providers[pmode].wait_event(
        "gate_done", token=token
    )  # its answer goes to a caller that is gone
    assert other.run(f"result = S.call({pmode + '_add'!r}, 20, 22)") == 42
    assert other.run(f"result = S.call({pmode + '_bump'!r})") == 1


@pytest.mark.parametrize(("pmode", "cmode"), PAIRS, ids=PAIR_IDS)
def test_concurrent_media_calls_from_one_connection(providers, caller_for, pmode, cmode):
    caller = caller_for(cmode)
    out = caller.run(f"""
        import concurrent.futures, random
        blobs = [random.Random(i).randbytes(300_000 + i) for i in range(4)]
        def one(i):
            r = S.call({pmode + "_media_reverse"!r}, BlobMedia("application/x-test", blobs[i]))
            return r["len"] == len(blobs[i]) and r["back"].get_bytes() == blobs[i][::-1]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            result = list(pool.map(one, range(4), timeout=20))
    """)
    assert out == [True] * 4


def test_invalid_registration_name_is_fatal_only_for_that_connection(
    providers, spawn, caller_for, host
):
    bad = spawn("real", "bad-name")
    out = bad.run(f"""
        S.register(lambda: 1, name="unbalanced(")
        S.connect({host.server_key!r}, url={host.url!r})
        result = catch(S.call, "anvil.private.echo", "x")
    """)
    assert out["raised"], out  # "connection lost" or the fatal error itself (a race, see above)
    _wait_for_log(bad, r"Fatal error from Anvil server: Invalid function name specification")
    _wait_for_log(bad, r"Anvil websocket closed \(code 1008")
    assert caller_for("real").run("result = S.call('nb_add', 1, 2)") == 3


def test_late_registration_is_callable_after_one_round_trip(providers, spawn, caller_for, host):
    late = spawn("real", "late-provider")
    late.run(f"S.connect({host.server_key!r}, url={host.url!r})")
    late.run("""
        @S.callable("late_fn")
        def late_fn(x):
            return ["late", x]

        result = S.call("anvil.private.echo", "sync")
    """)
    assert caller_for("nb").run("result = S.call('late_fn', 5)") == ["late", 5]


# ---------------------------------------------------------------------------------------------
# The host stops and comes back


def test_host_restart_with_real_clients_connected(spawn, tmp_path):
    """SIGTERM with a call in flight: the call fails, the host exits 0 in time; after a restart
    on the same port the real provider reconnects by itself and registers again."""
    first = HostProc(tmp_path / "data", tmp_path / "host1.log")
    second: HostProc | None = None
    try:
        provider = spawn("real", "restart-provider")
        provider.run("P = 'rs_'\n" + PROVIDES)
        assert provider.connect(first.server_key, first.url) == "READY"
        caller = spawn("real", "restart-caller")
        assert caller.connect(first.client_key, first.url) == "READY"
        caller.send("result = catch(S.call, 'rs_gate', 'never')")
        provider.wait_event("in_gate", token="never")

        code, took = first.stop()
        assert code == 0, first.log()
        assert took < 5.0, f"{took:.1f} s"
        failed = caller.result(timeout=10)
        assert failed["raised"], failed
        assert "RuntimeUnavailableError" in failed["is"], failed  # as documented in serve.py

        port = int(first.url.rsplit(":", 1)[1].split("/")[0])
        second = HostProc.restart(first, port)
        newcomer = spawn("nb", "restart-newcomer")
        assert newcomer.connect(second.client_key, second.url) == "READY"

        def added() -> dict[str, Any] | None:  # the real client retries 1 s after a close
            r = newcomer.run("result = catch(S.call, 'rs_add', 1, 2)")
            assert not r["raised"] or "NoServerFunctionError" in r["is"], r
            return None if r["raised"] else r

        r = wait_until(added, 30, "the provider to register again", interval=0.2)
        assert r == {"raised": False, "value": 3}, r
    finally:
        for h in (first, second):
            if h is not None and h.proc.poll() is None:
                h.stop()


# ---------------------------------------------------------------------------------------------
# Registry and naming


@pytest.mark.parametrize(("pmode", "cmode"), PAIRS, ids=PAIR_IDS)
def test_provider_sees_the_callers_session_id(providers, caller_for, pmode, cmode):
    caller = caller_for(cmode)
    own, seen = caller.run(f"result = [S.get_session_id(), S.call({pmode + '_sid'!r})]")
    assert isinstance(own, str) and own, own
    assert seen == own


@pytest.mark.parametrize(("pmode", "cmode"), PAIRS, ids=PAIR_IDS)
def test_unknown_portable_class_is_an_error_naming_it(providers, caller_for, pmode, cmode):
    caller = caller_for(cmode)
    out = caller.run(f"""
        @S.portable_class("tests.uplink_real.OnlyInTheCaller")
        class OnlyInTheCaller:
            pass

        result = [catch(S.call, {pmode + "_echo"!r}, OnlyInTheCaller()),
                  S.call({pmode + "_add"!r}, 1, 2)]
    """)
    err, after = out
    assert err["raised"], out
    if pmode == "nb":
        assert "tests.uplink_real.OnlyInTheCaller" in err["message"], err
    else:  # the real client first tries to import the module part of the name
        assert "tests.uplink_real" in err["message"], err
    assert after == 3


def test_regex_names_match_the_whole_command(providers, spawn, caller_for, host):
    provider = spawn("real", "regex-provider")
    provider.run("""
        @S.callable("rx_[a-z]+")
        def rx(*args):
            return ["rx", list(args)]
    """)
    assert provider.connect(host.server_key, host.url) == "READY"
    out = caller_for("nb").run("""
        result = [S.call("rx_abc", 1), catch(S.call, "rx_ABC"), catch(S.call, "xrx_abc"),
                  catch(S.call, "rx_abc_")]
    """)
    assert out[0] == ["rx", [1]]
    for r in out[1:]:
        assert r["raised"] and "NoServerFunctionError" in r["is"], out


def test_a_name_served_twice_survives_one_provider(providers, spawn, caller_for, host):
    ones = []
    for who in ("dup-a", "dup-b"):
        p = spawn("real", who)
        p.run(f"""
            @S.callable("dup_fn")
            def dup_fn():
                return {who!r}
        """)
        assert p.connect(host.server_key, host.url) == "READY"
        ones.append(p)
    caller = caller_for("real")
    assert caller.run("result = S.call('dup_fn')") in ("dup-a", "dup-b")
    ones[0].kill()
    # The dead provider's registration goes with its connection (allow the host to notice).
    deadline = time.monotonic() + 10
    while True:
        got = caller.run("result = catch(S.call, 'dup_fn')")
        if got == {"raised": False, "value": "dup-b"} or time.monotonic() > deadline:
            break
        assert not got["raised"] or "UplinkDisconnectedError" in got["is"], got
    assert got == {"raised": False, "value": "dup-b"}
    assert [caller.run("result = S.call('dup_fn')") for _ in range(5)] == ["dup-b"] * 5


@pytest.mark.parametrize("cmode", MODES)
def test_reset_session_starts_afresh_and_voids_capabilities(providers, caller_for, cmode):
    caller = caller_for(cmode)
    reset = "S.reset_session()" if cmode == "nb" else "S.call('anvil.private.reset_session')"
    out = caller.run(f"""
        cap = S.call("real_mint")
        before = [S.call("nb_bump"), S.call("real_bump"), S.get_session_id()]
        {reset}
        result = {{
            "before": before,
            "after": [S.call("nb_bump"), S.get_session_id()],
            "old_cap": catch(S.call, "real_inspect_cap", cap),
            "new_cap": S.call("real_inspect_cap", S.call("real_mint"))["scope"],
        }}
    """)
    assert out["before"][:2] == [1, 2]
    assert out["after"][0] == 1, out
    assert out["after"][1] != out["before"][2], out
    assert out["old_cap"]["raised"] and "PermissionDenied" in out["old_cap"]["is"], out
    assert out["new_cap"] == ["doc", 42]
