"""Background tasks, as the host routes them (PROTOCOL.md §8): launch, state, kill, records.

:class:`TaskRouting` is the part of :class:`~anvil_nb.host.dispatcher.Host` that runs tasks (a
mixin, so the dispatcher's module stays about calls). A launch is a call of ``task:NAME`` sent
to a provider as ``LAUNCH_BACKGROUND`` in a **new session**, with a ``background_task`` client
and frame, that nobody waits for: the launcher is answered at once with the task's live object
(backend ``anvil.private.BackgroundTask``, its id JSON-encoded, signed by the host). The
provider's final answer carries the return value (or error) and the final ``taskState``,
which the host keeps in the task's record (:mod:`anvil_nb.host.tasks`).

* ``get_state()`` of a running task asks its provider (``GET_TASK_STATE``, answered within
  :data:`STATE_TIMEOUT` seconds); a provider that cannot answer makes the task ``missing``.
* ``kill()`` sends ``KILL_TASK`` and ends the task's record at once as ``killed``; an anvil_nb
  provider stops the task's thread (the real client cannot, and says so in its log), and any
  late answer is dropped.
* A provider lost while its task runs makes the task ``missing``.

Only trusted callers may launch, list, get or kill tasks (others get ``BackgroundTaskError``);
anyone holding a task's live object may watch it (its MAC is checked).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import itertools
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from anvil_nb.core import protocol
from anvil_nb.core.errors import (
    AnvilError,
    BackgroundTaskError,
    BackgroundTaskKilled,
    BackgroundTaskNotFound,
    NoServerFunctionError,
    PermissionDenied,
    SerializationError,
    error_to_wire,
)
from anvil_nb.core.events import CallStarted
from anvil_nb.core.liveobject import LiveObjectProxy
from anvil_nb.core.logs import clip
from anvil_nb.core.serialise import serialise
from anvil_nb.host.sessions import SessionRecord
from anvil_nb.host.state import AppState, PeerState, Request
from anvil_nb.host.tasks import (
    BACKEND,
    METHODS,
    TaskRecord,
    kept,
    new_task_id,
    task_mac,
)

if TYPE_CHECKING:
    from anvil_nb.host.dispatcher import Host

__all__ = ["STATE_TIMEOUT", "TASK_COMMANDS", "TaskRouting"]

log = logging.getLogger("anvil_nb.host.background")

#: Seconds a provider has to answer ``GET_TASK_STATE``.
STATE_TIMEOUT = 5.0

#: The private functions of background tasks the host answers.
TASK_COMMANDS = frozenset(
    f"anvil.private.background_tasks.{name}" for name in ("launch", "get_by_id", "list")
)

_KILLED = "anvil.server.BackgroundTaskKilled"
_query_ids = itertools.count(1)


def _admin_view(r: TaskRecord) -> dict[str, Any]:
    return {
        "id": r.id, "name": r.name, "status": r.status or "running", "started": r.started,
        "ended": r.ended, "provider": r.provider, "launcher": r.launcher, "state": r.state,
    }  # fmt: skip


def _wire_value(value: Any) -> tuple[Any, list[Any]]:
    """A value the host makes (a live object, a datetime) as ``response`` and ``objects``."""
    enc = serialise({"response": value})
    return enc.message["response"], enc.message.get("objects") or []


def _shift_args(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``objects`` of ``launch(name, *args)`` as those of ``task(*args)``: paths in ``args``
    move down by one (the name is a string: no entry points at it).
    """
    out = []
    for entry in objects:
        path = entry.get("path") or []
        if path and path[0] == "args":
            if len(path) < 2 or type(path[1]) is not int or path[1] < 1:
                raise SerializationError(
                    f"an object at {clip(path)} is not one of the task's arguments"
                )
            out.append({**entry, "path": ["args", path[1] - 1, *path[2:]]})
        else:
            out.append(entry)
    return out


