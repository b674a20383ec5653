"""AsyncLLMClient: LLMClient's twin on grpc.aio, for asyncio programs. Both run the table of
calls in calls.py; this file differs from client.py only in awaiting the stub.

    async with AsyncLLMClient(model_name="smollm2-135m") as client:
        print(await client.generate_text("The quick brown fox"))
        async for piece in client.stream_text("Once upon a time"):
            print(piece, end="")
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc

from llmasos import calls, requests, tasks
from llmasos.calls import Call
from llmasos.client import DEFAULT_JOB_TIMEOUT, DEFAULT_TIMEOUT, NO_MODEL, ClientBase
from llmasos.errors import LLMError, NotFound
from llmasos.mailbox import AsyncMailbox
from llmasos.process import AsyncProcess, Completion
from llmasos.proto import common_pb2, kernel_pb2

__all__ = ["AsyncLLMClient", "AsyncProcess"]


class AsyncLLMClient(ClientBase):
    """See LLMClient; the same methods, awaitable. Ctrl-C under asyncio.run cancels the
    waiting task, which kills the job it waits on."""

    def __init__(self, model_name: str | None = None, address: str | None = None,
                 token: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 job_timeout: float = DEFAULT_JOB_TIMEOUT, retry_s: float | None = None) -> None:
        super().__init__(model_name, address, token, timeout, job_timeout, retry_s, aio=True)

    # -- plumbing -----------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncLLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, call: Call, *args: Any, timeout: float | None = None,
                    patient: bool = True) -> Any:
        options = self._options(call, timeout, patient)
        try:
            reply = await getattr(self._stub, call.name)(call.build(*args), **options)
        except grpc.RpcError as err:
            raise self._error(err, options["wait_for_ready"]) from None
        self._reached = True
        return call.read(reply)

    async def _stream(self, call: Call, *args: Any,
                      timeout: float | None = None) -> AsyncIterator[Any]:
        """A server-streaming call's replies; leaving the loop early cancels the call."""
        options = self._options(call, timeout)
        stream = getattr(self._stub, call.name)(call.build(*args), **options)
        try:
            async for reply in stream:
                self._reached = True
                yield reply
        except grpc.RpcError as err:
            raise self._error(err, options["wait_for_ready"]) from None
        finally:
            stream.cancel()

    @contextlib.asynccontextmanager
    async def killing_on_cancel(self, pid: int) -> AsyncIterator[None]:
        try:
            yield
        except (asyncio.CancelledError, KeyboardInterrupt, GeneratorExit):
            with contextlib.suppress(LLMError, asyncio.CancelledError):
                await asyncio.shield(self._call(calls.KILL, pid, "KILL", patient=False))
            raise

    async def model(self) -> str:
        if not self._model:
            names = [m.name for m in await self.models()]
            if not names:
                raise NotFound(NO_MODEL)
            self._model = names[0]
        return self._model

    async def _deployed(self) -> list[str] | None:
        try:
            return [m.name for m in await self.models()]
        except LLMError:
            return None

    # -- jobs ---------------------------------------------------------------------------------

    async def spawn(self, prompt: str | None = None, *,
                    messages: Iterable[requests.Message] | None = None, model: str | None = None,
                    max_tokens: int | None = None, temperature: float | None = None,
                    top_p: float | None = None, top_k: int | None = None,
                    stop: str | list[str] | None = None, seed: int | None = None,
                    priority: int = 0, n: int = 1, name: str = "", stdin_pid: int = 0,
                    shm: str = "", stdout_mailbox: str = "", ignore_sigpipe: bool = False,
                    **sampling: float) -> AsyncProcess:
        params = requests.sampling(max_tokens, temperature, top_p, top_k, stop, seed, **sampling)
        model = model or await self.model()
        try:
            ipc = {"stdin_pid": stdin_pid, "shm": shm, "stdout_mailbox": stdout_mailbox,
                   "ignore_sigpipe": ignore_sigpipe}
            pid = await self._call(calls.SPAWN, model, prompt, messages, params, priority, n,
                                   name, ipc)
        except NotFound as err:
            raise calls.model_not_found(err, model, await self._deployed()) from None
        return AsyncProcess(self, pid)

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
        return await self.chat(tasks.translate(text, target_language), **kw)

    async def summarize(self, text: str, **kw: Any) -> str:
        return await self.chat(tasks.summarize(text), **kw)

    async def answer(self, question: str, context: str | None = None, **kw: Any) -> str:
        return await self.chat(tasks.answer(question, context), **kw)

    async def generate_code(self, description: str, language: str = "Python", **kw: Any) -> str:
        return await self.chat(tasks.generate_code(description, language), **kw)

    # -- syscalls, one each (calls.py says how each is built and read) ------------------------

    async def wait(self, pid: int, timeout: float | None = None) -> Completion:
        return await self._call(calls.WAIT, pid, timeout=timeout)

    async def read(self, pid: int,
                   timeout: float | None = None) -> AsyncIterator[kernel_pb2.ReadChunk]:
        cursor = self._read_cursor(pid, timeout)
        while True:
            options = self._options(calls.READ, cursor.left())
            stream = self._stub.Read(cursor.request(), **options)
            try:
                async for chunk in stream:
                    self._reached = True
                    cursor.advance(chunk)
                    yield chunk
                return
            except grpc.RpcError as err:
                if not cursor.resumes(err):
                    raise self._error(err, options["wait_for_ready"]) from None
            finally:
                stream.cancel()

    async def poll(self, pids: Iterable[int], timeout: float | None = None
                   ) -> AsyncIterator[tuple[int, kernel_pb2.ReadChunk]]:
        """See LLMClient.poll."""
        cursor = self._poll_cursor(pids, timeout)
        while cursor.jobs:
            options = self._options(calls.POLL, cursor.left())
            stream = self._stub.Poll(iter([calls.POLL.build(cursor)]), **options)
            try:
                async for chunk in stream:
                    for got in self._polled(cursor, chunk):
                        yield got
                return
            except grpc.RpcError as err:
                if not cursor.resumes(err):
                    raise self._error(err, options["wait_for_ready"]) from None
            finally:
                stream.cancel()

    async def kill(self, pid: int, signal: str | int = "TERM") -> int:
        return await self._call(calls.KILL, pid, signal)

    async def nice(self, pid: int, value: int) -> int:
        return await self._call(calls.NICE, pid, value)

    async def stat(self, pid: int) -> kernel_pb2.ProcessInfo:
        return await self._call(calls.STAT, pid)

    async def ps(self, all: bool = False, user: str = "") -> list[kernel_pb2.ProcessInfo]:  # noqa: A002
        return list((await self.ps_full(all, user)).processes)

    async def ps_full(self, all: bool = False, user: str = "") -> kernel_pb2.PsResponse:  # noqa: A002
        return await self._call(calls.PS, all, user)

    async def models(self) -> list[common_pb2.ModelInfo]:
        return await self._call(calls.MODELS)

    async def formats(self) -> kernel_pb2.ModelsResponse:
        """The Models reply whole: quant_formats, default_quant and device with the models."""
        return await self._call(calls.FORMATS)

    async def deploy(self, path: str, name: str, dtype: str = "",
                     timeout: float | None = None, quant: str = "", tp: int = 0,
                     pp: int = 0, remote_url: str = "", api_key_env: str = "",
                     api_key_file: str = "", remote_model: str = "",
                     progress: calls.Progress | None = None,
                     replicas: int = 0, nodes: list[str] | None = None,
                     pp_steps: int = 0) -> common_pb2.ModelInfo:
        """Load a model (root only). quant: "" (the service default), "none", "int8"...;
        tp > 1: that many tensor-parallel ranks, pp > 1: that many pipeline stages, replicas >
        1: that many copies (data parallelism), placed by nodes; remote_url: a hosted model
        (see LLMClient.deploy). progress: called (or awaited, if it returns an awaitable) with each
        LoadProgress; cancelling the task deploys nothing."""
        args = (path, name, dtype, quant, tp, pp, remote_url, api_key_env, api_key_file,
                remote_model, replicas, nodes, pp_steps)
        if progress is None:
            return await self._call(calls.DEPLOY, *args, timeout=timeout)
        model = None
        async for event in self._stream(calls.DEPLOY_STREAM, *args, timeout=timeout):
            model = calls.deployed(event)   # the last event; the stream's status follows
            if model is None and inspect.isawaitable(heard := progress(event.progress)):
                await heard
        return calls.check_deployed(model, name)

    async def undeploy(self, name: str) -> None:
        await self._call(calls.UNDEPLOY, name)

    async def whoami(self) -> kernel_pb2.WhoAmIResponse:
        return await self._call(calls.WHOAMI)

    async def services(self) -> list[kernel_pb2.ServiceInfo]:
        return await self._call(calls.SERVICES)

    async def nodes(self) -> list[kernel_pb2.NodeInfo]:
        """The machines that joined llmosd (`llmosd node --join`), their devices and replicas."""
        return await self._call(calls.NODES)

    async def audit(self, limit: int = 50, user: str = "",
                    call: str = "") -> list[kernel_pb2.AuditEntry]:
        return await self._call(calls.AUDIT, limit, user, call)

    async def set_quota(self, user: str, max_jobs: int | None = None,
                        max_tokens: int | None = None, kv_share: float | None = None,
                        reset: bool = False) -> common_pb2.Quota:
        return await self._call(calls.SET_QUOTA, user, max_jobs, max_tokens, kv_share, reset)

    async def pipe(self, *steps: str | dict[str, Any], **common: Any) -> list[AsyncProcess]:
        """Jobs joined by pipes, `a | b | c`: each step is a prompt template ("{input}" marks
        where the previous step's output goes) or spawn()'s keyword arguments; `common`
        applies to every step. Returns the jobs; the last one's wait() gives the result."""
        procs: list[AsyncProcess] = []
        for step in steps:
            kw = {**common, **requests.pipe_step(step)}
            if procs:
                kw["stdin_pid"] = procs[-1].pid
            procs.append(await self.spawn(kw.pop("prompt", None), **kw))
        return procs

    async def shm_create(self, name: str, text: str, mode: str = "owner",
                   model: str | None = None) -> kernel_pb2.ShmInfo:
        """Compute `text` once as a named KV segment that jobs attach with shm=name."""
        model = model or await self.model()
        return await self._call(calls.SHM_CREATE, name, model, text, mode)

    async def shm_remove(self, name: str) -> kernel_pb2.ShmInfo:
        return await self._call(calls.SHM_REMOVE, name)

    async def shm_list(self) -> list[kernel_pb2.ShmInfo]:
        return await self._call(calls.SHM_LIST)

    async def alias(self, name: str, target: str = "") -> None:
        """Point the model name `name` at the deployed model `target` (root only); an empty
        target removes the alias."""
        await self._call(calls.ALIAS, name, target)

    async def aliases(self) -> dict[str, str]:
        return await self._call(calls.ALIASES)

    def mailbox(self, name: str = "") -> AsyncMailbox:
        """A named mailbox (see llmasos/mailbox.py), awaitable."""
        return AsyncMailbox(self._stub, self._metadata, name, self.timeout, self.address)
