"""The browser test: a real JupyterLab, a real notebook in Debian's Chromium, a real caller.

The set-up (``JupyterLab``, ``chromium``, ``open_and_run_notebook``) is ``support/browser.py``,
shared with ``tests/test_widgets_any_process.py``; the ``lab`` and ``browser`` fixtures are in
``conftest.py``.

What runs
    ``jupyter lab`` as a subprocess of this venv's Python, with a token, on a free port, with its
    own config, data, runtime and IPython dirs in a temporary folder (nothing of the user's leaks
    in) and ``--AnvilNB.data_dir`` there too. The anvil_nb server extension is enabled by the
    jupyter-config file that installing anvil_nb put into the venv, so the server hosts
    ``anvil/_/uplink`` and its kernels join that host.

Which Python the kernel runs
    The notebook asks for the ``python3`` kernel. ``JUPYTER_DATA_DIR`` is an empty folder and
    ``JUPYTER_PATH`` is this venv's ``share/jupyter``, so the spec found is the venv's own
    ipykernel spec (``argv[0] == "python"``, which jupyter_client replaces with the server's
    ``sys.executable``, this venv's Python), never a user-level ``python3`` spec pointing at another
    interpreter. The test checks that with ``jupyter kernelspec list --json`` in the same
    environment.

The browser
    Playwright's Python package drives ``/usr/bin/chromium`` (Debian's package, installed by
    ``scripts/test`` when missing; Playwright's own browser downloads are never used), headless,
    with the flags this machine needs and a fresh ``--user-data-dir`` (a persistent context in a
    temporary folder). Without Chromium the test fails as root (``scripts/test`` installs it there)
    and skips otherwise, saying why.

The steps
    A notebook is written into the server's root (``%load_ext anvil_nb``; a ``%%callable`` cell
    defining ``greet``; ``%anvil dashboard``), opened at ``/lab/tree/...``, and run with the menu
    Run → Run All Cells once its kernel is idle. The test waits until the server's host lists
    ``greet`` and the dashboard's tabs are on the page, calls ``greet`` from anvil_nb's own client
    with the client key (an untrusted ``client_uplink`` caller) three times and once with a
    missing argument, and asserts on the DOM that the call log shows those rows: function,
    caller type and outcome.

Artifacts
    ``ARTIFACTS/dashboard.png`` (a screenshot of the notebook with the dashboard) at the end;
    on a failure, ``ARTIFACTS/browser-failure.png``, ``browser-failure.html`` (the page) and
    ``browser-failure-jupyter.log`` (the server's log).

Every wait is bounded: REST polls against a deadline and Playwright's own waits with timeouts,
never a fixed sleep.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, expect
from support.browser import (
    ARTIFACTS,
    WAIT,
    JupyterLab,
    artifacts_on_failure,
    open_and_run_notebook,
    slow_task_cells,
)
from support.waiting import wait_until

from anvil_nb.client.client import Client, FunctionRegistry
from anvil_nb.client.websocket import WebSocketTransport

CELLS = [
    "%load_ext anvil_nb",
    '%%callable\ndef greet(name):\n    return "hi " + name',
    "%anvil dashboard",
]
TABS = ["Calls", "Sessions", "Capabilities", "Registry"]


def test_the_dashboard_shows_calls_from_an_external_client(
    lab: JupyterLab, browser: BrowserContext
):
    # The kernel the notebook gets runs this venv's Python: the venv's own python3 spec.
    spec = lab.kernelspecs()["python3"]
    assert Path(spec["resource_dir"]).is_relative_to(sys.prefix), spec
    assert spec["spec"]["argv"][0] in ("python", sys.executable), spec

    page = browser.pages[0] if browser.pages else browser.new_page()
    with artifacts_on_failure(page, lab, "browser"):
        open_and_run_notebook(page, lab, CELLS)

        # %load_ext joined the server's host and %%callable registered greet there.
        wait_until(
            lambda: "greet" in lab.anvil_state()["registrations"],
            WAIT,
            "greet to be registered with the Jupyter server's host",
        )
        cells = page.locator(".jp-Notebook .jp-Cell")
        for i in range(2):
            expect(cells.nth(i).locator(".jp-InputPrompt")).to_have_text(f"[{i + 1}]:")
            expect(cells.nth(i).locator(".jp-OutputArea-output")).to_have_count(0)

        # The dashboard: its tabs, with the Calls tab shown.
        dashboard = page.locator(".widget-tab").first
        for title in TABS:
            expect(dashboard.locator(".lm-TabBar-tab", has_text=title)).to_have_count(1)
        dashboard.locator(".lm-TabBar-tab", has_text="Calls").click()

        # Calls from outside, as an untrusted client_uplink caller.
        client_key = lab.anvil_state()["client_key"]
        caller = Client(
            WebSocketTransport(lab.uplink_url, client_key, reconnect=False),
            functions=FunctionRegistry(),
        ).start(WAIT)
        try:
            for _ in range(3):
                assert caller.call("greet", "ann") == "hi ann"
            with pytest.raises(TypeError):
                caller.call("greet")  # missing argument: fails in the kernel
        finally:
            caller.close()

        # The call log, live: one row per call, newest first.
        table = dashboard.locator("table.anvil-nb-calllog")
        rows = table.locator('tr.anvil-nb-call[data-function="greet"]')
        expect(
            table.locator('tr.anvil-nb-call[data-function="greet"][data-outcome="ok"]')
        ).to_have_count(3)
        expect(
            table.locator('tr.anvil-nb-call[data-function="greet"][data-outcome="error"]')
        ).to_have_count(1)
        expect(table.locator("tr.anvil-nb-call").first).to_have_attribute("data-outcome", "error")
        for i in range(4):
            row = rows.nth(i)
            expect(row).to_have_attribute("data-caller", "client_uplink")
            expect(row).to_contain_text("greet")
            expect(row).to_contain_text("client_uplink")

        table.scroll_into_view_if_needed()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"))

    assert lab.stop() == 0, f"jupyter lab did not stop cleanly on SIGTERM:\n{lab.log()}"


TASK_CELLS = ["%load_ext anvil_nb", *slow_task_cells(40), "%anvil dashboard"]


def test_the_tasks_tab_shows_a_progress_bar_and_kills_a_task(
    lab: JupyterLab, browser: BrowserContext
):
    page = browser.pages[0] if browser.pages else browser.new_page()
    with artifacts_on_failure(page, lab, "browser"):
        open_and_run_notebook(page, lab, TASK_CELLS)
        dashboard = page.locator(".widget-tab").first
        tab = dashboard.locator(".lm-TabBar-tab", has_text="Tasks")
        expect(tab).to_have_count(1, timeout=WAIT * 1000)
        tab.click()

        # The running task's row: its name, status, and a progress bar at 40 % (a percentage).
        row = dashboard.locator(".anvil-nb-task", has_text="b_slow")
        expect(row).to_have_count(1, timeout=WAIT * 1000)
        expect(row.locator(".anvil-nb-task-status")).to_have_text("running")
        bar = row.locator(".widget-hprogress .progress-bar")
        expect(bar).to_be_visible()
        expect(bar).to_have_attribute("style", re.compile(r"width:\s*40%"))

        # Kill from the page: the row says so, and the button goes.
        kill = row.locator("button", has_text="Kill")
        expect(kill).to_be_visible()
        kill.click()
        expect(row.locator(".anvil-nb-task-status")).to_have_text("killed", timeout=WAIT * 1000)
        expect(kill).to_be_hidden()

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "tasks.png"))

    assert lab.stop() == 0, f"jupyter lab did not stop cleanly on SIGTERM:\n{lab.log()}"
