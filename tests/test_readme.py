"""README.md's code blocks, run as written.

The blocks are taken from README.md itself (parsed as Markdown with mistune, which Jupyter
installs), never copied here. Each fenced block is preceded by an HTML comment that names it,
invisible when rendered::

    <!-- readme-test: provider -->
    ```python
    ...

``skip`` marks a block that is not run (with the reason in the comment); every other name is
run by a test below, and a block without a marker fails :func:`test_every_block_is_marked`.

What the tests change in a block before running it, and nothing else:

* ``serve`` (bash): the one command line is run with ``.venv/bin/`` replaced by this venv's
  ``bin`` folder, ``--port 3030`` by ``--port 0`` and ``--data-dir <a temporary folder>``
  appended. Its comment lines are the output it must print (stdout or stderr), where
  ``server_...`` and ``client_...`` stand for the generated keys and ``3030`` for the port.
* ``provider``, ``real-client`` and ``http-client`` (Python): ``server_...``, ``client_...`` and ``3030`` become
  the keys and port that ``serve`` printed. The provider runs with this venv's Python, the real
  client with this venv's Python and the real ``anvil-uplink`` on ``PYTHONPATH`` (the fixture
  ``anvil_uplink_dir``; the venv itself never has ``anvil``).
* ``in-process`` runs as a script; ``notebook`` blocks run as cells of an IPython shell, in a
  subprocess each time.

Expected output is what the blocks' comments say: the comment on a ``print(...)`` line is the
line it prints, and the comment on a notebook cell's final expression is the value's repr (what
Jupyter shows). Every process is started with a temporary working directory, waited for with a
deadline and stopped at the end.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tokenize
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mistune
import pytest
from support.processes import Lines, stop_process
from support.waiting import wait_until

from anvil_nb import server
from anvil_nb.core.errors import NoServerFunctionError

README = Path(__file__).resolve().parents[1] / "README.md"
WAIT = 30.0
MARKER = re.compile(r"<!--\s*readme-test:\s*([\w-]+)(.*?)-->", re.S)
#: The names a block may carry (``skip`` is not run; each other name is run below).
NAMES = {"skip", "notebook", "in-process", "serve", "provider", "real-client", "http-client"}
README_PORT = "3030"
SERVER_KEY, CLIENT_KEY = "server_...", "client_..."


@dataclass
class Block:
    name: str | None  # from the marker comment right before the fence; None without one
    lang: str
    code: str


def readme_blocks() -> list[Block]:
    """Every fenced code block of README.md, with the name of its marker."""
    tokens = mistune.create_markdown(renderer=None)(README.read_text())
    blocks: list[Block] = []
    previous: dict[str, Any] | None = None
    for token in tokens:
        if token["type"] == "blank_line":
            continue
        if token["type"] == "block_code":
            marker = MARKER.search(previous["raw"]) if previous and previous["type"] == "block_html" else None  # fmt: skip
            info = (token.get("attrs") or {}).get("info") or ""
            blocks.append(Block(marker.group(1) if marker else None, info, token["raw"]))
        previous = token
    return blocks


def blocks_named(name: str) -> list[Block]:
    found = [b for b in readme_blocks() if b.name == name]
    assert found, f"README.md has no block marked <!-- readme-test: {name} -->"
    return found


def the_block(name: str) -> Block:
    (block,) = blocks_named(name)
    return block


def printed(code: str) -> list[str]:
    """The output *code* promises: the comment of each ``print(...)`` line, in order."""
    expected = []
    for line in code.splitlines():
        tokens = list(tokenize.generate_tokens(io.StringIO(line).readline))
        if tokens and tokens[0].string == "print" and tokens[1].string == "(":
            comments = [t.string for t in tokens if t.type == tokenize.COMMENT]
            if comments:
                expected.append(comments[-1].lstrip("#").strip())
    return expected


def shown_value(cell: str) -> str | None:
    """The value a notebook cell's final expression promises in its comment, or None."""
    body = ast.parse(cell).body if not cell.startswith("%") else []
    if not body or not isinstance(body[-1], ast.Expr):
        return None
    last_line = cell.splitlines()[body[-1].end_lineno - 1]
    tokens = list(tokenize.generate_tokens(io.StringIO(last_line).readline))
    comments = [t.string for t in tokens if t.type == tokenize.COMMENT]
    return comments[-1].lstrip("#").strip() if comments else None


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ANVIL_NB_URL")}
    env.pop("ANVIL_NB_SERVER_KEY", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------
# The markers


def test_every_block_is_marked() -> None:
    blocks = readme_blocks()

    assert blocks, "no code blocks found in README.md"
    unmarked = [b.code.splitlines()[0] for b in blocks if b.name is None]
    assert not unmarked, f"code blocks without a <!-- readme-test: NAME --> marker: {unmarked}"
    unknown = {b.name for b in blocks} - NAMES
    assert not unknown, f"unknown readme-test names {unknown}; known: {sorted(NAMES)}"
    assert {b.name for b in blocks} == NAMES, "a test below runs a block that is gone"


def test_the_expected_output_is_read_from_the_blocks() -> None:
    # The tests below are only as good as this: every run block promises some output.
    assert printed(the_block("in-process").code) == ["11 2"]
    assert printed(the_block("real-client").code) == ["Hello, Ann! You are a client_uplink caller."]
    assert printed(the_block("http-client").code) == ['{"greeting":"Hello, Ann!"}']
    assert [shown_value(b.code) for b in blocks_named("notebook")][-1] == "'Hello, Ann!'"


# ---------------------------------------------------------------------------------------------
# The in-process and notebook examples


def test_in_process_example_prints_what_it_says(tmp_path: Path) -> None:
    block = the_block("in-process")
    script = tmp_path / "example.py"
    script.write_text(block.code)

    run = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=clean_env(),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == printed(block.code)


CELL_RUNNER = """\
import json, sys
from IPython.core.interactiveshell import InteractiveShell

cells = json.load(open(sys.argv[1]))
shell = InteractiveShell.instance()
outcomes = []
for cell in cells:
    result = shell.run_cell(cell)
    error = result.error_before_exec or result.error_in_exec
    outcomes.append({"ok": result.success, "error": repr(error) if error else None,
                     "value": None if result.result is None else repr(result.result)})
    if not result.success:
        break
json.dump(outcomes, open(sys.argv[2], "w"))
"""


def test_notebook_cells_run_and_show_what_they_say(tmp_path: Path) -> None:
    cells = [b.code for b in blocks_named("notebook")]
    (tmp_path / "cells.json").write_text(json.dumps(cells))
    (tmp_path / "run_cells.py").write_text(CELL_RUNNER)

    run = subprocess.run(
        [sys.executable, "run_cells.py", "cells.json", "outcomes.json"],
        cwd=tmp_path, env=clean_env(IPYTHONDIR=str(tmp_path / "ipython")),
        capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip

    assert run.returncode == 0, run.stderr
    outcomes = json.loads((tmp_path / "outcomes.json").read_text())
    assert len(outcomes) == len(cells), (outcomes, run.stdout, run.stderr)
    for cell, outcome in zip(cells, outcomes):
        assert outcome["ok"], f"cell failed: {cell!r}: {outcome['error']}\n{run.stderr}"
        expected = shown_value(cell)
        if expected is not None:
            assert outcome["value"] == expected, cell


# ---------------------------------------------------------------------------------------------
# Over the network: serve, provider, real client


class Process:
    """A subprocess with its stdout and stderr read line by line (bounded reads)."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]):
        self.args = args
        self.proc = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.stdout = Lines(self.proc.stdout)
        self.stderr = Lines(self.proc.stderr)

    def line(self, timeout: float = WAIT) -> str:
        line = self.stdout.next(time.monotonic() + timeout)
        assert line is not None, f"{self.args[:2]} ended: {self.rest(self.stderr)}"
        return line

    @staticmethod
    def rest(lines: Lines, timeout: float = 5.0) -> list[str]:
        """What is left on *lines* until EOF (the process has ended or is ending)."""
        out, deadline = [], time.monotonic() + timeout
        while (line := lines.next(deadline)) is not None:
            out.append(line)
        return out

    def stop(self, sig: int = signal.SIGINT) -> tuple[int | None, list[str], list[str]]:
        """Stop it (Ctrl-C by default); its exit status and the rest of stdout and stderr."""
        code = stop_process(self.proc, sig, wait=10)
        out, err = self.rest(self.stdout), self.rest(self.stderr)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code, out, err


def serve_command(data_dir: Path) -> tuple[list[str], list[str]]:
    """The ``serve`` block's command (adapted as the module docstring says) and its output."""
    block = the_block("serve")
    lines = [line.strip() for line in block.code.splitlines() if line.strip()]
    commands = [line for line in lines if not line.startswith("#")]
    assert len(commands) == 1, commands
    args = shlex.split(commands[0])
    assert args[0].startswith(".venv/bin/"), args
    args[0] = str(Path(sys.executable).parent / args[0].removeprefix(".venv/bin/"))
    assert args[args.index("--port") + 1] == README_PORT, args
    args[args.index("--port") + 1] = "0"
    args += ["--data-dir", str(data_dir)]
    return args, [line.lstrip("#").strip() for line in lines if line.startswith("#")]


def output_pattern(line: str, port: int) -> re.Pattern[str]:
    """A README output line as a pattern: the keys are captured, the port is the real one."""
    rx = re.escape(line.replace(README_PORT, str(port)))
    rx = rx.replace(re.escape(SERVER_KEY), r"(?P<server>server_\S+)")
    rx = rx.replace(re.escape(CLIENT_KEY), r"(?P<client>client_\S+)")
    return re.compile(rx + r"\Z")


def fill_in(code: str, keys: dict[str, str], port: int) -> str:
    """A README block with the real keys and port in place of the placeholders."""
    assert README_PORT in code
    return (
        code.replace(SERVER_KEY, keys["server"])
        .replace(CLIENT_KEY, keys["client"])
        .replace(README_PORT, str(port))
    )


@pytest.fixture
def stoppers() -> Iterator[list[Any]]:
    """Processes to stop at the end of the test, whatever happens."""
    started: list[Process] = []
    yield started
    for p in reversed(started):
        if p.proc.poll() is None:
            p.stop(signal.SIGKILL)


def start_serve(data_dir: Path, cwd: Path, stoppers: list[Any]) -> tuple[Process, int, str]:
    """The ``serve`` block running: the process, its port and its first line (stdout)."""
    args, _ = serve_command(data_dir)
    serve = Process(args, cwd, clean_env())
    stoppers.append(serve)
    ready = serve.line()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", ready)
    assert match, ready
    return serve, int(match.group(1)), ready


def wait_until_served(name: str, client_key: str, port: int, provider: Process) -> None:
    """Wait until the host has *name* (the provider registers it just after connecting)."""
    server.connect(client_key, url=f"ws://127.0.0.1:{port}/_/uplink", quiet=True)
    try:

        def answered() -> bool:
            try:
                server.call(name, "anvil_nb")
            except NoServerFunctionError:
                assert provider.proc.poll() is None, Process.rest(provider.stderr)
                return False
            return True

        wait_until(answered, WAIT, f"{name} to be registered")
    finally:
        server.disconnect()


def test_network_example_runs_as_written(tmp_path: Path, anvil_uplink_dir: Path, stoppers):
    data_dir = tmp_path / "data"
    _, expected_output = serve_command(data_dir)

    # First start: it prints the keys it made (stderr) and the ready line (stdout).
    serve, port, ready = start_serve(data_dir, tmp_path, stoppers)
    code, out, err = serve.stop(signal.SIGINT)  # "Ctrl-C stops it"
    assert code == 0, err
    keys: dict[str, str] = {}
    stdout = [ready, *out]
    for line in expected_output:
        pattern = output_pattern(line, port)
        where = [m for m in map(pattern.match, stdout + err) if m]
        assert where, f"serve never printed {line!r}: stdout {stdout}, stderr {err}"
        keys.update({k: v for k, v in where[0].groupdict().items() if v})
        if where[0].groupdict():
            assert any(map(pattern.match, err)), f"the keys go to stderr: {line!r}"
    assert set(keys) == {"server", "client"}, keys
    assert json.loads((data_dir / "keys.json").read_text()) == {
        "server_key": keys["server"],
        "client_key": keys["client"],
    }

    # Later starts keep the keys (from keys.json) and print only the ready line.
    serve, port, _ = start_serve(data_dir, tmp_path, stoppers)

    provider_code = fill_in(the_block("provider").code, keys, port)
    (tmp_path / "provider.py").write_text(provider_code)
    provider = Process([sys.executable, "provider.py"], tmp_path, clean_env())
    stoppers.append(provider)
    wait_until_served("greet", keys["client"], port, provider)

    client_code = the_block("real-client").code
    (tmp_path / "real_client.py").write_text(fill_in(client_code, keys, port))
    real = subprocess.run(
        [sys.executable, "real_client.py"], cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(anvil_uplink_dir)),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert real.returncode == 0, real.stderr
    assert real.stdout.splitlines() == printed(client_code), real.stderr

    def endpoint_served() -> bool:  # registered just after greet, on the same connection
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_/api/greet/x", timeout=WAIT)
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
            return False
        return True

    wait_until(endpoint_served, WAIT, "the endpoint to be registered")
    http_code = the_block("http-client").code
    (tmp_path / "http_client.py").write_text(fill_in(http_code, keys, port))
    http = subprocess.run(
        [sys.executable, "http_client.py"], cwd=tmp_path, env=clean_env(),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert http.returncode == 0, http.stderr
    assert http.stdout.splitlines() == printed(http_code), http.stderr

    # The provider is still serving (wait_forever) until Ctrl-C, which ends it.
    assert provider.proc.poll() is None, Process.rest(provider.stderr)
    p_code, p_out, p_err = provider.stop(signal.SIGINT)
    assert p_code is not None, "the provider did not end on Ctrl-C"
    assert "KeyboardInterrupt" in "\n".join(p_err), p_err

    code, _, err = serve.stop(signal.SIGINT)
    assert code == 0, err
    assert not [line for line in err if " key: " in line], f"keys printed again: {err}"


def test_network_blocks_use_the_placeholders_the_test_fills_in() -> None:
    # If the README changed its placeholders, fill_in would silently run the wrong keys.
    assert SERVER_KEY in the_block("provider").code
    assert CLIENT_KEY in the_block("real-client").code
    assert "server.wait_forever()" in the_block("provider").code
