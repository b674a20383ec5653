"""The kernel's side of mailboxes: who a caller is to the IPC service, its errors as syscall
errors, and Spawn's stdout_mailbox (checked at Spawn, delivered when the job ends).

The IPC service decides who may use a mailbox (policy); the kernel only says who is asking.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import structlog

from llmasos.kernel.auth import Identity
from llmasos.kernel.kernel import Kernel
from llmasos.kernel.proctable import Proc
from llmasos.proto import ipc_pb2
from llmasos.syscalls import SyscallError
from llmasos.syscalls import validate as v
from llmasos.syscalls.table import CAP_ADMIN

log = structlog.get_logger()

IPC_TIMEOUT = 10.0        # seconds for an IPC call that answers at once
RETRY_FOR = 60.0          # a delivery outlasts an IPC restart or a full mailbox this long
RETRY_START, RETRY_CAP = 0.2, 5.0
RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
# Errors that are the caller's to fix pass through with their code; the rest mean the service
# is not answering properly: UNAVAILABLE, retry.
PASSED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
          grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED,
          grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.DEADLINE_EXCEEDED,
          grpc.StatusCode.FAILED_PRECONDITION}

# Deliveries run here, never in the step loop or under the table lock.
_senders = ThreadPoolExecutor(max_workers=8, thread_name_prefix="stdout-mailbox")


def caller(ident: Identity) -> ipc_pb2.Caller:
    return ipc_pb2.Caller(user=ident.user, admin=ident.root or CAP_ADMIN in ident.caps)


def ipc_failed(e: grpc.RpcError, what: str) -> SyscallError:
    if e.code() in PASSED:
        return SyscallError(e.code().name, e.details() or what)
    return SyscallError("UNAVAILABLE", f"{what}: {e.details()}; retry shortly")


def check_stdout_mailbox(k: Kernel, ident: Identity, name: str) -> None:
    """At Spawn: the caller may send to `name` (INVALID_ARGUMENT / NOT_FOUND /
    PERMISSION_DENIED otherwise). An empty name asks for no delivery."""
    if not name:
        return
    v.mbox_name(name)
    try:
        k.ipc().StatMailbox(ipc_pb2.StatMailboxRequest(name=name, caller=caller(ident)),
                            timeout=IPC_TIMEOUT)
    except grpc.RpcError as e:
        raise ipc_failed(e, "checking stdout_mailbox failed") from None


def deliver_output(k: Kernel, proc: Proc) -> Future | None:
    """When a job with a stdout_mailbox ends: send its text there, as its owner, in the
    background. Only copies fields, so it may be called anywhere, the table lock held or not.
    Returns the delivery's Future (its result: the message's sequence, or 0 if it failed)."""
    name = getattr(proc, "stdout_mailbox", "")
    if not name:
        return None
    req = ipc_pb2.SendRequest(name=name, payload=proc.text.encode(), sender=proc.user,
                              pid=proc.pid, caller=ipc_pb2.Caller(user=proc.user,
                                                                  admin=proc.uid == 0))
    return _senders.submit(_send, k, req)


def _send(k: Kernel, req: ipc_pb2.SendRequest) -> int:
    """Send, retrying while the service restarts or the mailbox is full; log what is lost."""
    deadline, pause = time.monotonic() + RETRY_FOR, RETRY_START
    while True:
        try:
            return k.ipc().Send(req, timeout=IPC_TIMEOUT).sequence
        except (grpc.RpcError, SyscallError) as e:   # SyscallError: ipc not running right now
            code: Any = e.code() if isinstance(e, grpc.RpcError) else grpc.StatusCode.UNAVAILABLE
            why = e.details() if isinstance(e, grpc.RpcError) else e.message
            if code not in RETRIED or time.monotonic() + pause > deadline or \
                    k.draining.is_set():
                log.warning("stdout_mailbox_lost", pid=req.pid, mailbox=req.name,
                            code=code.name, error=why)
                return 0
        time.sleep(pause)
        pause = min(pause * 2, RETRY_CAP)
