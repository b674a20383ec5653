"""The Kernel gRPC server, built from the syscall table: each entry becomes a method handler
that checks the capability, validates the arguments, dispatches to kernel/handlers.py and logs
the call (uid, syscall, pid, status code, latency). Privileged calls, calls on another user's
job and every refusal also go to the audit log. Off loopback the server speaks TLS only."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc
import structlog
from google.protobuf import message_factory
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llmasos.kernel import handlers
from llmasos.kernel.audit import AuditLog, scalar_args
from llmasos.kernel.auth import Authenticator, AuthInterceptor, current_identity
from llmasos.kernel.health import watch as health_watch
from llmasos.kernel.kernel import Kernel
from llmasos.kernel.nodes import NodeHeadServicer
from llmasos.proto import kernel_pb2, node_pb2_grpc
from llmasos.syscalls import SYSCALLS, Syscall, SyscallError

log = structlog.get_logger()
SERVICE = "llmasos.v1.Kernel"
METHODS = kernel_pb2.DESCRIPTOR.services_by_name["Kernel"].methods_by_name
REFUSALS = ("PERMISSION_DENIED", "UNAUTHENTICATED")   # always audited


def check(k: Kernel, call: Syscall, request: Any) -> Any:
    """Capability, arguments, services: everything that must hold before state changes."""
    ident = capable(call)
    call.check(request)
    services_up(k, call)
    return ident


def allowed(k: Kernel, call: Syscall) -> Any:
    """check() for a stream of requests, whose handler checks each one itself."""
    ident = capable(call)
    services_up(k, call)
    return ident


def capable(call: Syscall) -> Any:
    ident = current_identity.get()
    if call.cap not in ident.caps and not ident.root:
        raise SyscallError("PERMISSION_DENIED", f"{call.name} needs the {call.cap!r} "
                           f"capability, which {ident.user} lacks")
    return ident


def services_up(k: Kernel, call: Syscall) -> None:
    failed = k.supervisor.failed(call.needs)
    if failed:
        raise SyscallError("UNAVAILABLE", f"{call.name} needs the {', '.join(failed)} service, "
                           "which has FAILED (restart budget spent); see `llm-ps --services`")


def _log(call: Syscall, request: Any, code: str, start: float) -> None:
    ident = current_identity.get(None)
    log.info("syscall", nr=call.number, call=call.name, uid=ident.uid if ident else None,
             pid=getattr(request, "pid", None) or None, code=code,
             ms=round((time.perf_counter() - start) * 1000, 3))


def on_others_job(k: Kernel, request: Any) -> bool:
    """Does the call name a job that belongs to someone other than the caller?"""
    pid, ident = getattr(request, "pid", 0), current_identity.get(None)
    proc = k.table.get(pid) if pid else None
    return proc is not None and ident is not None and proc.user != ident.user


def _audit(k: Kernel, call: Syscall, request: Any, code: str, message: str,
           context: grpc.ServicerContext) -> None:
    ident = current_identity.get(None)
    k.audit.record(call=call.name, code=code, message=message,
                   user=ident.user if ident else "", uid=ident.uid if ident else -1,
                   args=scalar_args(request), peer=context.peer())


@contextmanager
def syscall(k: Kernel, call: Syscall, request: Any,
            context: grpc.ServicerContext) -> Iterator[None]:
    """Turn a SyscallError into its gRPC status; log every call with its outcome and audit the
    privileged ones, those on another user's job and every refusal."""
    start, code, message = time.perf_counter(), "OK", ""
    audited = call.audit or on_others_job(k, request)
    try:
        yield
    except GeneratorExit:   # a stream whose caller went away: closed at a message it sent
        code, message = "CANCELLED", "the caller went away"
        raise
    except SyscallError as e:
        code, message = e.code, e.message
        context.abort(getattr(grpc.StatusCode, e.code), e.message)
    except Exception as e:   # a bug, not the caller's move: INTERNAL with a trace in the log
        if context.code() is not None:   # context.abort() raises too; its status stands
            raise
        code = "INTERNAL"
        log.exception("syscall_crashed", call=call.name)
        context.abort(grpc.StatusCode.INTERNAL, f"{call.name} failed inside llmosd "
                      f"({type(e).__name__}: {e}); this is a bug, see llmosd's log")
    finally:
        _log(call, request, code, start)
        if audited or code in REFUSALS:
            _audit(k, call, request, code, message, context)


