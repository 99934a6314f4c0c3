"""The browser client in a real browser, and the routes that serve it.

The browser test
    An in-process host on a real port (``NetHost``: a tornado listener on 127.0.0.1) with an
    anvil_nb provider holding the server key, and Debian's Chromium (``support/browser.py``)
    on the host's example page ``_/example``. The page's form calls a function and shows a
    result and a remote error; then the test imports ``./client.js`` into the page (the same
    origin, the same cookie session) and checks, through ``call``: the session kept across
    calls and across a page reload (the provider counts in ``server.session``), a capability
    the page got, narrowed and passed back, whose update reaches both ``cap.onUpdate`` and
    ``onCapabilityUpdate``; a ``Date`` (with the browser's offset) and a ``DateOnly`` round
    trip; a ``File`` and a 200 kB ``Blob`` (four chunks) round trip. A screenshot of the example
    page goes to the artifacts folder the other browser tests use. Every wait is bounded (a
    race with a timer in the page; Playwright's own timeouts).

The routes
    ``_/client.js`` (standalone and in Jupyter: public, ``text/javascript``; 503 saying how to
    build it when it is not built; app routes; 404 for an app that does not exist) and
    ``_/example`` (public standalone, Jupyter's auth in Jupyter unless ``AnvilNB.public``).
"""

# ruff: noqa: F811 (the Jupyter fixtures imported from test_serverext are test arguments here)

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import BrowserContext, Page, expect
from support.browser import ARTIFACTS, WAIT
from support.nethost import NetHost

# The Jupyter placement's fixtures (a pytest-jupyter server with the extension): shared with
# test_serverext.py rather than copied.
from test_serverext import (  # noqa: F401
    allow_unauthenticated_access,
    anvil_config,
    anvil_data_dir,
    anvil_limits,
    anvil_public,
    anvil_url,
    fetch,
    jp_server_config,
    restore_anvil_environ,
    server,
    token,
)

from anvil_nb import server as anvil_server
from anvil_nb.core.errors import PermissionDenied
from anvil_nb.media import BlobMedia
from anvil_nb.web import static

pytest_plugins = ["pytest_jupyter.jupyter_server"]
JS = "text/javascript; charset=utf-8"

requires_built_client = pytest.mark.skipif(
    not static.CLIENT_JS.is_file(),
    reason="anvil_nb/static/client.js is not built (pip install -e . builds it)",
)


# ---------------------------------------------------------------------------------------------
# The provider's functions


def greet(name: str) -> str:
    return "hi " + name


def refuse() -> None:
    raise PermissionDenied("not for you")


def count() -> int:
    anvil_server.session["n"] = anvil_server.session.get("n", 0) + 1
    return anvil_server.session["n"]


def mint() -> Any:
    return anvil_server.Capability(["doc", 7])


def watch(cap: Any) -> list[Any]:
    cap.send_update({"seen": True})
    return list(cap.scope)


def dates(when: dt.datetime, day: dt.date) -> list[Any]:
    return [when, when.isoformat(), day, day.isoformat()]


def media(m: Any) -> list[Any]:
    data = m.get_bytes()
    copy = BlobMedia(m.content_type, data, name=m.name)
    return [copy, m.content_type, m.name, len(data), hashlib.sha256(data).hexdigest()]


FUNCTIONS = {f.__name__: f for f in (greet, refuse, count, mint, watch, dates, media)}

#: Runs in the page: imports the client beside the page and races *body* against a timer.
IN_PAGE = """async ([body, ms]) => {
  const anvil = await import("./client.js");
  const timer = new Promise((_, reject) => setTimeout(() => reject(new Error("timed out")), ms));
  const run = new Function("anvil", `return (async () => { ${body} })()`);
  return await Promise.race([run(anvil), timer]);
}"""


def in_page(page: Page, body: str) -> Any:
    """Run *body* (an async function body with ``anvil`` = the client module) in the page."""
    return page.evaluate(IN_PAGE, [body, WAIT * 1000])


@contextlib.contextmanager
def artifacts_on_failure(page: Page) -> Iterator[None]:
    try:
        yield
    except BaseException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(Exception):
            page.screenshot(path=str(ARTIFACTS / "browser-client-failure.png"), timeout=5000)
        with contextlib.suppress(Exception):
            (ARTIFACTS / "browser-client-failure.html").write_text(page.content())
        raise


@pytest.fixture
def provided(net: NetHost) -> NetHost:
    net.provider(**FUNCTIONS)
    return net


