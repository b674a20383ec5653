"""llmasos.v1.Ipc over gRPC: translates messages to and from Mailboxes."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from llmasos.proto import ipc_pb2, ipc_pb2_grpc
from llmasos.services.ipc.mailboxes import (
    KERNEL,
    BadRequest,
    Caller,
    Denied,
    IpcError,
    Mailboxes,
    MailboxExists,
    MailboxFull,
    MailboxInfo,
    NoSuchMailbox,
    ReceiveTimeout,
)

SERVICE_NAME = ipc_pb2.DESCRIPTOR.services_by_name["Ipc"].full_name

# The error table: core exception → status code.
CODES: dict[type[IpcError], grpc.StatusCode] = {
    MailboxExists: grpc.StatusCode.ALREADY_EXISTS,
    NoSuchMailbox: grpc.StatusCode.NOT_FOUND,
    MailboxFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    ReceiveTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    Denied: grpc.StatusCode.PERMISSION_DENIED,
}

T = TypeVar("T")


def call(context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
    """Run fn; turn a typed IPC error into its status code."""
    try:
        return fn()
    except IpcError as e:
        context.abort(CODES[type(e)], str(e))
        raise  # unreachable: abort raises
    except sqlite3.Error as e:  # the store failed: nothing changed in memory
        full = "full" in str(e)
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED if full else grpc.StatusCode.INTERNAL,
                      f"the mailbox store failed: {e}" + ("; free disk space" if full else ""))
        raise


def caller_of(request: Any) -> Caller | None:
    """The Caller a request names; none means the kernel acting for itself."""
    if not request.HasField("caller"):
        return KERNEL
    return Caller(request.caller.user, request.caller.admin)


def to_proto(m: MailboxInfo) -> ipc_pb2.Mailbox:
    return ipc_pb2.Mailbox(name=m.name, owner=m.owner, depth=m.depth, capacity=m.capacity,
                           mode=m.mode, members=m.members, bytes=m.bytes,
                           max_bytes=m.max_bytes, created_unix=m.created)


class IpcServicer(ipc_pb2_grpc.IpcServicer):
    def __init__(self, mailboxes: Mailboxes) -> None:
        self.mailboxes = mailboxes

    def CreateMailbox(self, request: ipc_pb2.CreateMailboxRequest,  # noqa: N802
                      context: grpc.ServicerContext) -> ipc_pb2.CreateMailboxResponse:
        info = call(context, lambda: self.mailboxes.create(
            request.name, request.owner, request.capacity, mode=request.mode,
            members=list(request.members), max_bytes=request.max_bytes,
            caller=caller_of(request)))
        return ipc_pb2.CreateMailboxResponse(mailbox=to_proto(info))

    def Send(self, request: ipc_pb2.SendRequest,  # noqa: N802
             context: grpc.ServicerContext) -> ipc_pb2.SendResponse:
        seq = call(context, lambda: self.mailboxes.send(
            request.name, request.payload, request.sender, pid=request.pid,
            caller=caller_of(request)))
        return ipc_pb2.SendResponse(sequence=seq)

    def Receive(self, request: ipc_pb2.ReceiveRequest,  # noqa: N802
                context: grpc.ServicerContext) -> ipc_pb2.ReceiveResponse:
        timeout = request.timeout_ms / 1000
        remaining = context.time_remaining()
        if remaining is not None:  # never wait past the caller's own deadline
            timeout = min(timeout, max(remaining, 0.0))
        if timeout > 0:  # a cancelled or shut-down RPC wakes its waiter instead of holding a thread
            context.add_callback(lambda: self.mailboxes.wake(request.name))
        msg = call(context, lambda: self.mailboxes.receive(
            request.name, timeout, context.is_active, caller=caller_of(request)))
        return ipc_pb2.ReceiveResponse(payload=msg.payload, sender=msg.sender,
                                       sequence=msg.sequence, pid=msg.pid)

    def ListMailboxes(self, request: ipc_pb2.ListMailboxesRequest,  # noqa: N802
                      context: grpc.ServicerContext) -> ipc_pb2.ListMailboxesResponse:
        boxes = self.mailboxes.list_mailboxes(caller_of(request))
        return ipc_pb2.ListMailboxesResponse(mailboxes=[to_proto(m) for m in boxes])

    def RemoveMailbox(self, request: ipc_pb2.RemoveMailboxRequest,  # noqa: N802
                      context: grpc.ServicerContext) -> ipc_pb2.RemoveMailboxResponse:
        dropped = call(context, lambda: self.mailboxes.remove(request.name,
                                                              caller_of(request)))
        return ipc_pb2.RemoveMailboxResponse(discarded=dropped)

    def StatMailbox(self, request: ipc_pb2.StatMailboxRequest,  # noqa: N802
                    context: grpc.ServicerContext) -> ipc_pb2.Mailbox:
        return to_proto(call(context, lambda: self.mailboxes.stat(request.name,
                                                                  caller_of(request))))


def register(server: grpc.Server, mailboxes: Mailboxes) -> list[str]:
    ipc_pb2_grpc.add_IpcServicer_to_server(IpcServicer(mailboxes), server)
    return [SERVICE_NAME]