def unary(k: Kernel, call: Syscall) -> Callable:
    handler = getattr(handlers, call.handler)

    def behavior(request: Any, context: grpc.ServicerContext) -> Any:
        with syscall(k, call, request, context):
            return handler(k, check(k, call, request), request, context)
    return behavior


def streaming(k: Kernel, call: Syscall) -> Callable:
    handler = getattr(handlers, call.handler)

    def behavior(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        with syscall(k, call, request, context):
            yield from handler(k, check(k, call, request), request, context)
    return behavior


def bidi(k: Kernel, call: Syscall) -> Callable:
    """Requests and replies both stream (Poll): the handler checks each request itself."""
    handler = getattr(handlers, call.handler)
    nothing = message_factory.GetMessageClass(METHODS[call.name].input_type)()

    def behavior(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        with syscall(k, call, nothing, context):
            yield from handler(k, allowed(k, call), requests, context)
    return behavior


def method_handler(k: Kernel, call: Syscall) -> grpc.RpcMethodHandler:
    desc = METHODS[call.name]
    req_cls = message_factory.GetMessageClass(desc.input_type)
    rep_cls = message_factory.GetMessageClass(desc.output_type)
    if call.bidi:
        make, body = grpc.stream_stream_rpc_method_handler, bidi(k, call)
    elif call.stream:
        make, body = grpc.unary_stream_rpc_method_handler, streaming(k, call)
    else:
        make, body = grpc.unary_unary_rpc_method_handler, unary(k, call)
    return make(body, request_deserializer=req_cls.FromString,
                response_serializer=rep_cls.SerializeToString)


# A Read or Wait holds a worker thread for the life of its job, so the pool must cover every
# stream clients keep open at once; past it, calls answer RESOURCE_EXHAUSTED instead of queueing.
WORKERS = 512


def is_loopback(listen: str) -> bool:
    """Is this listen address reachable only from this host (loopback or a Unix socket)?"""
    if listen.startswith("unix:"):
        return True
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False   # a host name, "", "0.0.0.0" and the like reach the network


def credentials(cert: str, key: str) -> grpc.ServerCredentials:
    try:
        with open(cert, "rb") as c, open(key, "rb") as kf:
            return grpc.ssl_server_credentials([(kf.read(), c.read())])
    except OSError as e:
        raise SystemExit(f"llmosd: cannot read the TLS certificate or key: {e}") from None


def bind(server: grpc.Server, listen: str, cert: str = "", key: str = "",
         insecure: bool = False) -> int:
    """Listen on `listen`: TLS when given a certificate; plain text only on loopback unless
    `insecure` says the network is trusted."""
    if bool(cert) != bool(key):
        raise SystemExit("llmosd: TLS needs both --tls-cert and --tls-key")
    if not cert and not insecure and not is_loopback(listen):
        raise SystemExit(f"llmosd: refusing to serve on {listen} without TLS: tokens would "
                         "cross the network in clear text. Give --tls-cert FILE --tls-key FILE, "
                         "or --insecure if the network is trusted")
    try:
        port = server.add_secure_port(listen, credentials(cert, key)) if cert \
            else server.add_insecure_port(listen)
    except RuntimeError:   # grpc reports a failed bind this way
        port = 0
    if port == 0:
        raise SystemExit(f"llmosd: cannot listen on {listen}; is another llmosd running? "
                         "Choose another address with --listen or LLMASOS_ADDR")
    return port


def build(k: Kernel, listen: str, workers: int = WORKERS) -> tuple[grpc.Server, int]:
    auth = Authenticator(lambda: k.supervisor.channel("security"))
    k.auth = auth                                          # SetQuota drops stale identities
    k.audit = AuditLog(f"{k.cfg.home}/audit.log")          # handlers.sys_audit reads it
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         maximum_concurrent_rpcs=workers,
                         interceptors=[AuthInterceptor(auth, k.audit)],
                         options=[("grpc.so_reuseport", 0)])   # a second llmosd must fail
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        SERVICE, {c.name: method_handler(k, c) for c in SYSCALLS})])
    node_pb2_grpc.add_NodeHeadServicer_to_server(NodeHeadServicer(k.nodes), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (SERVICE, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_watch(k, health_servicer)
    reflection.enable_server_reflection(
        [SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    cfg = k.cfg
    return server, bind(server, listen, cfg.tls_cert, cfg.tls_key, cfg.insecure)
