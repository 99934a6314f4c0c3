"""The real ``anvil-uplink`` (PyPI), installed out of the venv for the tests that run it.

It installs a top-level ``anvil`` package, so it never goes into the project's venv:
:func:`install_anvil_uplink` installs it once with ``pip install --target`` into the user's
cache folder (outside the checkout: tests write nothing into it; tutorial 05 installs the same
client the same way), under a lock file so that two pytest processes never install at once.
Scripts that use it run with ``PYTHONPATH`` set to that folder (the ``anvil_uplink_dir``
fixture).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import platformdirs
import pytest

__all__ = ["ANVIL_UPLINK_VERSION", "UPLINK_DIR", "install_anvil_uplink"]

ANVIL_UPLINK_VERSION = "0.7.0"
#: Outside the checkout (tests write nothing into it): the user's cache folder, shared with
#: tutorial 05, which installs the same client the same way.
UPLINK_DIR = Path(platformdirs.user_cache_dir("anvil_nb")) / f"anvil-uplink-{ANVIL_UPLINK_VERSION}"


def install_anvil_uplink() -> Path:
    """The folder holding the real anvil-uplink (installed there once with ``pip --target``)."""
    marker = UPLINK_DIR / f"anvil_uplink-{ANVIL_UPLINK_VERSION}.dist-info"
    if marker.is_dir():
        return UPLINK_DIR
    UPLINK_DIR.parent.mkdir(parents=True, exist_ok=True)
    lock_path = UPLINK_DIR.with_name(UPLINK_DIR.name + ".lock")
    with open(lock_path, "w") as lock:
        deadline = time.monotonic() + 300
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{lock_path} stayed locked for 300 s (another install hung?)")
                threading.Event().wait(0.2)  # poll the lock; no other process to wait on
        try:
            if marker.is_dir():  # another process installed it while we waited
                return UPLINK_DIR
            staging = UPLINK_DIR.with_name(f"{UPLINK_DIR.name}.tmp-{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            cmd = [
                sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
                "--no-input", "--quiet", "--target", str(staging),
                f"anvil-uplink=={ANVIL_UPLINK_VERSION}",
            ]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
            if proc.returncode != 0:
                shutil.rmtree(staging, ignore_errors=True)
                pytest.fail(f"installing anvil-uplink failed:\n{proc.stdout}\n{proc.stderr}")
            shutil.rmtree(UPLINK_DIR, ignore_errors=True)
            staging.rename(UPLINK_DIR)  # atomic: the marker appears only for a full install
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return UPLINK_DIR
