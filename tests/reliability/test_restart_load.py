"""Restart under load: the host is killed and started again while callers keep calling.

Eight anvil_nb callers (client key) call ``echo`` back to back through a real ``anvil-nb
serve`` to a provider (anvil_nb's client or the unmodified ``anvil-uplink``). The host is
SIGKILLed mid-stream and started again on the same port and data dir. During the outage calls
fail (``UplinkDisconnectedError`` for those in flight, ``AppOfflineError`` or a wait for the
rest, ``NoServerFunctionError`` while a caller is back before the provider has registered);
after it every caller and the provider are back by themselves, every answer is the caller's own
(none mismatched or duplicated), and no caller is left failing.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.peers import WAIT, CallLoop, ProviderProc
from support.processes import ServeProc
from support.waiting import wait_until

from anvil_nb.core.errors import AppOfflineError, NoServerFunctionError, UplinkDisconnectedError

CALLERS = 8
#: What a call may raise during the outage: in flight at the kill, host down, or the provider
#: not back yet.
OUTAGE = (UplinkDisconnectedError, AppOfflineError, NoServerFunctionError)


@pytest.fixture(params=["nb", "real"])
def loaded(
    request: pytest.FixtureRequest, serve_proc: Any, tmp_path: Path
) -> Iterator[tuple[ServeProc, list[CallLoop]]]:
    uplink_dir = request.getfixturevalue("anvil_uplink_dir") if request.param == "real" else None
    host = serve_proc()
    provider = ProviderProc(request.param, host, tmp_path, uplink_dir)
    callers: list[CallLoop] = []
    try:
        # Each calls echo([n, i]) back to back; the outage's errors are counted, not wrong.
        callers = [CallLoop(host, "echo", n, OUTAGE) for n in range(CALLERS)]
        yield host, callers
    finally:
        for caller in callers:
            caller.close()
        provider.stop()


def test_callers_and_providers_come_back_after_a_host_restart_under_load(loaded):
    host, callers = loaded
    assert wait_until(lambda: min(len(c.ok) for c in callers) >= 20, WAIT), (
        "the load never got going"
    )
    host.restart(signal.SIGKILL)
    restarted = time.monotonic()
    for caller in callers:
        mark = len(caller.ok)
        # twenty more answers after the restart
        assert wait_until(lambda: len(caller.ok) >= mark + 20, 30), (
            f"caller {caller.tag} did not recover within 30 s; "
            f"failures: {caller.failed[-3:]}\n{host.log()[-2000:]}"
        )
    recovered = max(next(t for t in c.ok if t > restarted) for c in callers) - restarted
    for caller in callers:
        assert caller.wrong == [], caller.wrong[:5]
        late = [f for f in caller.failed if f[0] > restarted + recovered]
        assert late == [], f"caller {caller.tag} failed after it had recovered: {late[:3]}"
    print(f"all {CALLERS} callers answered again {recovered:.2f} s after the restart")
