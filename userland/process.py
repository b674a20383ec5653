"""What a finished job gave back, and the handle of a running one (Process for LLMClient,
AsyncProcess for AsyncLLMClient: the same methods, awaitable)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmasos.errors import JobFailed
from llmasos.names import reason_name, state_name
from llmasos.proto import kernel_pb2

if TYPE_CHECKING:
    from llmasos.aio import AsyncLLMClient
    from llmasos.client import LLMClient

FAILED_REASONS = ("killed", "error", "shutdown")


@dataclass
class Completion:
    """A reaped job: its text, why it ended, and its final process-table entry."""

    pid: int
    text: str
    reason: str                 # stop, length, killed, error, shutdown
    status: int                 # 0 success; -signal when killed
    token_ids: list[int] = field(default_factory=list)
    info: kernel_pb2.ProcessInfo = field(default_factory=kernel_pb2.ProcessInfo)
    timings: kernel_pb2.Timings = field(default_factory=kernel_pb2.Timings)

    @classmethod
    def from_wait(cls, resp: kernel_pb2.WaitResponse) -> Completion:
        return cls(pid=resp.info.pid, text=resp.text, reason=reason_name(resp.info.exit_reason),
                   status=resp.info.exit_status, token_ids=list(resp.token_ids), info=resp.info,
                   timings=resp.timings)

    @property
    def ok(self) -> bool:
        return self.reason not in FAILED_REASONS

    def check(self) -> str:
        """The text, or JobFailed when the job was killed, failed or cut by a shutdown."""
        if not self.ok:
            why = self.info.exit_message or f"exit status {self.status}"
            raise JobFailed(f"job {self.pid} ended ({self.reason}): {why}", self.pid, self.reason)
        return self.text


class Process:
    """A job spawned through LLMClient. Ctrl-C while waiting on it (wait, read) kills it."""

    def __init__(self, client: LLMClient, pid: int) -> None:
        self.client = client
        self.pid = pid

    def __repr__(self) -> str:
        return f"Process(pid={self.pid})"

    def wait(self, timeout: float | None = None) -> Completion:
        """Block until the job ends, reap it, and return what it produced."""
        with self.client.killing_on_interrupt(self.pid):
            return self.client.wait(self.pid, timeout)

    def read(self) -> Iterator[str]:
        """The job's output as it is produced, from its start, as text chunks."""
        with self.client.killing_on_interrupt(self.pid):
            for chunk in self.client.read(self.pid):
                if chunk.text:
                    yield chunk.text

    def kill(self, signal: str | int = "TERM") -> str:
        """Deliver a signal; returns the job's state right after, e.g. 'STOPPED'."""
        return state_name(self.client.kill(self.pid, signal))

    def stat(self) -> kernel_pb2.ProcessInfo:
        return self.client.stat(self.pid)

    def nice(self, value: int) -> int:
        return self.client.nice(self.pid, value)


class AsyncProcess:
    """A job spawned through AsyncLLMClient; cancelling a wait or read on it kills it."""

    def __init__(self, client: AsyncLLMClient, pid: int) -> None:
        self.client = client
        self.pid = pid

    def __repr__(self) -> str:
        return f"AsyncProcess(pid={self.pid})"

    async def wait(self, timeout: float | None = None) -> Completion:
        async with self.client.killing_on_cancel(self.pid):
            return await self.client.wait(self.pid, timeout)

    async def read(self) -> AsyncIterator[str]:
        async with self.client.killing_on_cancel(self.pid):
            async for chunk in self.client.read(self.pid):
                if chunk.text:
                    yield chunk.text

    async def kill(self, signal: str | int = "TERM") -> str:
        return state_name(await self.client.kill(self.pid, signal))

    async def stat(self) -> kernel_pb2.ProcessInfo:
        return await self.client.stat(self.pid)

    async def nice(self, value: int) -> int:
        return await self.client.nice(self.pid, value)
