"""The wheel a user installs: the prebuilt Lab extension and the browser client are inside it.

The source tree (built already: ``pip install -e`` ran the npm build) is copied into a
temporary folder, keeping modification times so the build hook sees the builds as fresh and
needs no Node, and ``pip wheel`` builds there (an isolated build, as any user's ``pip install``
would; the build requirements come from PyPI). The wheel is then installed by pip into a fresh
prefix in a temporary folder, and ``jupyter labextension list`` is asked about the extension
with that prefix's ``share/jupyter`` on ``JUPYTER_PATH``, as a user's environment would have
it. Nothing is written into the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(
    ".venv", ".git", "node_modules", "__pycache__", "build", "lib", "*.egg-info", "dist"
)


@pytest.mark.timeout(600)  # an isolated build installs its build requirements (pip's cache)
def test_the_wheel_carries_the_prebuilt_extension_and_the_client(tmp_path: Path):
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=SKIP, copy_function=shutil.copy2)
    out = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = out.glob("anvil_nb-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert "anvil_nb/static/client.js" in names
    # pip installs it as it would for a user (its data files under the prefix's share/);
    # --ignore-installed: never touch this environment's own (editable) anvil_nb
    prefix = tmp_path / "prefix"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--ignore-installed", "--quiet", "--prefix", str(prefix), str(wheel)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout + installed.stderr
    share = prefix / "share" / "jupyter"
    extension = share / "labextensions" / "anvil_nb"
    assert (extension / "install.json").exists()
    assert any((extension / "static").glob("remoteEntry.*.js"))
    env = {**os.environ, "JUPYTER_PATH": str(share), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg")}
    listed = subprocess.run(
        [sys.executable, "-m", "jupyter", "labextension", "list"],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    text = listed.stdout + listed.stderr
    line = next((x for x in text.splitlines() if "anvil_nb" in x and str(share) not in x), "")
    assert "enabled" in line and "OK" in line, text
