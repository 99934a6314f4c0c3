"""The browser test: a real JupyterLab, a real notebook in Debian's Chromium, a real caller.

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

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from playwright.sync_api import BrowserContext, Page, expect, sync_playwright
from test_jupyter_e2e import free_port, wait_until

from anvil_nb.client.client import Client, FunctionRegistry
from anvil_nb.client.websocket import WebSocketTransport

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Screenshots and failure pages go outside the checkout (tests write nothing into it):
#: ``$ANVIL_NB_TEST_ARTIFACTS``, or ``anvil_nb-test-artifacts`` in the temp folder.
ARTIFACTS = Path(
    os.environ.get("ANVIL_NB_TEST_ARTIFACTS")
    or Path(tempfile.gettempdir()) / "anvil_nb-test-artifacts"
)
NOTEBOOK = "dashboard.ipynb"
CELLS = [
    "%load_ext anvil_nb",
    '%%callable\ndef greet(name):\n    return "hi " + name',
    "%anvil dashboard",
]
TABS = ["Calls", "Sessions", "Capabilities", "Registry"]
#: Seconds for the server to answer and for the kernel to start; for any one answer after that.
START_WAIT = 30.0
WAIT = 15.0

# Playwright's assertions wait up to WAIT (5 s by default).
expect.set_options(timeout=WAIT * 1000)


def require_chromium() -> None:
    """Fail as root (``scripts/test`` installs Chromium there); skip otherwise, saying why."""
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return
    message = (
        f"{CHROMIUM} is missing: Debian's chromium package, which ./scripts/test installs "
        "(apt-get install -y --no-install-recommends chromium) when it runs as root"
    )
    if os.geteuid() == 0:
        pytest.fail(message + "; this is root, so it must be there")
    pytest.skip(message + "; this is not root, so it could not")


class JupyterLab:
    """``jupyter lab`` as a subprocess, reached over HTTP with its token."""

    def __init__(self, tmp_path: Path):
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.base = f"http://127.0.0.1:{self.port}/"
        self.uplink_url = f"ws://127.0.0.1:{self.port}/anvil/_/uplink"
        self.root = tmp_path / "root"
        self.root.mkdir()
        home = tmp_path / "jupyter"
        config = home / "config"
        config.mkdir(parents=True)
        # No news or update checks: nothing fetched from outside, and no "Would you like to get
        # notified about official Jupyter news?" toast over the notebook (the lab setting
        # fetchNews decides whether that toast shows; the server's news_url whether it fetches).
        (config / "jupyter_lab_config.json").write_text(
            json.dumps(
                {
                    "LabApp": {
                        "news_url": None,
                        "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
                    }
                }
            )
        )
        settings = config / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True)
        (settings / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False})
        )
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ANVIL_NB_")}
        self.env.pop("PYTHONPATH", None)
        self.env.update(
            JUPYTER_CONFIG_DIR=str(config),  # no user config, settings or workspaces
            JUPYTER_DATA_DIR=str(home / "data"),  # no user-level kernelspecs
            JUPYTER_RUNTIME_DIR=str(home / "runtime"),
            JUPYTER_PATH=str(Path(sys.prefix) / "share" / "jupyter"),  # this venv's python3 spec
            JUPYTER_PLATFORM_DIRS="1",
            IPYTHONDIR=str(home / "ipython"),  # no profile or startup files in the kernel
            PYTHONUNBUFFERED="1",
        )
        self.log_path = tmp_path / "jupyter-lab.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyterlab",
                "--no-browser",
                "--allow-root",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={self.port}",
                "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={self.root}",
                "--ServerApp.base_url=/",
                f"--AnvilNB.data_dir={tmp_path / 'anvil_data'}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        try:
            wait_until(self._ready, START_WAIT, "jupyter lab to answer api/status")
        except BaseException:
            self.stop()
            raise

    def log(self, limit: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-limit:]

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"jupyter lab exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return self.request("GET", "api/status")[0] == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    def request(self, method: str, path: str) -> tuple[int, Any]:
        """An authenticated REST call; returns the status and the decoded JSON body."""
        req = urllib.request.Request(
            self.base + path, method=method, headers={"Authorization": f"token {self.token}"}
        )
        try:
            with urllib.request.urlopen(req, timeout=WAIT) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")

    def anvil_state(self, app: str = "dashboard") -> dict[str, Any]:
        """The host's state of an app (the notebook's, by default: its kernel joins it)."""
        status, state = self.request("GET", f"anvil/_/admin/state?app={app}")
        if status == 404:  # the kernel has not joined yet: the app is not there yet
            return {"app": app, "registrations": {}, "peers": []}
        assert status == 200, (status, state)
        return state

    def kernel_state(self, path: str) -> str | None:
        """The execution state of the kernel of the session of the notebook at *path*."""
        status, sessions = self.request("GET", "api/sessions")
        assert status == 200, (status, sessions)
        for session in sessions:
            if session.get("path") == path and session.get("kernel"):
                return session["kernel"].get("execution_state")
        return None

    def kernelspecs(self) -> dict[str, Any]:
        """``jupyter kernelspec list --json`` in the server's environment."""
        result = subprocess.run(
            [sys.executable, "-m", "jupyter", "kernelspec", "list", "--json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=True,
        )
        return json.loads(result.stdout)["kernelspecs"]

    def stop(self) -> int | None:
        """SIGTERM, a bounded wait, then SIGKILL; returns the exit status (None if killed)."""
        code: int | None = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        else:
            code = self.proc.returncode
        self._log.close()
        return code


def write_notebook(path: Path, cells: list[str]) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    nbformat.write(nb, str(path))


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[JupyterLab]:
    require_chromium()
    server = JupyterLab(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[BrowserContext]:
    """Debian's Chromium, headless, with a fresh user-data-dir."""
    require_chromium()
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1000},
        )
        context.set_default_timeout(WAIT * 1000)
        try:
            yield context
        finally:
            context.close()


