"""Fixtures of the reliability suite (the peers themselves are in ``peers.py``).

``serve_proc(*flags, **env)`` starts a real ``anvil-nb serve`` and stops it at the end of the
test; ``raw_ws(url)`` opens a raw WebSocket client and closes it at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import WAIT, RawWS, ServeProc

__all__ = ["WAIT", "RawWS", "ServeProc"]


@pytest.fixture
def serve_proc(tmp_path: Path) -> Iterator[Callable[..., ServeProc]]:
    """``serve_proc(*flags, **env) -> ServeProc``; every host started is stopped at the end."""
    started: list[ServeProc] = []

    def start(*flags: str, **env: str) -> ServeProc:
        proc = ServeProc(tmp_path / f"serve-{len(started)}", flags, **env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def raw_ws() -> Iterator[Callable[..., RawWS]]:
    """``raw_ws(url) -> RawWS``, closed at the end of the test."""
    opened: list[RawWS] = []

    def make(url: str, **kw: Any) -> RawWS:
        ws = RawWS(url, **kw)
        opened.append(ws)
        return ws

    yield make
    for ws in opened:
        ws.close()
