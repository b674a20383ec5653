"""The gateway's reading of job output: one Poll stream per caller (API key), shared by all of
that caller's HTTP requests, as a front end should read (kernel/poll.py): one message a step
for every job it streams, where a Read stream per job costs llmosd a message and a thread
wake-up per job per step. Each job's chunks go to the callback its request gave; a stream with
no job left is closed, and the next job opens a new one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from llmasos.http.errors import APIError, from_rpc, from_status
from llmasos.proto import kernel_pb2, kernel_pb2_grpc

Deliver = Callable[[kernel_pb2.ReadChunk | APIError], None]   # called until done or an error


@dataclass
class Stream:
    """One open Poll call and the jobs it follows."""

    call: grpc.aio.StreamStreamCall
    jobs: dict[int, Deliver] = field(default_factory=dict)
    writing: asyncio.Lock = field(default_factory=asyncio.Lock)   # one write at a time
    closing: bool = False   # its side is closed once its jobs are done: new jobs go elsewhere
    task: asyncio.Task | None = None


class Poller:
    """One caller's Poll streams (its metadata carries the caller's token)."""

    def __init__(self, stub: kernel_pb2_grpc.KernelStub,
                 metadata: tuple[tuple[str, str], ...], gone: Callable[[], None]) -> None:
        self.stub, self.metadata, self.gone = stub, metadata, gone
        self.current: Stream | None = None

    async def follow(self, pid: int, deliver: Deliver) -> None:
        """Stream the job's output to `deliver`: each ReadChunk, the last with done set; or an
        APIError (the job could not be followed, or the stream broke) and nothing after it."""
        stream = self.current
        if stream is None or stream.closing:
            stream = self.current = Stream(self.stub.Poll(metadata=self.metadata))
            stream.task = asyncio.get_running_loop().create_task(self._pump(stream))
        stream.jobs[pid] = deliver
        try:
            async with stream.writing:
                await stream.call.write(kernel_pb2.PollRequest(
                    follow=[kernel_pb2.ReadRequest(pid=pid)]))
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass   # the stream broke: _pump hands the error to every job it had

    async def _pump(self, stream: Stream) -> None:
        try:
            async for chunk in stream.call:
                for entry in chunk.entries:
                    self._deliver(stream, entry)
                if not stream.jobs and not stream.closing:
                    await self._close(stream)
        except grpc.RpcError as err:
            self._fail(stream, from_rpc(err))
        except asyncio.CancelledError:
            stream.call.cancel()
            raise
        else:   # the stream ended (llmosd going down ends it): whoever is left hears it
            self._fail(stream, APIError(503, "llmosd ended the output stream; retry",
                                        "service_unavailable"))
        finally:
            if self.current is stream:
                self.current = None
            if self.current is None:
                self.gone()

    @staticmethod
    def _deliver(stream: Stream, entry: kernel_pb2.PollEntry) -> None:
        deliver = stream.jobs.get(entry.pid)
        if deliver is None:
            return
        if entry.error_code:
            del stream.jobs[entry.pid]
            code = getattr(grpc.StatusCode, entry.error_code, grpc.StatusCode.INTERNAL)
            deliver(from_status(code, entry.error))
            return
        if entry.chunk.done:
            del stream.jobs[entry.pid]
        deliver(entry.chunk)

    async def _close(self, stream: Stream) -> None:
        """No job left: close our side; the stream ends when llmosd has nothing more."""
        stream.closing = True
        if self.current is stream:
            self.current = None
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            async with stream.writing:
                await stream.call.done_writing()

    @staticmethod
    def _fail(stream: Stream, error: APIError) -> None:
        jobs, stream.jobs = stream.jobs, {}
        for deliver in jobs.values():
            deliver(error)


class Pollers:
    """The gateway's Pollers, one per caller with jobs streaming."""

    def __init__(self) -> None:
        self.by_caller: dict[tuple[tuple[str, str], ...], Poller] = {}

    def of(self, stub: kernel_pb2_grpc.KernelStub,
           metadata: tuple[tuple[str, str], ...]) -> Poller:
        poller = self.by_caller.get(metadata)
        if poller is None:
            poller = self.by_caller[metadata] = Poller(
                stub, metadata, lambda: self._gone(metadata, poller))
        return poller

    def _gone(self, metadata: tuple[tuple[str, str], ...], poller: Poller) -> None:
        if self.by_caller.get(metadata) is poller and poller.current is None:
            del self.by_caller[metadata]
