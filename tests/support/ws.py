"""A raw WebSocket peer: sends exactly the frames a test wants, honest or not.

:class:`RawWS` is tornado's WebSocket client on a loop thread of its own; every wait is bounded.
The ``raw_ws`` fixture opens them and closes them at the end of the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from typing import Any

import orjson
import tornado.websocket

__all__ = ["WAIT", "RawWS"]

#: Seconds a raw WebSocket peer waits for anything.
WAIT = 20.0


class RawWS:
    """A bare WebSocket client on a loop thread of its own: sends exactly what a test wants.

    ``recv()`` returns decoded JSON frames (bytes for binary frames, ``None`` once closed);
    every wait is bounded by ``WAIT`` unless given.
    """

    def __init__(self, url: str, max_message_size: int = 64 * 1024 * 1024):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.frames: queue.Queue[Any] = queue.Queue()
        self._stashed: dict[Any, Any] = {}
        self.ws = self._run(self._connect(url, max_message_size))
        self._reader = asyncio.run_coroutine_threadsafe(self._read(), self.loop)

    @staticmethod
    async def _connect(url: str, max_message_size: int) -> Any:
        return await tornado.websocket.websocket_connect(url, max_message_size=max_message_size)

    def _run(self, coro: Any, timeout: float = WAIT) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _read(self) -> None:
        while True:
            frame = await self.ws.read_message()
            self.frames.put(frame)
            if frame is None:
                return

    def send(self, frame: Any, binary: bool = False) -> None:
        data = frame if isinstance(frame, (str, bytes)) else orjson.dumps(frame)
        self._run(self._write(data, binary))

    def send_nowait(self, frame: Any) -> None:
        """Queue a frame without waiting for it to be written (for pipelining many)."""
        data = frame if isinstance(frame, (str, bytes)) else orjson.dumps(frame)
        self.loop.call_soon_threadsafe(self._write_quietly, data)

    def _write_quietly(self, data: Any) -> None:
        with contextlib.suppress(tornado.websocket.WebSocketClosedError):
            self.ws.write_message(data)

    async def _write(self, data: Any, binary: bool) -> None:
        await self.ws.write_message(data, binary=binary)

    def hello(self, key: str) -> dict[str, Any]:
        self.send({"key": key, "v": 8})
        return self.recv()

    def recv(self, timeout: float = WAIT) -> Any:
        frame = self.frames.get(timeout=timeout)
        if frame is None:
            self.frames.put(None)
            return None
        return orjson.loads(frame) if isinstance(frame, str) else frame

    def response(self, call_id: Any, timeout: float = WAIT) -> dict[str, Any]:
        """The response to *call_id*; other frames read meanwhile are kept for later calls."""
        if call_id in self._stashed:
            return self._stashed.pop(call_id)
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.0, deadline - time.monotonic()))
            if msg is None:
                raise AssertionError(f"connection closed before the response to {call_id!r}")
            if isinstance(msg, dict) and msg.get("id") == call_id:
                return msg
            if isinstance(msg, dict) and "id" in msg and len(self._stashed) < 100_000:
                self._stashed[msg["id"]] = msg

    def closed(self, timeout: float = WAIT) -> bool:
        """True once the server has closed the connection (waiting at most *timeout*)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                frame = self.frames.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if frame is None:
                self.frames.put(None)
                return True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.call_soon_threadsafe(self.ws.close)
        self._reader.cancel()
        # let the loop finish the reader's cancellation before it stops (no task left pending)
        with contextlib.suppress(Exception):
            self._run(asyncio.sleep(0), timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():  # close it: its default executor (the resolver's
            self.loop.close()  # threads) goes too, or every RawWS would leave a thread behind
