"""Mailboxes from Python: named, durable, bounded message queues kept by llmosd's IPC service.

    box = client.mailbox("jobs")
    box.create(mode="all", max_messages=100)     # or "owner", or "group:alice,bob"
    box.send("summarize report.txt")
    msg = box.receive(timeout=30)                # DeadlineExceeded if nothing came
    print(msg.text, msg.sender)
    client.mailbox().list(); box.remove()

AsyncMailbox is the same, awaitable. Both take a Kernel stub and the call metadata, so any
client can hand them out (`client.mailbox(name)`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from llmasos.errors import AlreadyExists, LLMError, from_rpc
from llmasos.proto import kernel_pb2

DEFAULT_TIMEOUT = 10.0   # seconds, for calls that answer at once
MODES = {"owner": 0, "group": 1, "all": 2}     # kernel.proto's MboxMode
MODE_NAMES = {number: name for name, number in MODES.items()}


@dataclass(frozen=True)
class Message:
    text: str
    sender: str      # the user who sent it
    sequence: int    # its number in the mailbox, from 1
    pid: int = 0     # the job whose output it is (Spawn's stdout_mailbox), else 0

    @classmethod
    def of(cls, r: kernel_pb2.MboxRecvResponse) -> Message:
        return cls(r.text, r.sender, r.sequence, r.pid)


def parse_mode(mode: str, members: Iterable[str] = ()) -> tuple[int, list[str]]:
    """"owner", "all", "group" (with members) or "group:alice,bob" → (MboxMode, members)."""
    kind, _, listed = mode.partition(":")
    if kind not in MODES:
        raise ValueError(f"mode must be owner, all or group:USER,..., got {mode!r}")
    users = [u for u in listed.split(",") if u] + list(members)
    return MODES[kind], users


def mode_text(info: kernel_pb2.MboxInfo) -> str:
    """How ipcs shows a mode: owner, all, group:alice,bob."""
    name = MODE_NAMES.get(info.mode, str(info.mode))
    return f"{name}:{','.join(info.members)}" if info.members else name


def create_request(name: str, mode: str, members: Iterable[str], max_messages: int,
                   max_bytes: int) -> kernel_pb2.MboxCreateRequest:
    number, users = parse_mode(mode, members)
    return kernel_pb2.MboxCreateRequest(name=name, mode=number, members=users,
                                        max_messages=max_messages, max_bytes=max_bytes)


class _Base:
    def __init__(self, stub: Any, metadata: Any, name: str = "",
                 timeout: float = DEFAULT_TIMEOUT, address: str = "") -> None:
        self.stub = stub
        self.metadata = metadata
        self.name = name
        self.timeout = timeout
        self.address = address

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def _named(self) -> str:
        if not self.name:
            raise ValueError("this call needs a mailbox name: client.mailbox(NAME)")
        return self.name

    def _error(self, err: grpc.RpcError) -> LLMError:
        return from_rpc(err, self.address)


class Mailbox(_Base):
    """One mailbox by name (the name may be empty for list())."""

    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=timeout or self.timeout,
                                              metadata=self.metadata)
        except grpc.RpcError as err:
            raise self._error(err) from None

    def create(self, mode: str = "owner", members: Iterable[str] = (), max_messages: int = 0,
               max_bytes: int = 0, exist_ok: bool = False) -> Mailbox:
        """Create it (you own it). exist_ok: an existing mailbox of that name is fine."""
        try:
            self._call("MboxCreate", create_request(self._named(), mode, members,
                                                    max_messages, max_bytes))
        except AlreadyExists:
            if not exist_ok:
                raise
        return self

    def send(self, text: str) -> int:
        """Append a message; its sequence number. ResourceExhausted when the mailbox is full."""
        return self._call("MboxSend", kernel_pb2.MboxSendRequest(name=self._named(),
                                                                 text=text)).sequence

    def receive(self, timeout: float = 0.0) -> Message:
        """Take the oldest message, waiting up to `timeout` seconds; DeadlineExceeded if none."""
        req = kernel_pb2.MboxRecvRequest(name=self._named(), timeout_ms=int(timeout * 1000))
        return Message.of(self._call("MboxRecv", req, timeout + self.timeout))

    def info(self) -> kernel_pb2.MboxInfo:
        return self._call("MboxList", kernel_pb2.MboxListRequest(name=self._named())).mailboxes[0]

    def list(self) -> list[kernel_pb2.MboxInfo]:
        """Every mailbox you may use (root: all)."""
        return list(self._call("MboxList", kernel_pb2.MboxListRequest()).mailboxes)

    def remove(self) -> int:
        """Delete it and its messages (owner or root); how many messages were dropped."""
        return self._call("MboxRemove",
                          kernel_pb2.MboxRemoveRequest(name=self._named())).discarded


class AsyncMailbox(_Base):
    """Mailbox on grpc.aio: the same methods, awaitable."""

    async def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return await getattr(self.stub, method)(request, timeout=timeout or self.timeout,
                                                    metadata=self.metadata)
        except grpc.RpcError as err:
            raise self._error(err) from None

    async def create(self, mode: str = "owner", members: Iterable[str] = (),
                     max_messages: int = 0, max_bytes: int = 0,
                     exist_ok: bool = False) -> AsyncMailbox:
        try:
            await self._call("MboxCreate", create_request(self._named(), mode, members,
                                                          max_messages, max_bytes))
        except AlreadyExists:
            if not exist_ok:
                raise
        return self

    async def send(self, text: str) -> int:
        return (await self._call("MboxSend", kernel_pb2.MboxSendRequest(
            name=self._named(), text=text))).sequence

    async def receive(self, timeout: float = 0.0) -> Message:
        req = kernel_pb2.MboxRecvRequest(name=self._named(), timeout_ms=int(timeout * 1000))
        return Message.of(await self._call("MboxRecv", req, timeout + self.timeout))

    async def info(self) -> kernel_pb2.MboxInfo:
        reply = await self._call("MboxList", kernel_pb2.MboxListRequest(name=self._named()))
        return reply.mailboxes[0]

    async def list(self) -> list[kernel_pb2.MboxInfo]:
        return list((await self._call("MboxList", kernel_pb2.MboxListRequest())).mailboxes)

    async def remove(self) -> int:
        return (await self._call("MboxRemove", kernel_pb2.MboxRemoveRequest(
            name=self._named()))).discarded
