"""One HTTP request's jobs: spawn them, merge their output (followed on the caller's shared
Poll stream, poller.py), reap them with Wait, and kill them if the client goes away first (a
detached task, so the request's cancellation cannot stop the kill half-way)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from llmasos.http.errors import APIError, from_rpc
from llmasos.http.params import Parsed
from llmasos.http.poller import Poller
from llmasos.proto import common_pb2, kernel_pb2, kernel_pb2_grpc

FINISH = {common_pb2.EXIT_STOP: "stop", common_pb2.EXIT_LENGTH: "length",
          common_pb2.EXIT_KILLED: "abort", common_pb2.EXIT_SHUTDOWN: "abort",
          common_pb2.EXIT_ERROR: "error"}
SIGKILL = 9
_detached: set[asyncio.Task] = set()   # kills in flight, kept alive until done


@dataclass
class Piece:
    """New output of one choice (one ReadChunk)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish: str | None = None   # set on the choice's last piece


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Disconnected(Exception):
    pass


@dataclass
class Jobs:
    stub: kernel_pb2_grpc.KernelStub
    metadata: tuple[tuple[str, str], ...]
    poller: Poller
    pids: list[int] = field(default_factory=list)     # choice i is pids[i]
    firsts: list[int] = field(default_factory=list)   # the first job of each prompt
    reaped: set[int] = field(default_factory=set)

    async def spawn(self, parsed: Parsed) -> None:
        for prompt in parsed.prompts:
            req = parsed.spawn
            if prompt is not None:
                req = kernel_pb2.SpawnRequest()
                req.CopyFrom(parsed.spawn)
                req.prompt = prompt
            try:
                reply = await self.stub.Spawn(req, metadata=self.metadata)
            except grpc.RpcError as err:
                self.kill()
                raise from_rpc(err) from None
            self.pids.extend(reply.pids or [reply.pid])
            self.firsts.append(reply.pid)

    async def pieces(self, disconnected: Callable[[], Awaitable[None]]) -> AsyncIterator[Piece]:
        """Every choice's output as it comes; Disconnected if the client leaves first."""
        queue: asyncio.Queue = asyncio.Queue()

        def to_queue(i: int) -> Callable[[kernel_pb2.ReadChunk | APIError], None]:
            def deliver(item: kernel_pb2.ReadChunk | APIError) -> None:
                if isinstance(item, APIError):
                    queue.put_nowait(item)
                    return
                queue.put_nowait(Piece(i, item.text, list(item.token_ids), list(item.logprobs),
                                       FINISH.get(item.exit_reason) if item.done else None))
                if item.done:
                    queue.put_nowait(i)
            return deliver

        async def watch() -> None:
            await disconnected()
            await queue.put(Disconnected())

        for i, pid in enumerate(self.pids):
            await self.poller.follow(pid, to_queue(i))
        watching = asyncio.create_task(watch())
        left = len(self.pids)
        try:
            while left:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if isinstance(item, int):
                    left -= 1
                    continue
                yield item
        except BaseException:
            self.kill()
            raise
        finally:
            watching.cancel()

    async def reap(self) -> tuple[Usage, str]:
        """Wait for every job (they have ended); the usage, and the first error message."""
        usage, error = Usage(), ""
        for pid in self.pids:
            try:
                reply = await self.stub.Wait(kernel_pb2.WaitRequest(pid=pid),
                                             metadata=self.metadata, timeout=60)
            except grpc.RpcError as err:
                raise from_rpc(err) from None
            self.reaped.add(pid)
            info = reply.info
            usage.completion_tokens += info.generated_tokens
            if pid in self.firsts:
                usage.prompt_tokens += info.prompt_tokens
            if info.exit_reason == common_pb2.EXIT_ERROR and not error:
                error = info.exit_message or "the job failed"
        return usage, error

    def kill(self) -> None:
        """SIGKILL every job not reaped yet; those that had already ended are reaped."""
        live = [p for p in self.pids if p not in self.reaped]
        if live:
            task = asyncio.get_running_loop().create_task(self._kill(live))
            _detached.add(task)
            task.add_done_callback(_detached.discard)

    async def _kill(self, pids: list[int]) -> None:
        for pid in pids:
            try:
                await self.stub.Kill(kernel_pb2.KillRequest(pid=pid, signal=SIGKILL),
                                     metadata=self.metadata, timeout=10)
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.FAILED_PRECONDITION:   # it had ended: reap
                    with contextlib.suppress(grpc.RpcError):
                        await self.stub.Wait(kernel_pb2.WaitRequest(pid=pid),
                                             metadata=self.metadata, timeout=10)


def failed(message: str) -> APIError:
    return APIError(500, f"the job failed: {message}", "server_error", code="job_failed")
