"""The routes: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, and /metrics.

Each request is syscalls made with the caller's API key (their LLMasOS token): Spawn, then its
jobs followed on the caller's one Poll stream (streamed into server-sent events, or gathered),
then Wait to reap; a client that disconnects has its jobs killed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from llmasos import connect
from llmasos.http import params
from llmasos.http.errors import APIError, from_rpc, no_key
from llmasos.http.jobs import Disconnected, Jobs, failed
from llmasos.http.poller import Pollers
from llmasos.http.shapes import Choice, Shape, sse
from llmasos.proto import kernel_pb2, kernel_pb2_grpc

MAX_NAME = 64
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


class Gateway:
    """The daemon's state: its channel to the kernel, and each caller's Poll stream while the
    caller has jobs streaming (no other user state)."""

    def __init__(self, kernel: str) -> None:
        self.kernel = kernel
        self.own_token = connect.find_token()   # for an unauthenticated /metrics scrape
        self.channel: grpc.aio.Channel | None = None
        self.stub: kernel_pb2_grpc.KernelStub | None = None
        self.pollers = Pollers()

    async def start(self) -> None:
        self.channel = connect.aio_channel(self.kernel)
        self.stub = kernel_pb2_grpc.KernelStub(self.channel)

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()


def bearer(request: Request) -> tuple[tuple[str, str], ...]:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise no_key()
    return connect.metadata(token.strip())


def job_name(request: Request) -> str:
    """ps shows the HTTP client: its User-Agent, else its address."""
    who = request.headers.get("user-agent") or (
        f"{request.client.host}:{request.client.port}" if request.client else "?")
    return f"http:{who}".encode()[:MAX_NAME].decode(errors="ignore")


async def body_of(request: Request) -> object:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON", param="body") from None


def disconnected(request: Request) -> Callable[[], Awaitable[None]]:
    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    return wait


async def complete(request: Request, chat: bool) -> Response:
    gw: Gateway = request.app.state.gateway
    md = bearer(request)
    body = await body_of(request)
    parse = params.chat if chat else params.completion
    parsed = parse(body, job_name(request))
    jobs = Jobs(gw.stub, md, gw.pollers.of(gw.stub, md))
    await jobs.spawn(parsed)
    shape = Shape(chat, parsed.spawn.model, f"{'chatcmpl' if chat else 'cmpl'}-{jobs.pids[0]}",
                  parsed.logprobs)
    if parsed.stream:
        return JobStream(jobs, stream(jobs, shape, parsed.include_usage, request))
    choices = [Choice() for _ in jobs.pids]
    try:
        async for piece in jobs.pieces(disconnected(request)):
            choices[piece.index].add(piece)
        usage, error = await jobs.reap()
    except Disconnected:   # nobody to answer; the jobs are being killed
        return Response(status_code=499)
    finally:
        jobs.kill()   # whatever was not reaped (a no-op after a normal end)
    if error:
        raise failed(error)
    return JSONResponse(shape.reply(choices, usage))


class JobStream(StreamingResponse):
    """Server-sent events whose jobs die with the response, however it ends (even when the
    client leaves before the first event)."""

    def __init__(self, jobs: Jobs, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self.jobs = jobs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.jobs.kill()


async def stream(jobs: Jobs, shape: Shape, include_usage: bool,
                 request: Request) -> AsyncIterator[str]:
    offsets = [0] * len(jobs.pids)
    try:
        if shape.chat:
            for i in range(len(jobs.pids)):
                yield sse(shape.chunk([shape.first(i)], include_usage))
        async for p in jobs.pieces(disconnected(request)):
            if not p.text and not p.finish and not p.token_ids:
                continue
            yield sse(shape.chunk([shape.delta(p, offsets[p.index])], include_usage))
            offsets[p.index] += len(p.text)
        usage, error = await jobs.reap()
        if error:
            raise failed(error)
        if include_usage:
            yield sse(shape.usage_chunk(usage))
    except APIError as e:
        yield sse(e.body())
    except Disconnected:   # nobody left to write to; the jobs are being killed
        return
    yield sse("[DONE]")


async def chat_completions(request: Request) -> Response:
    return await complete(request, chat=True)


async def completions(request: Request) -> Response:
    return await complete(request, chat=False)


async def models(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    reply = await call(gw.stub.Models(kernel_pb2.ModelsRequest(), metadata=bearer(request),
                                      timeout=30))
    data = [model_card(m.name) for m in reply.models]
    want = request.path_params.get("model")
    if want is None:
        return JSONResponse({"object": "list", "data": data})
    for card in data:
        if card["id"] == want:
            return JSONResponse(card)
    raise APIError(404, f"no model {want!r}; deployed: "
                   f"{', '.join(c['id'] for c in data) or 'none'}", param="model",
                   code="model_not_found")


def model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "llmasos"}


async def metrics(request: Request) -> Response:
    """The kernel's counters (Metrics syscall); the caller's key, else the daemon's own."""
    gw: Gateway = request.app.state.gateway
    try:
        md = bearer(request)
    except APIError:
        if not gw.own_token:
            raise
        md = connect.metadata(gw.own_token)
    reply = await call(gw.stub.Metrics(kernel_pb2.MetricsRequest(), metadata=md, timeout=30))
    return Response(reply.text, media_type=PROMETHEUS)


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


async def call(pending: Awaitable) -> object:
    try:
        return await pending
    except grpc.RpcError as err:
        raise from_rpc(err) from None


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response()


async def on_not_found(request: Request, exc: Exception) -> Response:
    return APIError(404, f"no route {request.method} {request.url.path}; see /v1/models, "
                    "/v1/chat/completions, /v1/completions, /metrics",
                    code="unknown_url").response()


def build(kernel: str) -> Starlette:
    gateway = Gateway(kernel)
    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", models, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]

    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        yield
        await gateway.stop()

    app = Starlette(routes=routes, lifespan=asynccontextmanager(lifespan),
                    exception_handlers={APIError: on_api_error, 404: on_not_found})
    app.state.gateway = gateway
    return app

