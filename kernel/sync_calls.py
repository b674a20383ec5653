"""Blocking handlers on the grpc.aio server (kernel/server_loop.py). Each call runs in a thread
pool, in a copy of the calling task's context (the caller's identity: kernel/auth.py), and sees
a context that behaves as the threaded server's did: abort() raises, is_active() and
add_callback() answer for the call."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from typing import Any

import grpc


class Aborted(Exception):
    """ThreadContext.abort: the status the call ends with, carried out of the pool thread."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class ThreadContext:
    """grpc.ServicerContext, as the kernel's handlers use it, for a call of the aio server.
    Pool threads never touch the aio call (its state belongs to the loop and may be gone):
    what they ask was copied when the call started, and its end is flagged by the loop."""

    def __init__(self, context: grpc.aio.ServicerContext,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._code: grpc.StatusCode | None = None
        self._peer, self._metadata = context.peer(), context.invocation_metadata()
        left = context.time_remaining()
        self._deadline = None if left is None else time.monotonic() + left
        self._ended = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        context.add_done_callback(lambda _: self._end())   # on the loop, when the call ends

    def _end(self) -> None:
        with self._lock:
            self._ended.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:   # they may block (a sync gRPC cancel): not on the loop
            self._loop.run_in_executor(None, callback)

    def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code = code
        raise Aborted(code, details)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def is_active(self) -> bool:
        left = self.time_remaining()
        return not self._ended.is_set() and (left is None or left > 0)

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> Any:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """callback() once the call ends; False (not registered) when it has ended already."""
        with self._lock:
            if self._ended.is_set():
                return False
            self._callbacks.append(callback)
            return True


def sync_unary(fn: Callable[[Any, ThreadContext], Any], pool: Executor) -> Callable:
    """fn(request, context) in the pool, as an aio unary handler."""
    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(pool, contextvars.copy_context().run, fn, request,
                                              ThreadContext(context, loop))
        except Aborted as a:
            await context.abort(a.code, a.details)
    return behavior


_END = object()


def sync_streaming(fn: Callable[[Any, ThreadContext], Iterator[Any]], pool: Executor) -> Callable:
    """A generator function run to its end in one pool thread, its messages handed to the
    loop, as an aio server-streaming handler (for calls that stream a few messages, as a
    deploy's progress does; an output stream is async itself: handlers.sys_read)."""
    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        ctx = ThreadContext(context, loop)

        def hand(item: object) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def pump() -> None:
            try:
                for message in fn(request, ctx):
                    hand(message)
                hand(_END)
            except BaseException as e:   # noqa: BLE001 - raised on the loop, in the handler
                hand(e)
        loop.run_in_executor(pool, contextvars.copy_context().run, pump)
        while (item := await queue.get()) is not _END:
            if isinstance(item, Aborted):
                await context.abort(item.code, item.details)
            if isinstance(item, BaseException):
                raise item
            yield item
    return behavior
