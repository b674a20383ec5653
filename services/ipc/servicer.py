"""llmasos.v1.Ipc over gRPC: translates messages to and from Mailboxes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import grpc

from llmasos.proto import ipc_pb2, ipc_pb2_grpc
from llmasos.services.ipc.mailboxes import (
    BadRequest,
    IpcError,
    Mailboxes,
    MailboxExists,
    MailboxFull,
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
}

T = TypeVar("T")


def call(context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
    """Run fn; turn a typed IPC error into its status code."""
    try:
        return fn()
    except IpcError as e:
        context.abort(CODES[type(e)], str(e))
        raise  # unreachable: abort raises


class IpcServicer(ipc_pb2_grpc.IpcServicer):
    def __init__(self, mailboxes: Mailboxes) -> None:
        self.mailboxes = mailboxes

    def CreateMailbox(self, request: ipc_pb2.CreateMailboxRequest,  # noqa: N802
                      context: grpc.ServicerContext) -> ipc_pb2.CreateMailboxResponse:
        call(context, lambda: self.mailboxes.create(request.name, request.owner,
                                                    request.capacity))
        return ipc_pb2.CreateMailboxResponse()

    def Send(self, request: ipc_pb2.SendRequest,  # noqa: N802
             context: grpc.ServicerContext) -> ipc_pb2.SendResponse:
        seq = call(context, lambda: self.mailboxes.send(request.name, request.payload,
                                                        request.sender))
        return ipc_pb2.SendResponse(sequence=seq)

    def Receive(self, request: ipc_pb2.ReceiveRequest,  # noqa: N802
                context: grpc.ServicerContext) -> ipc_pb2.ReceiveResponse:
        timeout = request.timeout_ms / 1000
        remaining = context.time_remaining()
        if remaining is not None:  # never wait past the caller's own deadline
            timeout = min(timeout, max(remaining, 0.0))
        if timeout > 0:  # a cancelled or shut-down RPC wakes its waiter instead of holding a thread
            context.add_callback(lambda: self.mailboxes.wake(request.name))
        msg = call(context, lambda: self.mailboxes.receive(request.name, timeout,
                                                           context.is_active))
        return ipc_pb2.ReceiveResponse(payload=msg.payload, sender=msg.sender,
                                       sequence=msg.sequence)

    def ListMailboxes(self, request: ipc_pb2.ListMailboxesRequest,  # noqa: N802
                      context: grpc.ServicerContext) -> ipc_pb2.ListMailboxesResponse:
        return ipc_pb2.ListMailboxesResponse(mailboxes=[
            ipc_pb2.Mailbox(name=m.name, owner=m.owner, depth=m.depth, capacity=m.capacity)
            for m in self.mailboxes.list_mailboxes()])


def register(server: grpc.Server, mailboxes: Mailboxes) -> list[str]:
    ipc_pb2_grpc.add_IpcServicer_to_server(IpcServicer(mailboxes), server)
    return [SERVICE_NAME]
