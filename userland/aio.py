"""AsyncLLMClient: LLMClient's twin on grpc.aio, for asyncio programs.

    async with AsyncLLMClient(model_name="smollm2-135m") as client:
        print(await client.generate_text("The quick brown fox"))
        async for piece in client.stream_text("Once upon a time"):
            print(piece, end="")
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc

from llmasos import connect, requests, tasks
from llmasos.client import DEFAULT_JOB_TIMEOUT, DEFAULT_TIMEOUT, NO_MODEL, with_deployed
from llmasos.errors import LLMError, ModelNotFound, NotFound, from_rpc
from llmasos.mailbox import AsyncMailbox
from llmasos.names import signal_number
from llmasos.process import Completion
from llmasos.proto import common_pb2, kernel_pb2, kernel_pb2_grpc


class AsyncProcess:
    """A job spawned through AsyncLLMClient; cancelling a wait or read on it kills it."""

    def __init__(self, client: AsyncLLMClient, pid: int) -> None:
        self.client = client
        self.pid = pid

    def __repr__(self) -> str:
        return f"AsyncProcess(pid={self.pid})"

    async def wait(self, timeout: float | None = None) -> Completion:
        async with self.client.killing_on_cancel(self.pid):
            return await self.client.wait(self.pid, timeout)

    async def read(self) -> AsyncIterator[str]:
        async with self.client.killing_on_cancel(self.pid):
            async for chunk in self.client.read(self.pid):
                if chunk.text:
                    yield chunk.text

    async def kill(self, signal: str | int = "TERM") -> int:
        return await self.client.kill(self.pid, signal)

    async def stat(self) -> kernel_pb2.ProcessInfo:
        return await self.client.stat(self.pid)

    async def nice(self, value: int) -> int:
        return await self.client.nice(self.pid, value)


class AsyncLLMClient:
    """See LLMClient; the same methods, awaitable. Ctrl-C under asyncio.run cancels the
    waiting task, which kills the job it waits on."""

    def __init__(self, model_name: str | None = None, address: str | None = None,
                 token: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 job_timeout: float = DEFAULT_JOB_TIMEOUT) -> None:
        self.address = connect.address(address)
        self.token = connect.find_token(token)
        self.timeout = timeout
        self.job_timeout = job_timeout
        self._model = model_name or os.environ.get("LLMASOS_MODEL") or None
        self._metadata = connect.metadata(self.token)
        self._channel = connect.aio_channel(self.address)
        self._stub = kernel_pb2_grpc.KernelStub(self._channel)

    async def __aenter__(self) -> AsyncLLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _error(self, err: grpc.RpcError) -> LLMError:
        return from_rpc(err, self.address, "" if self.token else connect.token_hint())

    async def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return await getattr(self._stub, method)(request, timeout=timeout or self.timeout,
                                                     metadata=self._metadata)
        except grpc.RpcError as err:
            raise self._error(err) from None

    @contextlib.asynccontextmanager
    async def killing_on_cancel(self, pid: int) -> AsyncIterator[None]:
        try:
            yield
        except (asyncio.CancelledError, KeyboardInterrupt, GeneratorExit):
            with contextlib.suppress(LLMError, asyncio.CancelledError):
                await asyncio.shield(self.kill(pid, "KILL"))
            raise

    async def model(self) -> str:
        if not self._model:
            names = [m.name for m in await self.models()]
            if not names:
                raise NotFound(NO_MODEL)
            self._model = names[0]
        return self._model

    async def spawn(self, prompt: str | None = None, *,
                    messages: Iterable[requests.Message] | None = None, model: str | None = None,
                    max_tokens: int | None = None, temperature: float | None = None,
                    top_p: float | None = None, top_k: int | None = None,
                    stop: str | list[str] | None = None, seed: int | None = None,
                    priority: int = 0, n: int = 1, name: str = "",
                    **sampling: float) -> AsyncProcess:
        params = requests.sampling(max_tokens, temperature, top_p, top_k, stop, seed, **sampling)
        req = requests.spawn(model or await self.model(), prompt, messages, params, priority, n,
                             name)
        try:
            resp = await self._call("Spawn", req)
        except NotFound as err:
            deployed = [m.name for m in await self.models()]
            if req.model in deployed:
                raise
            raise ModelNotFound(with_deployed(err.message, deployed), deployed) from None
        return AsyncProcess(self, resp.pid)

    async def generate_text(self, prompt: str, max_tokens: int | None = None,
                            temperature: float | None = None, top_p: float | None = None,
                            top_k: int | None = None, stop: str | list[str] | None = None,
                            seed: int | None = None, priority: int = 0, **kw: Any) -> str:
        proc = await self.spawn(prompt, max_tokens=max_tokens, temperature=temperature,
                                top_p=top_p, top_k=top_k, stop=stop, seed=seed,
                                priority=priority, **kw)
        return (await proc.wait()).check()

    async def stream_text(self, prompt: str | None = None, **kw: Any) -> AsyncIterator[str]:
        proc = await self.spawn(prompt, **kw)
        async for piece in proc.read():
            yield piece
        (await proc.wait()).check()

    async def chat(self, messages: Iterable[requests.Message], **kw: Any) -> str:
        return (await (await self.spawn(messages=messages, **kw)).wait()).check()

    async def translate(self, text: str, target_language: str = "English", **kw: Any) -> str:
        return await self.chat(tasks.messages("translate", text=text,
                                              target_language=target_language), **kw)

    async def summarize(self, text: str, **kw: Any) -> str:
        return await self.chat(tasks.messages("summarize", text=text), **kw)

    async def answer(self, question: str, context: str | None = None, **kw: Any) -> str:
        if context:
            return await self.chat(tasks.messages("answer_in_context", question=question,
                                                  context=context), **kw)
        return await self.chat(tasks.messages("answer", question=question), **kw)

    async def generate_code(self, description: str, language: str = "Python", **kw: Any) -> str:
        return await self.chat(tasks.messages("generate_code", description=description,
                                              language=language), **kw)

    async def wait(self, pid: int, timeout: float | None = None) -> Completion:
        resp = await self._call("Wait", kernel_pb2.WaitRequest(pid=pid),
                                timeout or self.job_timeout)
        return Completion.from_wait(resp)

    async def read(self, pid: int,
                   timeout: float | None = None) -> AsyncIterator[kernel_pb2.ReadChunk]:
        call = self._stub.Read(kernel_pb2.ReadRequest(pid=pid),
                               timeout=timeout or self.job_timeout, metadata=self._metadata)
        try:
            async for chunk in call:
                yield chunk
        except grpc.RpcError as err:
            raise self._error(err) from None
        finally:
            call.cancel()

    async def kill(self, pid: int, signal: str | int = "TERM") -> int:
        req = kernel_pb2.KillRequest(pid=pid, signal=signal_number(signal))
        return (await self._call("Kill", req)).state

    async def nice(self, pid: int, value: int) -> int:
        return (await self._call("Nice", kernel_pb2.NiceRequest(pid=pid, nice=value))).nice

    async def stat(self, pid: int) -> kernel_pb2.ProcessInfo:
        return await self._call("Stat", kernel_pb2.StatRequest(pid=pid))

    async def ps(self, all: bool = False, user: str = "") -> list[kernel_pb2.ProcessInfo]:  # noqa: A002
        return list((await self.ps_full(all, user)).processes)

    async def ps_full(self, all: bool = False, user: str = "") -> kernel_pb2.PsResponse:  # noqa: A002
        return await self._call("Ps", kernel_pb2.PsRequest(all=all, user=user))

    async def models(self) -> list[common_pb2.ModelInfo]:
        return list((await self._call("Models", kernel_pb2.ModelsRequest())).models)

    async def deploy(self, path: str, name: str, dtype: str = "",
                     timeout: float | None = None, tp: int = 0, pp: int = 0
                     ) -> common_pb2.ModelInfo:
        req = kernel_pb2.DeployRequest(path=os.path.abspath(path), name=name, dtype=dtype,
                                       tp=tp, pp=pp)
        return await self._call("Deploy", req, timeout or self.job_timeout)

    async def undeploy(self, name: str) -> None:
        await self._call("Undeploy", kernel_pb2.UndeployRequest(name=name))

    async def whoami(self) -> kernel_pb2.WhoAmIResponse:
        return await self._call("WhoAmI", kernel_pb2.WhoAmIRequest())

    async def services(self) -> list[kernel_pb2.ServiceInfo]:
        return list((await self._call("Services", kernel_pb2.ServicesRequest())).services)

    def mailbox(self, name: str = "") -> AsyncMailbox:
        """A named mailbox (see llmasos/mailbox.py), awaitable."""
        return AsyncMailbox(self._stub, self._metadata, name, self.timeout, self.address)
