"""What every service process shares: logging, a gRPC server with health, the per-boot secret
check, reporting its address to the supervising kernel, and a clean exit on SIGTERM.

A service's __main__ calls `serve(name, register)`, where register(server) adds its servicers
and returns their full service names (for health).

Protection: a service answers only the kernel. It listens on a Unix socket in llmosd's 0700 run
directory, and every call (health included) must carry the secret the kernel handed it at start
through a pipe (`--secret-fd`), never on the command line or in the environment. Reflection is
off: only the public Kernel service describes itself.
"""

from __future__ import annotations

import argparse
import faulthandler
import hmac
import os
import signal
import stat
import threading
from collections.abc import Callable
from concurrent import futures
from typing import NoReturn

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llmasos.kernel import log
from llmasos.services.fast_exit import exit_now

SECRET_KEY = "x-llmasos-secret"   # the call metadata that carries the per-boot secret
STACKS_SIGNAL = signal.SIGUSR1     # dumps every thread's stack to stderr (the kernel's log)
Register = Callable[[grpc.Server], list[str]]


def configure_logging(service: str) -> structlog.stdlib.BoundLogger:
    """The kernel's logging set-up (kernel/log.py), at the level llmosd exported to us; every
    line of this process names the service and its pid."""
    log.configure(service=service, pid=os.getpid())
    return structlog.get_logger()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", default="127.0.0.1:0", help="address to serve on")
    ap.add_argument("--report-fd", type=int, default=-1, help="fd to write the bound address to")
    ap.add_argument("--secret-fd", type=int, default=-1,
                    help="fd to read the kernel's per-boot secret from (required)")
    ap.add_argument("--state-dir", default=os.environ.get("LLMASOS_HOME", ""))
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--option", action="append", default=[], help="service option KEY=VALUE")
    return ap.parse_args(argv)


def options(args: argparse.Namespace) -> dict[str, str]:
    """The --option KEY=VALUE pairs as a dict."""
    return dict(kv.split("=", 1) for kv in args.option)


def read_secret(fd: int) -> str:
    """The secret the kernel wrote on our pipe (then closed); refuse to serve without one."""
    if fd < 0:
        raise SystemExit("a service answers only its kernel: start it with --secret-fd FD, a pipe "
                         "carrying the per-boot secret (llmosd does this for you)")
    with os.fdopen(fd, "rb") as pipe:
        secret = pipe.read(4096).decode().strip()
    if len(secret) < 32:
        raise SystemExit("the secret on --secret-fd is missing or shorter than 32 characters")
    return secret


class SecretInterceptor(grpc.ServerInterceptor):
    """Refuse every call whose metadata lacks the per-boot secret: UNAUTHENTICATED. Unknown
    methods are refused the same way, so a stranger learns nothing about what we serve."""

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):  # noqa: ANN201
        for key, value in details.invocation_metadata or ():
            if key == SECRET_KEY and isinstance(value, str) and \
                    hmac.compare_digest(value.encode(), self.secret):
                return continuation(details)
        return refusal(continuation(details))


def refusal(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that answers UNAUTHENTICATED."""
    def deny(request_or_iterator: object, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED,
                      "internal service: only llmosd may call it; use the Kernel syscalls")
    if handler is None or not (handler.request_streaming or handler.response_streaming):
        return grpc.unary_unary_rpc_method_handler(deny)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    return grpc.unary_stream_rpc_method_handler(deny)


def remove_stale_socket(listen: str) -> None:
    """A previous incarnation killed with SIGKILL leaves its socket file behind."""
    if not listen.startswith("unix:"):
        return
    path = listen[len("unix:"):]
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def start_server(register: Register, listen: str, secret: str,
                 workers: int = 8) -> tuple[grpc.Server, str]:
    """Start a server with the service's servicers and health behind the secret check; return
    it and its bound address."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        interceptors=[SecretInterceptor(secret)],
        options=[("grpc.so_reuseport", 0),
                 ("grpc.max_receive_message_length", 64 << 20),
                 ("grpc.max_send_message_length", 64 << 20)],
    )
    names = register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in [*names, ""]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    remove_stale_socket(listen)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError:   # grpc reports a failed bind this way
        port = 0
    if port == 0:
        raise OSError(f"cannot bind {listen}; choose another --listen address")
    server.start()
    address = listen if listen.startswith("unix:") else f"{listen.rsplit(':', 1)[0]}:{port}"
    return server, address


def report_address(fd: int, address: str) -> None:
    """Tell the supervisor where we serve: one line on the pipe it gave us, then close it."""
    if fd < 0:
        print(address, flush=True)
        return
    with os.fdopen(fd, "w") as pipe:
        pipe.write(address + "\n")


def serve(name: str, register: Callable[[grpc.Server, argparse.Namespace], list[str]],
          argv: list[str] | None = None) -> NoReturn:
    """Run a service until SIGTERM/SIGINT; the standard main of every service process."""
    args = parse_args(argv)
    if args.listen.startswith("unix:"):   # the supervisor's name for us: inference.1, ...
        name = os.path.basename(args.listen).removesuffix(".sock")
    log = configure_logging(name)
    # a kernel about to kill us as hung asks first where we are stuck; C-level, so it answers
    # even while another thread holds the GIL
    faulthandler.register(STACKS_SIGNAL, all_threads=True)
    secret = read_secret(args.secret_fd)
    server, address = start_server(lambda s: register(s, args), args.listen, secret,
                                   args.workers)
    report_address(args.report_fd, address)
    log.info("service_started", address=address)
    ours = socket_inode(args.listen)
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    # The kernel is our parent: if it dies without stopping us, do not linger as an orphan.
    parent = os.getppid()
    while not stopped.wait(PARENT_POLL_S):
        if os.getppid() != parent:
            orphaned(log, parent, args.listen, ours)
    server.stop(grace=2).wait()
    log.info("service_stopped")
    exit_now(0)


PARENT_POLL_S = 0.2   # how soon a service notices its kernel died


def socket_inode(listen: str) -> int:
    """The inode of our Unix socket file (0: none)."""
    try:
        return os.lstat(listen[len("unix:"):]).st_ino if listen.startswith("unix:") else 0
    except OSError:
        return 0


def orphaned(log: structlog.stdlib.BoundLogger, parent: int, listen: str, ours: int) -> None:
    """The kernel died: nobody is left to answer, so exit now rather than finish a step (it would
    hold the cores the rebooting kernel's fresh services need). Our socket goes with us, unless
    a rebooted kernel's fresh service already has its own at that path."""
    log.warning("parent_gone", parent=parent)
    if ours and socket_inode(listen) == ours:
        remove_stale_socket(listen)
    os._exit(0)
