"""llmosd's gRPC server runs on grpc.aio, on an event loop of its own thread. Why: a job's output
stream (Read) then costs no thread. On the threaded server each open Read held a pool thread for
its job's life (512 of them at most), woken for every token and again when gRPC had sent it.
Measured on 2 cores, 32 streamed requests: llmosd's context switches per round 17.5k -> 6.8k,
its threads' run-queue wait 1.8 -> 0.9 s; tokens/s within noise of the threaded server's (0.947x
against 0.938x the in-process runner, 8 interleaved rounds).

The rest of the kernel is threaded code and stays so: every other syscall runs in a thread pool
(kernel/sync_calls.py). This file only hosts the loop and the server's start and stop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

import grpc

T = TypeVar("T")


class ServerLoop:
    """The event loop thread, and the grpc.aio server it runs (made on it: grpc.aio needs the
    running loop). start() and stop() are called from llmosd's main thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-loop",
                                       daemon=True)
        self.thread.start()
        self.server: grpc.aio.Server | None = None

    def run(self, fn: Callable[[], T]) -> T:
        """fn() on the loop thread; its result, or its exception (SystemExit too) raised here."""
        done: Future[T] = Future()

        def call() -> None:
            try:
                done.set_result(fn())
            except BaseException as e:   # noqa: BLE001 - handed to the caller
                done.set_exception(e)
        self.loop.call_soon_threadsafe(call)
        return done.result()

    def wait(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def start(self) -> None:
        self.wait(self.server.start())

    def stop(self, grace: float | None) -> Stopping:
        return Stopping(self, asyncio.run_coroutine_threadsafe(self.server.stop(grace),
                                                               self.loop))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class Stopping:
    """What grpc.Server.stop returns, so callers can wait() for the stop."""

    def __init__(self, host: ServerLoop, future: Future) -> None:
        self.host, self.future = host, future

    def wait(self, timeout: float | None = None) -> bool:
        self.future.result(timeout)
        self.host.close()
        return True
