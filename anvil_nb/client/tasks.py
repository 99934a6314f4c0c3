"""Background tasks on the provider's side: running one, its ``task_state``, and killing it.

A task (``LAUNCH_BACKGROUND``) runs on a thread of its own, so a long task never takes a
worker the process's calls need. While it runs, ``server.task_state`` is a dict it assigns
into; the host reads it (``GET_TASK_STATE``) whenever a watcher asks, and the final answer
carries it.

**Kill** (``KILL_TASK``): the task's thread is sent an asynchronous
:class:`~anvil_nb.core.errors.BackgroundTaskKilled` (``PyThreadState_SetAsyncExc``), which
Python raises in it at the next bytecode it runs: a task in a Python loop ends within
milliseconds, and the process keeps serving. A task blocked in C code or in I/O (a long
``time.sleep``, a socket read, a NumPy operation) ends when that call returns to Python; such a
task can cooperate by waiting in short steps, or by checking ``server.task_killed()``. The
exception is sent once, and never after the task's function has returned.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from anvil_nb.core.errors import BackgroundTaskKilled

__all__ = ["TaskRun", "kill", "run_task"]


@dataclass(eq=False)
class TaskRun:
    """One task running in this process."""

    request_id: str
    #: ``server.task_state`` of the task.
    state: dict[str, Any] = field(default_factory=dict)
    thread_id: int = 0
    done: bool = False
    killed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


def run_task(
    run: TaskRun, fn: Callable[..., Any], args: Any, kwargs: Any
) -> tuple[Any, BaseException | None]:
    """Call ``fn(*args, **kwargs)`` as the task *run*; its result, or what it raised.

    A kill that arrives as the function ends is caught here too: once this returns, no
    exception is pending for this thread and none will be sent.
    """
    run.thread_id = threading.get_ident()
    result: Any = None
    error: BaseException | None = None
    try:
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # everything the task raises is its answer
            error = exc
        finally:
            with run.lock:
                run.done = True
    except BaseException as exc:  # the kill, arriving just as the task ended
        result, error = None, exc
    with run.lock:
        run.done = True
    return result, error


def kill(run: TaskRun) -> bool:
    """Stop the task *run* (see the module); False if it had ended or was killed already."""
    with run.lock:
        if run.done or run.killed or not run.thread_id:
            return False
        run.killed = True
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(run.thread_id), ctypes.py_object(BackgroundTaskKilled)
        )
    return True