@contextlib.contextmanager
def artifacts_on_failure(page: Page, lab: JupyterLab) -> Iterator[None]:
    """On any failure, keep a screenshot, the page's HTML and the server's log."""
    try:
        yield
    except BaseException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(Exception):
            page.screenshot(path=str(ARTIFACTS / "browser-failure.png"), timeout=5000)
        with contextlib.suppress(Exception):
            (ARTIFACTS / "browser-failure.html").write_text(page.content())
        (ARTIFACTS / "browser-failure-jupyter.log").write_text(lab.log(200_000))
        print(f"browser test artifacts in {ARTIFACTS}; jupyter lab log tail:\n{lab.log(3000)}")
        raise


def open_and_run_notebook(page: Page, lab: JupyterLab, cells: list[str]) -> None:
    """Open the notebook in JupyterLab, wait for its kernel, and Run → Run All Cells."""
    write_notebook(lab.root / NOTEBOOK, cells)
    page.goto(f"{lab.base}lab/tree/{NOTEBOOK}?token={lab.token}")
    notebook = page.locator(".jp-NotebookPanel .jp-Notebook")
    expect(notebook.locator(".jp-Cell")).to_have_count(len(cells), timeout=START_WAIT * 1000)

    # The kernel has started and the page is connected to it.
    wait_until(lambda: lab.kernel_state(NOTEBOOK) == "idle", START_WAIT, "the kernel to be idle")
    expect(page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")).to_be_visible()

    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-item", has_text="Run All Cells").first.click()


def test_the_dashboard_shows_calls_from_an_external_client(
    lab: JupyterLab, browser: BrowserContext
):
    # The kernel the notebook gets runs this venv's Python: the venv's own python3 spec.
    spec = lab.kernelspecs()["python3"]
    assert Path(spec["resource_dir"]).is_relative_to(sys.prefix), spec
    assert spec["spec"]["argv"][0] in ("python", sys.executable), spec

    page = browser.pages[0] if browser.pages else browser.new_page()
    with artifacts_on_failure(page, lab):
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
