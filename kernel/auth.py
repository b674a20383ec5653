"""Authentication: every Kernel call passes this interceptor. The bearer token in the call's
metadata is resolved by the security service; answers are cached briefly so the hot path costs
no extra round trip. Health and reflection stay open so generic tools can probe the kernel."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from llmasos.proto import security_pb2, security_pb2_grpc

CACHE_TTL = 30.0
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

current_identity: contextvars.ContextVar[Identity] = contextvars.ContextVar("identity")


@dataclass(frozen=True)
class Identity:
    user: str
    uid: int
    root: bool
    caps: frozenset[str]


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
            raise AuthError(grpc.StatusCode.UNAVAILABLE,
                            "the security service is not running; retry shortly")
        try:
            reply = security_pb2_grpc.SecurityStub(chan).Authenticate(
                security_pb2.AuthenticateRequest(token=token), timeout=5)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise AuthError(e.code(), "unknown token; check LLMASOS_TOKEN or "
                                "ask root for one with `llmosd adduser NAME`") from None
            raise AuthError(grpc.StatusCode.UNAVAILABLE,
                            f"the security service did not answer: {e.details()}") from None
        ident = Identity(reply.user, reply.uid, reply.root, frozenset(reply.capabilities))
        with self.lock:
            self.cache[token] = (now, ident)
        return ident


class AuthError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def bearer(metadata: tuple) -> str:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip()
    return ""


class AuthInterceptor(grpc.ServerInterceptor):
    """Wraps each Kernel handler so it runs with the caller's Identity in current_identity."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):  # noqa: ANN201
        handler = continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        token = bearer(details.invocation_metadata)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap(handler.unary_unary, token),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap(handler.unary_stream, token),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler

    def _wrap(self, behavior: Callable, token: str) -> Callable:
        def authenticated(request, context):  # noqa: ANN001, ANN202
            if not token:
                context.abort(grpc.StatusCode.UNAUTHENTICATED,
                              "no token: send metadata 'authorization: Bearer <token>'")
            try:
                ident = self.auth.resolve(token)
            except AuthError as e:
                context.abort(e.code, e.message)
            current_identity.set(ident)
            return behavior(request, context)
        return authenticated
