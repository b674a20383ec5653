"""kernel/server.py's syscall(): a SyscallError keeps its code, an abort keeps its status, and
any other exception (a bug) is INTERNAL, never UNAVAILABLE "retry shortly" or UNKNOWN."""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import AbstractContextManager

import grpc
import pytest

from llmasos.kernel import server
from llmasos.proto import kernel_pb2
from llmasos.syscalls import BY_NAME, SyscallError

CALL = BY_NAME["WhoAmI"]
_kernel: list = []


def guarded(request: object, context: grpc.ServicerContext) -> AbstractContextManager:
    """server.syscall() around a body, given a real (unstarted) Kernel where it takes one."""
    if len(inspect.signature(server.syscall).parameters) == 3:
        return server.syscall(CALL, request, context)
    if not _kernel:
        from llmasos.kernel.config import Config
        from llmasos.kernel.kernel import Kernel
        _kernel.append(Kernel(Config(home=tempfile.mkdtemp(prefix="llmasos-internal-"))))
    return server.syscall(_kernel[0], CALL, request, context)


def raising(exc: Exception) -> Callable:
    def behavior(request: object, context: grpc.ServicerContext) -> object:
        with guarded(request, context):
            raise exc
    return behavior


def aborting(request: object, context: grpc.ServicerContext) -> object:
    with guarded(request, context):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")


@pytest.fixture(scope="module")
def channel() -> Iterator[grpc.Channel]:
    methods = {"Bug": raising(ValueError("boom")),
               "Known": raising(SyscallError("NOT_FOUND", "no process 7")),
               "Abort": aborting}
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    srv.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", {
        name: grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=kernel_pb2.WhoAmIRequest.FromString,
            response_serializer=kernel_pb2.WhoAmIResponse.SerializeToString)
        for name, fn in methods.items()})])
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as chan:
        yield chan
    srv.stop(0)


def status(channel: grpc.Channel, method: str) -> grpc.RpcError:
    call = channel.unary_unary(f"/t.T/{method}",
                               request_serializer=kernel_pb2.WhoAmIRequest.SerializeToString,
                               response_deserializer=kernel_pb2.WhoAmIResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        call(kernel_pb2.WhoAmIRequest(), timeout=10)
    return err.value


def test_a_bug_is_internal_naming_it(channel: grpc.Channel) -> None:
    err = status(channel, "Bug")
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "ValueError: boom" in err.details()


def test_a_syscall_error_keeps_its_code(channel: grpc.Channel) -> None:
    err = status(channel, "Known")
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "no process 7"


def test_an_abort_keeps_its_status(channel: grpc.Channel) -> None:
    assert status(channel, "Abort").code() == grpc.StatusCode.PERMISSION_DENIED
