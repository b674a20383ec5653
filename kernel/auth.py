"""Authentication: every Kernel call passes this interceptor. The bearer token in the call's
metadata is resolved by the security service; answers are cached briefly so the hot path costs
no extra round trip (SetQuota drops a user's entries at once; a change made by the CLI shows
within CACHE_TTL). Health and reflection stay open so generic tools can probe the kernel.
Every refused authentication is written to the audit log."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from llmasos.kernel.audit import AuditLog
from llmasos.kernel.quota import UNLIMITED, Quota
from llmasos.proto import security_pb2, security_pb2_grpc

CACHE_TTL = 5.0
# NodeHead authenticates nodes itself, by join token and session secret (kernel/nodes.py)
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.", "/llmasos.v1.NodeHead/")

current_identity: contextvars.ContextVar[Identity] = contextvars.ContextVar("identity")


@dataclass(frozen=True)
class Identity:
    user: str
    uid: int
    root: bool
    caps: frozenset[str]
    quota: Quota = field(default=UNLIMITED)   # as the security service keeps it


class Authenticator:
    """token → Identity through the security service, with a short-lived cache."""

    def __init__(self, channel: Callable[[], grpc.Channel | None], ttl: float = CACHE_TTL) -> None:
        self.channel = channel
        self.ttl = ttl
        self.cache: dict[str, tuple[float, Identity]] = {}
        self.lock = threading.Lock()

    def resolve(self, token: str) -> Identity:
        """Raise grpc-coded errors via the returned tuple of (code, message) on failure."""
        now = time.monotonic()
        hit = self.cache.get(token)
        if hit and now - hit[0] < self.ttl:
            return hit[1]
        chan = self.channel()
        if chan is None:
            if hit:   # a restarting security service does not lock out known callers
                return hit[1]
            raise AuthError(grpc.StatusCode.UNAVAILABLE,
                            "the security service is not running; retry shortly")
        try:
            reply = security_pb2_grpc.SecurityStub(chan).Authenticate(
                security_pb2.AuthenticateRequest(token=token), timeout=5)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise AuthError(e.code(), "unknown token; check LLMASOS_TOKEN or "
                                "ask root for one with `llmosd adduser NAME`") from None
            if hit:
                return hit[1]
            raise AuthError(grpc.StatusCode.UNAVAILABLE,
                            f"the security service did not answer: {e.details()}") from None
        ident = Identity(reply.user, reply.uid, reply.root, frozenset(reply.capabilities),
                         Quota.from_pb(reply.quota))
        with self.lock:
            self.cache[token] = (now, ident)
        return ident

    def invalidate(self, user: str) -> None:
        """Forget the cached identities of one user (its quota or capabilities changed)."""
        with self.lock:
            for token in [t for t, (_, i) in self.cache.items() if i.user == user]:
                del self.cache[token]


class AuthError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def bearer(metadata: tuple) -> str:
    """The token of an `authorization: Bearer <token>` entry; the scheme is case-insensitive
    (RFC 6750 section 2.1, RFC 7235)."""
    for key, value in metadata or ():
        if key != "authorization" or not isinstance(value, str):
            continue
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return ""


HANDLER_KINDS = (   # a method handler's behavior attribute → how to build one around it
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


class AuthInterceptor(grpc.ServerInterceptor):
    """Wraps each Kernel handler so it runs with the caller's Identity in current_identity."""

    def __init__(self, auth: Authenticator, audit: AuditLog | None = None) -> None:
        self.auth = auth
        self.audit = audit

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):  # noqa: ANN201
        handler = continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        token = bearer(details.invocation_metadata)
        for kind, make in HANDLER_KINDS:   # every kind: none may run without an identity
            behavior = getattr(handler, kind)
            if behavior is not None:
                return make(self._wrap(behavior, token, details.method),
                            request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)
        return None   # no behavior at all: gRPC answers UNIMPLEMENTED

    def _wrap(self, behavior: Callable, token: str, method: str) -> Callable:
        call = method.rsplit("/", 1)[-1]

        def authenticated(request, context):  # noqa: ANN001, ANN202
            if not token:
                self._refuse(context, call, grpc.StatusCode.UNAUTHENTICATED,
                             "no token: send metadata 'authorization: Bearer <token>'")
            try:
                ident = self.auth.resolve(token)
            except AuthError as e:
                self._refuse(context, call, e.code, e.message)
            current_identity.set(ident)
            return behavior(request, context)
        return authenticated

    def _refuse(self, context: grpc.ServicerContext, call: str, code: grpc.StatusCode,
                message: str) -> None:
        if self.audit is not None and code == grpc.StatusCode.UNAUTHENTICATED:
            self.audit.record(call=call, code=code.name, message=message, peer=context.peer())
        context.abort(code, message)
