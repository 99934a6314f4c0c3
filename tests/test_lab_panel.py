"""The JupyterLab panel "Server Functions" (labextension/, docs/lab.md) in a real Lab and Chromium.

What runs
    The ``lab`` and ``browser`` fixtures (``support/browser.py``): ``jupyter lab`` of this venv,
    which finds the prebuilt extension where installing anvil_nb put it
    (``share/jupyter/labextensions/anvil_nb``), and Debian's Chromium through Playwright.

The steps
    Two notebooks are run, each in a page of its own, so the host has two apps: ``panel`` (a
    ``%%callable`` ``greet`` and a background task ``b_slow``, launched and left running) and
    ``shop`` (``price`` and an HTTP endpoint). The panel is opened from the command palette in
    a third page. It must list both apps with their functions, labelled and with providers; show
    the server key only on "show"; show calls made by an uplink script with the client key
    (untrusted ``client_uplink``) in its feed, a row opening to its CallContext and error; call
    ``greet`` through the try-a-call form (a result; a remote error with its type) as an
    untrusted browser; and show the running task with its state, which its Kill button kills.

Artifacts
    ``lab-panel.png`` (the panel with two apps, a call feed and a task) in the artifacts folder
    (``$ANVIL_NB_TEST_ARTIFACTS``, or ``anvil_nb-test-artifacts`` in the temp folder); with
    ``ANVIL_NB_SCREENSHOT=1`` it is written to ``docs/images/lab-panel.png`` instead (the README's
    image). On a failure: ``lab-panel-failure.png``, ``.html`` and the server's log.

Every wait is bounded (Playwright's timeouts, ``wait_until`` deadlines); the Lab, the browser
and the uplink client are stopped at the end.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, Page, expect
from support.browser import (
    ARTIFACTS,
    START_WAIT,
    WAIT,
    JupyterLab,
    artifacts_on_failure,
    slow_task_cells,
    write_notebook,
)
from support.waiting import wait_until

from anvil_nb.client.client import Client, FunctionRegistry
from anvil_nb.client.websocket import WebSocketTransport

README_IMAGE = Path(__file__).resolve().parents[1] / "docs" / "images" / "lab-panel.png"

PANEL_CELLS = [
    "%load_ext anvil_nb",
    '%%callable\ndef greet(name):\n    return "hi " + name',
    *slow_task_cells(0.4),
]
SHOP_CELLS = [
    "%load_ext anvil_nb",
    "%%callable\n"
    "from anvil_nb import server\n"
    "\n"
    "def price(item):\n"
    "    return {'apple': 3}[item]\n"
    "\n"
    '@server.http_endpoint("/items")\n'
    "def items():\n"
    "    return ['apple']",
]


def test_the_labextension_is_installed_and_enabled():
    """``pip install`` (editable too) put the prebuilt extension where this venv's Lab finds it."""
    result = subprocess.run(
        [sys.executable, "-m", "jupyter", "labextension", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    listing = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)
    line = next((ln for ln in listing.splitlines() if ln.strip().startswith("anvil_nb ")), None)
    assert line is not None, listing
    assert "enabled" in line and "OK" in line and "(python, anvil_nb)" in line, line
    assert Path(sys.prefix, "share/jupyter/labextensions/anvil_nb/package.json").is_file()


def run_notebook(page: Page, lab: JupyterLab, name: str, cells: list[str]) -> None:
    """Write *name*.ipynb, open it in *page*, wait for its kernel, and Run → Run All Cells."""
    path = f"{name}.ipynb"
    write_notebook(lab.root / path, cells)
    page.goto(f"{lab.base}lab/tree/{path}?reset&token={lab.token}")  # reset: only this one
    notebook = page.locator(".jp-NotebookPanel:visible .jp-Notebook")
    expect(notebook.locator(".jp-Cell")).to_have_count(len(cells), timeout=START_WAIT * 1000)
    wait_until(
        lambda: lab.kernel_state(path) == "idle",
        START_WAIT,
        f"{path}'s kernel to be idle",
        interval=0.05,
    )
    expect(
        page.locator(
            ".jp-NotebookPanel:visible .jp-Notebook-ExecutionIndicator[data-status='idle']"
        )
    ).to_be_visible()
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-item", has_text="Run All Cells").first.click()


def open_panel(page: Page, lab: JupyterLab) -> None:
    """Open the Lab and the panel from the command palette."""
    page.goto(f"{lab.base}lab?reset&token={lab.token}")
    expect(page.locator("#jp-main-dock-panel")).to_be_visible(timeout=START_WAIT * 1000)
    page.keyboard.press("Control+Shift+C")
    palette = page.locator(".lm-CommandPalette-input")
    expect(palette).to_be_visible()
    palette.fill("Open Server Functions")
    page.locator(".lm-CommandPalette-item", has_text="Open Server Functions").first.click()
    expect(page.locator("#anvil-nb-panel")).to_be_visible()
    # Wider than the default sidebar, for reading (and the screenshot): drag its handle.
    handle = page.locator("#jp-main-split-panel > .lm-SplitPanel-handle").first
    box = handle.bounding_box()
    if box:
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + 300)
        page.mouse.down()
        page.mouse.move(box["x"] + 300, box["y"] + 300, steps=5)
        page.mouse.up()


