"""A Jupyter server application (``jupyter server``, ``jupyter lab``) as a subprocess, over HTTP.

:class:`JupyterProcess` starts one with this venv's Python on a free port of 127.0.0.1 with a
fresh token, its notebook root and ``--AnvilNB.data_dir`` in the test's temp dir and its output
in a log file there; it waits (bounded) until ``api/status`` answers, makes authenticated REST
calls, and stops it with SIGTERM (SIGKILL after a bounded wait). Nothing anvil_nb-specific is
on its command line but the data dir: the extension is enabled by the jupyter-config file that
installing anvil_nb put into the venv. :func:`jupyter_env` is the environment it runs in.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from support.processes import free_port, stop_process
from support.waiting import wait_until

__all__ = ["START_WAIT", "WAIT", "JupyterProcess", "jupyter_env"]

#: Seconds for the server to answer and for a kernel to start; for any one answer after that.
START_WAIT = 30.0
WAIT = 15.0


def jupyter_env(**dirs: str) -> dict[str, str]:
    """This process's environment without ``ANVIL_NB_*``, with *dirs* (``JUPYTER_CONFIG_DIR``
    and the like: no user config leaks in) and ``JUPYTER_PLATFORM_DIRS=1``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANVIL_NB_")}
    env.update(dirs, JUPYTER_PLATFORM_DIRS="1")
    return env


class JupyterProcess:
    """``python -m <app>`` (*app*: ``"jupyter server"``, ``"jupyterlab"``) as a subprocess.

    *what* names it in failure messages and its log file; *base_url* is the server's.
    """

    #: How many characters of the log :meth:`log` gives by default (for failure messages).
    log_limit = 6000

    def __init__(
        self, what: str, app: str, tmp_path: Path, env: dict[str, str], base_url: str = "/"
    ):
        self.what = what
        self.env = env
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.base = f"http://127.0.0.1:{self.port}{base_url}"
        self.data_dir = tmp_path / "anvil_data"
        self.root = tmp_path / "root"
        self.root.mkdir()
        self.log_path = tmp_path / f"{what.replace(' ', '-')}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                *app.split(),
                "--no-browser",
                "--allow-root",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={self.port}",
                "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={self.token}",
                f"--ServerApp.base_url={base_url}",
                f"--ServerApp.root_dir={self.root}",
                f"--AnvilNB.data_dir={self.data_dir}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            wait_until(self._ready, START_WAIT, f"{what} to answer api/status", interval=0.05)
        except BaseException:
            self.stop()
            raise

    def log(self, limit: int | None = None) -> str:
        """The end of the server's log (*limit* characters; :attr:`log_limit` by default)."""
        return self.log_path.read_text(errors="replace")[-(limit or self.log_limit) :]

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.what} exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return self.request("GET", "api/status")[0] == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """An authenticated REST call; the status and the decoded JSON body (or None).

        An HTTP error gives its status and its body as text.
        """
        headers = {"Authorization": f"token {self.token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=WAIT) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")

    def stop(self) -> int | None:
        """SIGTERM, a bounded wait, then SIGKILL; returns the exit status (None if killed)."""
        code = stop_process(self.proc, signal.SIGTERM, wait=WAIT)
        self._log.close()
        return code
