"""The browser client's TypeScript unit tests (``labextension/test``), run by Node.

They check the client's serialisation against every wire vector recorded from the real
anvil-uplink client (``../shared/vectors/uplink-0.7.0.json``), capabilities' narrow and wire
form, datetimes with offsets, date-only values, media chunking, and the protocol against a
scripted WebSocket (remote errors, capability updates, keep-alives, reconnection).

esbuild (``labextension/node_modules``, installed by the build that ``pip install -e .`` runs)
compiles them into a temporary folder, and ``node --test`` runs them, once per time zone: one
with a negative, non-whole-hour offset and one with a positive one, so the local-offset
stamping is tested away from UTC. A failure shows Node's report.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LABEXTENSION = ROOT / "labextension"
_CANDIDATES = (
    ROOT.parent / "shared" / "vectors" / "uplink-0.7.0.json",
    ROOT / ".." / "shared" / "vectors" / "uplink-0.7.0.json",
)
VECTORS_FILE = next((p for p in _CANDIDATES if p.is_file()), None)
NODE = shutil.which("node")
TIMEOUT = 120


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The test files, compiled to ES modules outside the checkout."""
    if NODE is None:
        pytest.fail("node is not on PATH: the browser client's tests need Node 20 or later")
    if not (LABEXTENSION / "node_modules" / "esbuild").is_dir():
        pytest.fail(
            "labextension/node_modules is missing: run `pip install -e .` (its build runs npm) "
            "or `npm ci` in labextension/"
        )
    out = tmp_path_factory.mktemp("js-tests")
    built = _run([NODE, "labextension/scripts/build.mjs", "--tests", str(out)], dict(os.environ))
    assert built.returncode == 0, f"compiling the tests failed:\n{built.stdout}\n{built.stderr}"
    files = sorted(str(p) for p in out.glob("*.test.mjs"))
    assert len(files) >= 2, files
    return files


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("tz", ["America/St_Johns", "Asia/Kolkata"])
def test_the_typescript_unit_tests_pass(compiled: list[str], tz: str):
    if VECTORS_FILE is None:
        pytest.skip("wire vectors not found; looked for " + " and ".join(map(str, _CANDIDATES)))
    env = {**os.environ, "TZ": tz, "ANVIL_NB_VECTORS": str(VECTORS_FILE)}
    result = _run([NODE, "--test", "--test-reporter=spec", *compiled], env)  # type: ignore[list-item]
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"the TypeScript unit tests failed (TZ={tz}):\n{report}"
    assert "# fail 0" in report or "fail 0" in report, report
