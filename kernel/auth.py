"""Authentication: every Kernel call passes this interceptor. The bearer token in the call's
metadata is resolved by the security service; answers are cached briefly so the hot path costs
no extra round trip (SetQuota drops a user's entries at once; a change made by the CLI shows
within CACHE_TTL). Health and reflection stay open so generic tools can probe the kernel.
Every refused authentication is written to the audit log."""

from __future__ import annotations

import asyncio
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

    def cached(self, token: str) -> Identity | None:
        """The identity a recent resolve() found for the token, without a round trip."""
        hit = self.cache.get(token)
        return hit[1] if hit and time.monotonic() - hit[0] < self.ttl else None

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


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each Kernel handler so it runs with the caller's Identity in current_identity
    (the handler's task; a blocking handler's thread gets a copy: kernel/sync_calls.py)."""

    def __init__(self, auth: Authenticator, audit: AuditLog | None = None) -> None:
        self.auth = auth
        self.audit = audit

    async def intercept_service(self, continuation: Callable,  # noqa: ANN201
                                details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        token, call = bearer(details.invocation_metadata), details.method.rsplit("/", 1)[-1]
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request, context):  # noqa: ANN001, ANN202
                await self._authenticate(token, call, context)
                return await inner(request, context)
            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def stream(request, context):  # noqa: ANN001, ANN202
                await self._authenticate(token, call, context)
                async for message in inner_stream(request, context):
                    yield message
            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler

    async def _authenticate(self, token: str, call: str, context: grpc.aio.ServicerContext
                            ) -> None:
        if not token:
            await self._refuse(context, call, grpc.StatusCode.UNAUTHENTICATED,
                               "no token: send metadata 'authorization: Bearer <token>'")
        ident = self.auth.cached(token)
        if ident is None:   # a round trip to the security service: not on the loop
            try:
                ident = await asyncio.get_running_loop().run_in_executor(
                    None, self.auth.resolve, token)
            except AuthError as e:
                await self._refuse(context, call, e.code, e.message)
        current_identity.set(ident)

    async def _refuse(self, context: grpc.aio.ServicerContext, call: str,
                      code: grpc.StatusCode, message: str) -> None:
        if self.audit is not None and code == grpc.StatusCode.UNAUTHENTICATED:
            self.audit.record(call=call, code=code.name, message=message, peer=context.peer())
        await context.abort(code, message)