class TaskRouting:
    """Background tasks for :class:`~anvil_nb.host.dispatcher.Host` (see the module)."""

    # -- for the host's admin doors (the Lab panel) --------------------------------------------
    def tasks(self: Host, app: str) -> list[dict[str, Any]]:
        """The records of *app*'s tasks, newest first, as plain JSON (``_/admin/tasks``): id,
        name, status (``"running"`` until it ends), start and end times, the connection that
        runs or ran it and the one that launched it, and the final state of a finished task.
        """
        state = self.app(app)
        return [_admin_view(r) for r in state.tasks.list(state.name)]

    def kill_task(self: Host, app: str, task_id: str) -> bool:
        """Kill a running task of *app* (an admin's kill); False if there is no such running task."""
        state = self.app(app)
        record = state.tasks.get(state.name, task_id)
        if record is None or not record.running:
            return False
        self._kill(state, record)
        return True

    async def task_state(self: Host, app: str, task_id: str) -> Any:
        """The live ``task_state`` of a running task (its final state once it ended)."""
        state = self.app(app)
        record = state.tasks.get(state.name, task_id)
        if record is None:
            raise BackgroundTaskNotFound(f"No background task with id {task_id!r}")
        value, _ = await self._task_state(state, record)
        return value

    # -- the task's live object ----------------------------------------------------------------
    def _task_object(self: Host, record: TaskRecord) -> LiveObjectProxy:
        return LiveObjectProxy(
            {
                "backend": BACKEND,
                "id": json.dumps(record.id),
                "mac": task_mac(self.secret, record.app, record.id),
                "permissions": [],
                "methods": list(METHODS),
            }
        )

    def _task_of_spec(self: Host, app: AppState, spec: dict[str, Any]) -> TaskRecord:
        """The record a live object names; its MAC must be this host's for this app."""
        try:
            task_id = json.loads(spec.get("id") or "null")
        except (TypeError, ValueError):
            task_id = None
        mac = spec.get("mac")
        if (
            not isinstance(task_id, str)
            or not isinstance(mac, str)
            or not hmac.compare_digest(
                mac.encode("utf-8", "replace"), task_mac(self.secret, app.name, task_id).encode()
            )
        ):
            raise PermissionDenied("That is not a background task of this app")
        record = app.tasks.get(app.name, task_id)
        if record is None:
            raise BackgroundTaskNotFound(f"No background task with id {task_id!r}")
        return record

    # -- private functions ---------------------------------------------------------------------
    def _task_command(
        self: Host, ps: PeerState, call_id: Any, msg: dict[str, Any], session: SessionRecord
    ) -> None:
        """``anvil.private.background_tasks.{launch, get_by_id, list}`` (*session*: the
        call's, which the arguments' capabilities were issued to).
        """
        command = msg["command"]
        if not ps.trusted:
            raise BackgroundTaskError(
                "Only server code can launch, list or look up background tasks"
            )
        app = ps.app
        if command.endswith(".launch"):
            value, objects = _wire_value(self._launch(ps, msg, session))
        elif command.endswith(".get_by_id"):
            args = msg.get("args") or [None]
            spec = {"id": json.dumps(args[0]), "mac": task_mac(self.secret, app.name, str(args[0]))}
            value, objects = _wire_value(self._task_object(self._task_of_spec(app, spec)))
        else:
            records = app.tasks.list(app.name)
            value, objects = _wire_value([self._task_object(r) for r in records])
        self._send(ps, protocol.response(call_id, value, objects))

    def _launch(
        self: Host, ps: PeerState, msg: dict[str, Any], caller_session: SessionRecord
    ) -> LiveObjectProxy:
        args = msg.get("args") or []
        kwargs = msg.get("kwargs") or {}
        if not args or not isinstance(args[0], str):
            raise BackgroundTaskError("launch_background_task needs the task's name")
        name, command = args[0], "task:" + args[0]
        app = ps.app
        provider = app.registry.pick(command)
        if provider is None:
            raise NoServerFunctionError(
                f'No background task named "{clip(name)}" has been registered'
            )
        objects = _shift_args(protocol.check_objects(msg.get("objects"), protocol.CALL_ROOTS))
        self._check_capabilities(objects, caller_session, trusted=True)
        record = TaskRecord(
            id=new_task_id(), app=app.name, name=name, started=time.time(),
            launcher=ps.peer.name, provider=provider.peer.name,
        )  # fmt: skip
        client = {"type": "background_task", "background-task-id": record.id}
        session = app.sessions.new(client=client)
        record.session_id = session.id
        rid = record.request_id = f"bg-{self._prefix}-{next(self._ids)}"
        stack = [{"type": "background_task"}]
        out = protocol.call(
            rid, command, args[1:], kwargs, self._sign_objects(objects, session),
            call_stack_id=rid, vt_global=msg.get("vt_global"), call_stack=stack, client=client,
            session_data={}, session_id=session.id, app_info=app.app_info,
        )  # fmt: skip
        out["type"] = "LAUNCH_BACKGROUND"
        data = self._encode(out, f"launch of task {clip(name)!r}")
        req = Request(
            id=rid, command=command, caller=None, caller_call_id=None, provider=provider,
            session_id=session.id, session_version=0, nested=False, caps_in=frozenset(),
            started=time.perf_counter(), trusted=True, stack=stack, client=client,
        )  # fmt: skip
        req.task = record
        provider.served[rid] = req
        app.tasks.put(record)
        self._send(provider, out, None, data)
        if self._heard(app, ps, provider):
            event = CallStarted(
                time=time.time(), call_id=rid, command=command, client=client,
                call_stack=("background_task",), trusted=True, session_id=session.id,
                caller=ps.peer.name, provider=provider.peer.name, direction="host",
                app=app.name, background_task_id=record.id,
            )  # fmt: skip
            self._publish(app, event, ps, provider)
        return self._task_object(record)

    # -- the end of a task ---------------------------------------------------------------------
    def _end_task(self: Host, req: Request, msg: dict[str, Any], media: Any) -> None:
        """The provider's final answer to a task."""
        record = req.task
        assert record is not None
        error = msg.get("error")
        state = msg.get("taskState")
        if error is not None:
            wire = protocol.wire_error(error)
            status = "killed" if wire.get("type") == _KILLED else "failed"
            self._finish_task(req, status, error=kept(wire, "error"), state=state)
            return
        try:
            objects = self._task_objects(req, msg.get("objects"))
            if media or protocol.media_ids(msg):
                raise SerializationError("a task's return value cannot hold Media")
        except (AnvilError, ValueError) as exc:
            self._finish_task(req, "failed", error=error_to_wire(exc), state=state)
            return
        result = kept({"response": msg.get("response"), "objects": objects}, "return value")
        self._finish_task(req, "completed", result=result, state=state)

    def _task_objects(self: Host, req: Request, objects: Any) -> list[dict[str, Any]]:
        """The ``objects`` of a task's answer, checked: capabilities must have been issued to
        the task's session (while it still exists), and are kept without a MAC; each reader
        is given them signed for its own session (:meth:`_for_reader`).
        """
        checked = protocol.check_objects(objects, protocol.RESPONSE_ROOTS)
        session = req.provider.app.sessions.get(req.session_id)
        if session is None:
            if any("Capability" in (o.get("type") or ()) for o in checked):
                raise SerializationError("a task's capabilities outlived its session")
            return checked
        self._check_capabilities(checked, session, trusted=True)
        return [
            {**o, "mac": None, "narrow": None} if "Capability" in (o.get("type") or ()) else o
            for o in checked
        ]

    def _for_reader(
        self: Host, ps: PeerState, objects: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Kept ``objects`` as *ps* may receive them: capabilities signed for its session."""
        if not any("Capability" in (o.get("type") or ()) for o in objects):
            return objects
        session = ps.app.sessions.get(ps.session_id)
        if session is None:
            raise SerializationError("your session has ended")
        return self._sign_objects(objects, session)

    def _finish_task(
        self: Host,
        req: Request,
        status: str,
        *,
        result: Any = None,
        error: Any = None,
        state: Any = None,
    ) -> None:
        record = req.task
        if record is None or not record.running:
            return
        record.status, record.ended = status, time.time()
        record.result, record.error = result, error
        if state is not None:
            record.state = kept(state, "task state")
        app = req.provider.app
        app.tasks.put(record)
        app.sessions.drop(record.session_id)
        log.info("task %s (%s) %s", record.id, clip(record.name), status)

    # -- watching and killing ------------------------------------------------------------------
    async def _task_live_call(
        self: Host, ps: PeerState, msg: dict[str, Any]
    ) -> tuple[Any, list[Any]]:
        """A method of a task's live object."""
        spec = msg["liveObjectCall"]
        record = self._task_of_spec(ps.app, spec)
        method = spec.get("method")
        if method == "kill":
            if not ps.trusted:
                raise BackgroundTaskError("Only server code can kill a background task")
            self._kill(ps.app, record)
            return None, []
        if method == "get_state":
            value, objects = await self._task_state(ps.app, record)
        else:
            value, objects = self._task_answer(record, method)
        return value, self._for_reader(ps, objects)

    def _task_answer(self: Host, record: TaskRecord, method: Any) -> tuple[Any, list[Any]]:
        if method == "get_id":
            return record.id, []
        if method == "get_task_name":
            return record.name, []
        if method == "get_start_time":
            return _wire_value(dt.datetime.fromtimestamp(record.started, dt.timezone.utc))
        if method == "get_termination_status":
            return record.status, []
        if method == "is_running":
            return record.running, []
        if method not in ("is_completed", "get_return_value", "get_error"):
            raise PermissionDenied(f"A background task has no method {clip(method)}")
        if record.running:
            return (False if method == "is_completed" else None), []
        self._raise_outcome(record)
        if method == "is_completed":
            return True, []
        if method == "get_error":
            return None, []
        result = record.result or {}
        return result.get("response"), result.get("objects") or []

    @staticmethod
    def _raise_outcome(record: TaskRecord) -> None:
        """Raise what ended a task that did not complete (as the App Server does)."""
        if record.status == "killed":
            raise BackgroundTaskKilled(f"The background task {record.name!r} was killed")
        if record.status == "missing":
            raise BackgroundTaskError(
                f"The background task {record.name!r} is missing: the connection running it was lost"
            )
        if record.status == "failed":
            raise _RemoteTaskError(record.error or {})
        if isinstance(record.result, dict) and record.result.get("type"):  # too large to keep
            raise _RemoteTaskError(record.result)

    def _running_request(self: Host, app: AppState, record: TaskRecord) -> Request | None:
        for ps in self._peers.values():
            if ps.app is app and ps.peer.name == record.provider:
                req = ps.served.get(record.request_id)
                if req is not None and req.task is not None:
                    return req
        return None

    async def _task_state(self: Host, app: AppState, record: TaskRecord) -> tuple[Any, list[Any]]:
        if not record.running:
            return record.state, []
        req = self._running_request(app, record)
        if req is None:
            record.status, record.ended = "missing", time.time()
            app.tasks.put(record)
            return record.state, []
        qid = f"bgquery-{self._prefix}-{next(_query_ids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        req.provider.queries[qid] = future
        self._send(req.provider, {"type": "GET_TASK_STATE", "id": qid, "task": req.id})
        try:
            answer = await asyncio.wait_for(future, STATE_TIMEOUT)
        except asyncio.TimeoutError:
            answer = {"error": {"type": "anvil.server.TimeoutError"}}
        finally:
            req.provider.queries.pop(qid, None)
        if "error" in answer:
            if req.task is not None and req.task.running and answer["error"].get("type") in _LOST:
                self._release(req, None, late=True)
                self._finish_task(req, "missing")
            return record.state, []
        return answer.get("response"), self._task_objects(req, answer.get("objects"))

    def _kill(self: Host, app: AppState, record: TaskRecord) -> None:
        """End a running task as ``killed``; its provider is told (anvil_nb stops it)."""
        if not record.running:
            return
        req = self._running_request(app, record)
        if req is None:
            record.status, record.ended = "killed", time.time()
            app.tasks.put(record)
            return
        self._send(req.provider, {"type": "KILL_TASK", "task": req.id})
        self._finish_task(req, "killed")
        self._release(req, None, late=True)


#: Errors of ``GET_TASK_STATE`` after which the App Server calls a task missing.
_LOST = frozenset(
    {
        "anvil.server.NotRunningTask", "anvil.server.TimeoutError", "anvil.server.InternalError",
        "anvil.server.RuntimeUnavailableError", "anvil.server.ExecutionTerminatedError",
    }
)  # fmt: skip


class _RemoteTaskError(AnvilError):
    """A failed task's error, sent on as it was kept (its own type, message and trace)."""

    def __init__(self, wire: dict[str, Any]):
        super().__init__(str(wire.get("message", "")))
        self.wire = wire