@requires_built_client
def test_a_page_calls_functions_through_the_client(provided: NetHost, browser: BrowserContext):
    page = browser.pages[0] if browser.pages else browser.new_page()
    console: list[str] = []
    page.on("console", lambda m: console.append(m.text))
    origin = f"http://127.0.0.1:{provided.port}"
    with artifacts_on_failure(page):
        page.goto(f"{origin}/_/example")

        # the example page's form: a result, then a remote error
        page.fill("#name", "greet")
        page.fill("#args", '["web"]')
        page.click("#call")
        expect(page.locator("#result")).to_have_text('"hi web"')
        expect(page.locator("#state")).to_have_text("connection: open")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "browser-client-example.png"))
        page.fill("#name", "refuse")
        page.fill("#args", "[]")
        page.click("#call")
        expect(page.locator("#error")).to_have_text("anvil.server.PermissionDenied: not for you")
        expect(page.locator("#result")).to_be_empty()

        error = in_page(
            page,
            """try { await anvil.call("refuse"); return "resolved"; }
               catch (e) { return [e instanceof Error, e instanceof anvil.AnvilError, e.type, e.message]; }""",
        )
        assert error == [True, True, "anvil.server.PermissionDenied", "not for you"]

        # one cookie session across calls and across a reload
        assert in_page(page, 'return [await anvil.call("count"), await anvil.call("count")];') == [
            1,
            2,
        ]
        page.reload()
        assert in_page(page, 'return await anvil.call("count");') == 3

        # a capability: received, narrowed, passed back; its update comes to the page
        update = in_page(
            page,
            """const cap = await anvil.call("mint");
               const narrow = cap.narrow(["page", 1]);
               const mine = [], all = [];
               narrow.onUpdate((u) => mine.push(u));
               anvil.onCapabilityUpdate((c, u) => all.push([c === narrow, u]));
               const scope = await anvil.call("watch", narrow);
               return [cap instanceof anvil.Capability, cap.scope, scope, mine, all];""",
        )
        assert update == [
            True,
            ["doc", 7],
            ["doc", 7, "page", 1],
            [{"seen": True}],
            [[True, {"seen": True}]],
        ]

        # dates: a Date in the browser's offset, and a date-only value
        when = in_page(
            page,
            """const d = new Date(Date.UTC(2024, 1, 29, 12, 30, 5, 123));
               const [back, iso, day, dayIso] = await anvil.call("dates", d, new anvil.DateOnly(2024, 2, 29));
               return [back instanceof Date, back.getTime() === d.getTime(), iso,
                       day instanceof anvil.DateOnly, day.toWire(), dayIso, -d.getTimezoneOffset()];""",
        )
        offset = dt.timedelta(minutes=when[6])
        sent = dt.datetime(2024, 2, 29, 12, 30, 5, 123000, tzinfo=dt.timezone.utc)
        assert when[:2] == [True, True]
        assert dt.datetime.fromisoformat(when[2]) == sent
        assert dt.datetime.fromisoformat(when[2]).utcoffset() == offset
        assert when[3:6] == [True, "2024-02-29", "2024-02-29"]

        # media: a File and a 200 kB Blob (four 64 kB chunks each way)
        files = in_page(
            page,
            """const file = new File(["h\\u00e9llo"], "h.txt", {type: "text/plain"});
               const [back, type, name, size, sha] = await anvil.call("media", file);
               const big = new Uint8Array(200000).map((_, i) => i % 251);
               const [bigBack, bigType, bigName, bigSize, bigSha] = await anvil.call(
                 "media", new Blob([big], {type: "application/x-test"}));
               const same = new Uint8Array(await bigBack.arrayBuffer()).every((b, i) => b === big[i]);
               return [await back.text(), back.type, back.name, type, name, size,
                       bigBack.size, bigBack.type, bigName, bigSize, bigSha, same];""",
        )
        big = bytes(i % 251 for i in range(200_000))
        assert files == [
            "héllo", "text/plain", "h.txt", "text/plain", "h.txt", 6,
            200_000, "application/x-test", None, 200_000, hashlib.sha256(big).hexdigest(), True,
        ]  # fmt: skip
    assert not [m for m in console if "anvil_nb" in m], console


# ---------------------------------------------------------------------------------------------
# The routes, standalone


def get(net: NetHost, path: str) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{net.port}/{path}", timeout=WAIT)


@requires_built_client
def test_client_js_is_served_at_every_app_root(net: NetHost):
    net.ht.run(net.host.app, "books")  # an app the host has
    for path in ("_/client.js", "app/books/_/client.js"):
        response = get(net, path)
        assert response.status_code == 200, path
        assert response.headers["Content-Type"] == JS
        assert response.content == static.CLIENT_JS.read_bytes()
        assert "export" in response.text
    assert get(net, "app/nowhere/_/client.js").status_code == 404
    again = requests.get(
        f"http://127.0.0.1:{net.port}/_/client.js",
        headers={"If-None-Match": get(net, "_/client.js").headers["Etag"]},
        timeout=WAIT,
    )
    assert again.status_code == 304


def test_an_unbuilt_client_is_a_503_saying_how_to_build_it(
    net: NetHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(static.ClientScriptHandler, "path", tmp_path / "client.js")
    response = get(net, "_/client.js")
    assert response.status_code == 503
    assert "npm run build" in response.text and "pip install -e ." in response.text


def test_the_example_page_imports_the_client_beside_it(net: NetHost):
    response = get(net, "_/example")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert 'from "./client.js"' in response.text
    assert get(net, "app/nowhere/_/example").status_code == 404


# ---------------------------------------------------------------------------------------------
# The routes, inside Jupyter


@pytest.fixture(params=["/"], ids=["root"])
def jp_base_url(request: pytest.FixtureRequest) -> str:
    return request.param


@requires_built_client
async def test_in_jupyter_client_js_is_public(fetch: Callable[..., Any]):
    response = await fetch("client.js")
    assert response.code == 200
    assert response.headers["Content-Type"] == JS
    assert response.body == static.CLIENT_JS.read_bytes()


async def test_in_jupyter_the_example_page_needs_jupyter_auth(
    fetch: Callable[..., Any], token: str
):
    assert (await fetch("example")).code == 403
    response = await fetch("example", token=token)
    assert response.code == 200
    assert b'from "./client.js"' in response.body


@pytest.mark.parametrize("anvil_public", [True])
async def test_in_jupyter_the_example_page_is_public_when_the_extension_is(
    fetch: Callable[..., Any], anvil_public: bool
):
    assert anvil_public
    assert (await fetch("example")).code == 200
