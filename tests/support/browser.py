"""A real JupyterLab and Debian's Chromium, driven by Playwright, for the browser tests.

JupyterLab
    :class:`JupyterLab` is ``jupyter lab`` as a subprocess of this venv's Python (see
    ``support/jupyter.py``), with its own config, data, runtime and IPython dirs in the test's
    temporary folder (nothing of the user's leaks in), no news or update checks, and
    ``--AnvilNB.data_dir`` there too. ``JUPYTER_DATA_DIR`` is an empty folder and
    ``JUPYTER_PATH`` this venv's ``share/jupyter``, so a notebook's ``python3`` kernel is the
    venv's own ipykernel spec, never a user-level one pointing at another interpreter. The
    ``lab`` fixture starts one and stops it.

Chromium
    :func:`chromium` launches ``/usr/bin/chromium`` (Debian's package, installed by
    ``scripts/test`` when missing; Playwright's own browser downloads are never used),
    headless, with the flags this machine needs and a fresh ``--user-data-dir`` (a persistent
    context in a temporary folder). Without Chromium, :func:`require_chromium` fails as root
    (``scripts/test`` installs it there) and skips otherwise, saying why. The ``browser``
    fixture gives one.

:func:`open_and_run_notebook` writes a notebook into the server's root, opens it, waits for its
kernel, and runs all its cells from the menu. Every wait is bounded: REST polls with a deadline
and Playwright's waits with timeouts.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from playwright.sync_api import BrowserContext, Page, expect, sync_playwright

from support.jupyter import START_WAIT, WAIT, JupyterProcess, jupyter_env
from support.waiting import wait_until

__all__ = [
    "ARTIFACTS",
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "NOTEBOOK",
    "START_WAIT",
    "WAIT",
    "JupyterLab",
    "artifacts_on_failure",
    "chromium",
    "open_and_run_notebook",
    "slow_task_cells",
    "require_chromium",
    "write_notebook",
]

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
#: Where browser tests put screenshots and, on a failure, the page and the server's log.
ARTIFACTS = Path(
    os.environ.get("ANVIL_NB_TEST_ARTIFACTS")
    or Path(tempfile.gettempdir()) / "anvil_nb-test-artifacts"
)


def slow_task_cells(progress: float) -> list[str]:
    """Cells that define ``b_slow`` (a background task that reports *progress* and waits in
    short steps, so a kill ends it at once) and launch it as ``b_task``.
    """
    return [
        "%%callable\n"
        "import threading\n"
        "from anvil_nb import server\n"
        "release = threading.Event()\n"
        "\n"
        "@server.background_task\n"
        "def b_slow():\n"
        f"    server.task_state['progress'] = {progress!r}\n"
        "    while not release.is_set():\n"
        "        release.wait(0.05)\n"
        "    return 'done'",
        "b_task = server.launch_background_task('b_slow')",
    ]


#: The notebook :func:`open_and_run_notebook` writes and opens.
NOTEBOOK = "dashboard.ipynb"

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


@contextlib.contextmanager
def chromium(profile: Path, width: int = 1280, timeout: float = WAIT) -> Iterator[BrowserContext]:
    """Debian's Chromium, headless, with a fresh user-data-dir *profile*, closed at the end.

    The window is *width* x 1000 px; Playwright's actions wait up to *timeout* seconds.
    """
    require_chromium()
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": width, "height": 1000},
        )
        context.set_default_timeout(timeout * 1000)
        try:
            yield context
        finally:
            context.close()


class JupyterLab(JupyterProcess):
    """``jupyter lab`` as a subprocess, reached over HTTP with its token."""

    def __init__(self, tmp_path: Path):
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
        env = jupyter_env(
            JUPYTER_CONFIG_DIR=str(config),  # no user config, settings or workspaces
            JUPYTER_DATA_DIR=str(home / "data"),  # no user-level kernelspecs
            JUPYTER_RUNTIME_DIR=str(home / "runtime"),
            JUPYTER_PATH=str(Path(sys.prefix) / "share" / "jupyter"),  # this venv's python3 spec
            IPYTHONDIR=str(home / "ipython"),  # no profile or startup files in the kernel
            PYTHONUNBUFFERED="1",
        )
        env.pop("PYTHONPATH", None)
        super().__init__("jupyter lab", "jupyterlab", tmp_path, env)
        self.uplink_url = f"ws://127.0.0.1:{self.port}/anvil/_/uplink"

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


def write_notebook(path: Path, cells: list[str]) -> None:
    """A notebook of code *cells* for the ``python3`` kernel."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    nbformat.write(nb, str(path))


def open_and_run_notebook(page: Page, lab: JupyterLab, cells: list[str]) -> None:
    """Open the notebook in JupyterLab, wait for its kernel, and Run → Run All Cells."""
    write_notebook(lab.root / NOTEBOOK, cells)
    page.goto(f"{lab.base}lab/tree/{NOTEBOOK}?token={lab.token}")
    notebook = page.locator(".jp-NotebookPanel .jp-Notebook")
    expect(notebook.locator(".jp-Cell")).to_have_count(len(cells), timeout=START_WAIT * 1000)

    # The kernel has started and the page is connected to it.
    wait_until(
        lambda: lab.kernel_state(NOTEBOOK) == "idle",
        START_WAIT,
        "the kernel to be idle",
        interval=0.05,
    )
    expect(page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")).to_be_visible()

    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-item", has_text="Run All Cells").first.click()


@contextlib.contextmanager
def artifacts_on_failure(page: Page, lab: JupyterLab, name: str) -> Iterator[None]:
    """On any failure, keep ``NAME-failure.png``, the page's HTML and the server's log in
    :data:`ARTIFACTS`, and print where they are with the log's tail.
    """
    try:
        yield
    except BaseException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(Exception):
            page.screenshot(path=str(ARTIFACTS / f"{name}-failure.png"), timeout=5000)
        with contextlib.suppress(Exception):
            (ARTIFACTS / f"{name}-failure.html").write_text(page.content())
        (ARTIFACTS / f"{name}-failure-jupyter.log").write_text(lab.log(200_000))
        print(f"{name} test artifacts in {ARTIFACTS}; jupyter lab log tail:\n{lab.log(3000)}")
        raise