def test_the_panel_shows_apps_calls_and_tasks_and_tries_calls(
    lab: JupyterLab, browser: BrowserContext
):
    page = browser.pages[0] if browser.pages else browser.new_page()
    with artifacts_on_failure(page, lab, "lab-panel"):
        # Two notebooks, two apps, each in a page of its own (their kernels outlive the pages).
        for name, cells, function in (
            ("panel", PANEL_CELLS, "greet"),
            ("shop", SHOP_CELLS, "price"),
        ):
            nb_page = browser.new_page()
            run_notebook(nb_page, lab, name, cells)
            wait_until(
                lambda: function in lab.anvil_state(name)["registrations"],  # noqa: B023
                WAIT,
                f"{function} to be registered in app {name}",
            )
            nb_page.close()
        _, apps = lab.request("GET", "anvil/_/admin/apps")
        keys = {a["app"]: a for a in apps}

        open_panel(page, lab)
        panel = page.locator("#anvil-nb-panel")
        expect(panel.locator(".anvil-nb-lab-status")).to_have_attribute("data-status", "live")

        # The apps and their registries: names, kinds and providers (the kernels).
        app = panel.locator('.anvil-nb-lab-app[data-app="panel"]')
        shop = panel.locator('.anvil-nb-lab-app[data-app="shop"]')
        greet = app.locator('.anvil-nb-lab-fn[data-name="greet"]')
        expect(greet).to_have_attribute("data-kind", "function")
        expect(greet.locator(".anvil-nb-lab-providers")).to_contain_text(
            "server_module: panel.ipynb"
        )
        expect(app.locator('.anvil-nb-lab-fn[data-name="task:b_slow"]')).to_have_attribute(
            "data-kind", "task"
        )
        expect(shop.locator('.anvil-nb-lab-fn[data-name="price"]')).to_have_count(1)
        expect(shop.locator('.anvil-nb-lab-fn[data-kind="http"]')).to_contain_text("HTTP")
        expect(app.locator("code.anvil-nb-lab-client-key")).to_have_text(
            keys["panel"]["client_key"]
        )
        expect(app.locator(".anvil-nb-lab-keys")).to_contain_text(lab.uplink_url)

        # The server key is hidden until "show".
        server_key = app.locator("code.anvil-nb-lab-server-key")
        expect(server_key).not_to_have_text(keys["panel"]["server_key"])
        app.get_by_role("button", name="Show the server key of panel").click()
        expect(server_key).to_have_text(keys["panel"]["server_key"])
        app.get_by_role("button", name="Hide the server key of panel").click()
        expect(server_key).not_to_have_text(keys["panel"]["server_key"])

        # The feed: calls from an uplink script with the client key (untrusted client_uplink).
        caller = Client(
            WebSocketTransport(lab.uplink_url, keys["panel"]["client_key"], reconnect=False),
            functions=FunctionRegistry(),
        ).start(WAIT)
        try:
            assert caller.call("greet", "ann") == "hi ann"
            answered = time.monotonic()
            rows = panel.locator('tr.anvil-nb-lab-call[data-function="greet"]')
            expect(rows).to_have_count(1)
            latency = time.monotonic() - answered  # the call's answer to its row in the feed
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            (ARTIFACTS / "lab-panel-latency.txt").write_text(f"{latency * 1000:.0f} ms\n")
            assert caller.call("greet", "bob") == "hi bob"
            with pytest.raises(TypeError):
                caller.call("greet")  # missing argument: fails in the kernel
        finally:
            caller.close()
        expect(rows.and_(page.locator('[data-outcome="ok"]'))).to_have_count(2)
        failed = rows.and_(page.locator('[data-outcome="error"]'))
        expect(failed).to_have_count(1)
        expect(failed).to_have_attribute("data-caller", "client_uplink")
        expect(failed).to_contain_text("TypeError")
        expect(rows.first).to_have_attribute("data-outcome", "error")  # newest first
        failed.click()
        details = panel.locator(".anvil-nb-lab-call-details")
        expect(details).to_contain_text('"call_stack"')
        expect(details).to_contain_text("client_uplink")
        expect(details).to_contain_text("TypeError")
        failed.click()
        expect(details).to_have_count(0)

        # The running task, with its live state.
        task = app.locator(".anvil-nb-lab-task", has_text="b_slow")
        expect(task).to_have_attribute("data-status", "running")
        expect(task.locator(".anvil-nb-lab-task-state")).to_contain_text('"progress": 0.4')

        # Try a call, as an untrusted browser: a result, kwargs, and a remote error.
        form = panel.locator(".anvil-nb-lab-try")
        form.get_by_label("App").select_option("panel")
        form.get_by_label("Function").select_option("greet")
        result = form.locator(".anvil-nb-lab-try-result")
        for args, expected in (('["cy"]', '"hi cy"'), ('{"name": "di"}', '"hi di"')):
            form.get_by_label("Arguments (JSON)").fill(args)
            form.get_by_role("button", name="Call").click()
            expect(result).to_have_attribute("data-state", "result")
            expect(result).to_have_text(expected)
        form.get_by_label("Arguments (JSON)").fill("[]")
        form.get_by_role("button", name="Call").click()
        expect(result).to_have_attribute("data-state", "error")
        expect(result).to_contain_text("TypeError")
        browser_rows = panel.locator('tr.anvil-nb-lab-call[data-caller="browser"]')
        expect(browser_rows).to_have_count(3)
        expect(browser_rows.first).to_contain_text("no")  # untrusted

        # The picture: two apps, a call feed and a running task.
        if os.environ.get("ANVIL_NB_SCREENSHOT") == "1":
            shot = README_IMAGE
        else:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "lab-panel.png"
        page.screenshot(path=str(shot))

        # Kill: the row says killed and its button goes.
        task.get_by_role("button", name="Kill").click()
        expect(task).to_have_attribute("data-status", "killed", timeout=WAIT * 1000)
        expect(task.get_by_role("button", name="Kill")).to_have_count(0)

        # The Lab's theme: the panel follows it (its CSS is the Lab's variables only).
        background = """() => getComputedStyle(document.querySelector('#anvil-nb-panel'))
            .backgroundColor.match(/\\d+/g).slice(0, 3).reduce((a, b) => a + Number(b), 0)"""
        light = page.evaluate(background)
        page.locator(".lm-MenuBar-itemLabel", has_text="Settings").first.click()
        page.locator(".lm-Menu-item", has_text="Theme").first.hover()
        page.locator(".lm-Menu-item", has_text="JupyterLab Dark").first.click()
        expect(page.locator("body")).to_have_attribute(
            "data-jp-theme-light", "false", timeout=WAIT * 1000
        )
        wait_until(lambda: page.evaluate(background) < light / 2, WAIT, "the panel to turn dark")

    assert lab.stop() == 0, f"jupyter lab did not stop cleanly on SIGTERM:\n{lab.log()}"
