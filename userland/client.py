"""LLMClient: the Python face of the syscall interface (llmasos.v1.Kernel).

    from llmasos import LLMClient
    client = LLMClient(model_name="smollm2-135m")
    print(client.generate_text(prompt="The quick brown fox"))
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import grpc

from llmasos import calls, connect, requests, tasks
from llmasos.calls import Call
from llmasos.errors import DeadlineExceeded, LLMError, NotFound, from_rpc, refused
from llmasos.mailbox import Mailbox
from llmasos.process import Completion, Process
from llmasos.proto import common_pb2, kernel_pb2, kernel_pb2_grpc

DEFAULT_TIMEOUT = 10.0       # seconds, for calls that answer at once
DEFAULT_JOB_TIMEOUT = 600.0  # seconds, for calls that wait on a job (Wait, Read)
NO_MODEL = "no model is deployed; deploy one with `llmsh -c 'deploy PATH NAME'`"


class ClientBase:
    """What LLMClient and AsyncLLMClient share: where llmosd is, who we are, the deadlines,
    and how long to wait for llmosd to come back (retry_s)."""

    def __init__(self, model_name: str | None, address: str | None, token: str | None,
                 timeout: float, job_timeout: float, retry_s: float | None, aio: bool) -> None:
        self.address = connect.address(address)
        self.token = connect.find_token(token)
        self.timeout = timeout
        self.job_timeout = job_timeout
        self.retry_s = connect.retry_seconds(retry_s)
        self._model = model_name or os.environ.get("LLMASOS_MODEL") or None
        self._metadata = connect.metadata(self.token)
        self._reached = False  # llmosd has answered us once
        self._channel = connect.channel(self.address, calls.RETRIED if self.retry_s else (),
                                        aio=aio)
        self._stub = kernel_pb2_grpc.KernelStub(self._channel)

    def _options(self, call: Call, timeout: float | None = None,
                 patient: bool = True) -> dict[str, Any]:
        """Deadline, identity, and whether to wait for llmosd: a client that has reached it
        waits up to retry_s more for it to come back (a restart); one that never has fails
        at once with `is it running?` (a kernel that is not there is not restarting)."""
        wait = patient and self._reached and self.retry_s > 0
        deadline = (timeout or (self.job_timeout if call.job else self.timeout))
        return {"timeout": deadline + (self.retry_s if wait else 0.0),
                "metadata": self._metadata, "wait_for_ready": wait}

    def _error(self, err: grpc.RpcError, waited: bool = False) -> LLMError:
        self._reached = self._reached or calls.answered(err)
        if waited and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(
                f"no answer from llmosd at {self.address} in time, waiting up to "
                f"{self.retry_s:g} s for it to come back: is it down? (or raise the timeout, "
                f"or retry_s / $LLMASOS_RETRY_S)")
        return from_rpc(err, self.address, "" if self.token else connect.token_hint())

    def _read_cursor(self, pid: int, timeout: float | None) -> calls.ReadCursor:
        return calls.ReadCursor(pid, self.retry_s, time.monotonic() + self.retry_s +
                                (timeout or self.job_timeout))

    def _poll_cursor(self, pids: Iterable[int], timeout: float | None) -> calls.PollCursor:
        return calls.PollCursor.of(list(dict.fromkeys(pids)), self.retry_s, time.monotonic() +
                                   self.retry_s + (timeout or self.job_timeout))

    def _polled(self, cursor: calls.PollCursor,
                chunk: kernel_pb2.PollChunk) -> Iterator[tuple[int, kernel_pb2.ReadChunk]]:
        """A Poll message's entries as (pid, chunk); a refused job raises its error."""
        self._reached = True
        for entry in chunk.entries:
            if entry.error_code:
                raise refused(entry.pid, entry.error_code, entry.error)
            cursor.advance(entry)
            yield entry.pid, entry.chunk


class LLMClient(ClientBase):
    """A connection to llmosd. Every call has a deadline: `timeout` for calls that answer at
    once, `job_timeout` for those that wait on a job; once llmosd has answered, calls also wait
    up to `retry_s` (default $LLMASOS_RETRY_S or 30 s) for it to come back from a restart.
    Use it as a context manager to close it."""

    def __init__(self, model_name: str | None = None, address: str | None = None,
                 token: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 job_timeout: float = DEFAULT_JOB_TIMEOUT, retry_s: float | None = None) -> None:
        super().__init__(model_name, address, token, timeout, job_timeout, retry_s, aio=False)

    # -- plumbing -----------------------------------------------------------------------------

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, call: Call, *args: Any, timeout: float | None = None,
              patient: bool = True) -> Any:
        options = self._options(call, timeout, patient)
        try:
            reply = getattr(self._stub, call.name)(call.build(*args), **options)
        except grpc.RpcError as err:
            raise self._error(err, options["wait_for_ready"]) from None
        self._reached = True
        return call.read(reply)

    def _stream(self, call: Call, *args: Any, timeout: float | None = None) -> Iterator[Any]:
        """A server-streaming call's replies; leaving the loop early cancels the call."""
        options = self._options(call, timeout)
        stream = getattr(self._stub, call.name)(call.build(*args), **options)
        try:
            for reply in stream:
                self._reached = True
                yield reply
        except grpc.RpcError as err:
            raise self._error(err, options["wait_for_ready"]) from None
        finally:
            stream.cancel()

    @contextlib.contextmanager
    def killing_on_interrupt(self, pid: int) -> Iterator[None]:
        """Ctrl-C (or an abandoned stream) while waiting on a job kills the job."""
        try:
            yield
        except (KeyboardInterrupt, GeneratorExit):
            with contextlib.suppress(LLMError, ValueError):  # ValueError: channel closed
                self._call(calls.KILL, pid, "KILL", patient=False)
            raise

    @property
    def model(self) -> str:
        """The model jobs run on: the one given, $LLMASOS_MODEL, else the first deployed."""
        if not self._model:
            names = [m.name for m in self.models()]
            if not names:
                raise NotFound(NO_MODEL)
            self._model = names[0]
        return self._model

    def _deployed(self) -> list[str] | None:
        try:
            return [m.name for m in self.models()]
        except LLMError:
            return None

    # -- jobs ---------------------------------------------------------------------------------

    def spawn(self, prompt: str | None = None, *,
              messages: Iterable[requests.Message] | None = None, model: str | None = None,
              max_tokens: int | None = None,
              temperature: float | None = None, top_p: float | None = None,
              top_k: int | None = None, stop: str | list[str] | None = None,
              seed: int | None = None, priority: int = 0, n: int = 1, name: str = "",
              stdin_pid: int = 0, shm: str = "", stdout_mailbox: str = "",
              ignore_sigpipe: bool = False, **sampling: float) -> Process:
        """Start a job on a raw prompt or on chat messages; returns at once with its handle."""
        params = requests.sampling(max_tokens, temperature, top_p, top_k, stop, seed, **sampling)
        model = model or self.model
        try:
            ipc = {"stdin_pid": stdin_pid, "shm": shm, "stdout_mailbox": stdout_mailbox,
                   "ignore_sigpipe": ignore_sigpipe}
            pid = self._call(calls.SPAWN, model, prompt, messages, params, priority, n, name, ipc)
        except NotFound as err:
            raise calls.model_not_found(err, model, self._deployed()) from None
        return Process(self, pid)

    def generate_text(self, prompt: str, max_tokens: int | None = None,
                      temperature: float | None = None, top_p: float | None = None,
                      top_k: int | None = None, stop: str | list[str] | None = None,
                      seed: int | None = None, priority: int = 0, **kw: Any) -> str:
        """Complete a prompt; returns the generated text (without the prompt)."""
        return self.spawn(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                          top_k=top_k, stop=stop, seed=seed, priority=priority,
                          **kw).wait().check()

    def stream_text(self, prompt: str | None = None, **kw: Any) -> Iterator[str]:
        """Like generate_text (or chat, with messages=...), yielding text as it is produced."""
        proc = self.spawn(prompt, **kw)
        yield from proc.read()  # closing this generator early kills the job
        proc.wait().check()

    def chat(self, messages: Iterable[requests.Message], **kw: Any) -> str:
        """One assistant reply to chat turns ({"role": ..., "content": ...} dicts)."""
        return self.spawn(messages=messages, **kw).wait().check()

    def translate(self, text: str, target_language: str = "English", **kw: Any) -> str:
        return self.chat(tasks.translate(text, target_language), **kw)

    def summarize(self, text: str, **kw: Any) -> str:
        return self.chat(tasks.summarize(text), **kw)

    def answer(self, question: str, context: str | None = None, **kw: Any) -> str:
        return self.chat(tasks.answer(question, context), **kw)

    def generate_code(self, description: str, language: str = "Python", **kw: Any) -> str:
        return self.chat(tasks.generate_code(description, language), **kw)

    # -- syscalls, one each (calls.py says how each is built and read) ------------------------

    def wait(self, pid: int, timeout: float | None = None) -> Completion:
        return self._call(calls.WAIT, pid, timeout=timeout)

    def read(self, pid: int, timeout: float | None = None) -> Iterator[kernel_pb2.ReadChunk]:
        """The job's output chunks from its start; a stream broken by a restart of llmosd is
        re-opened where it broke (no gap, no repeat)."""
        cursor = self._read_cursor(pid, timeout)
        while True:
            options = self._options(calls.READ, cursor.left())
            stream = self._stub.Read(cursor.request(), **options)
            try:
                for chunk in stream:
                    self._reached = True
                    cursor.advance(chunk)
                    yield chunk
                return
            except grpc.RpcError as err:
                if not cursor.resumes(err):
                    raise self._error(err, options["wait_for_ready"]) from None
            finally:
                stream.cancel()

    def poll(self, pids: Iterable[int],
             timeout: float | None = None) -> Iterator[tuple[int, kernel_pb2.ReadChunk]]:
        """Several jobs' output over one stream (the Poll syscall, one message a step for all
        of them): (pid, chunk) as it comes, each job's chunks in order, until every job has
        ended (its last chunk has `done`). A job that cannot be followed raises its error
        (NotFound, PermissionDenied, OutOfRange); a stream broken by a restart of llmosd is
        re-opened where it broke."""
        cursor = self._poll_cursor(pids, timeout)
        while cursor.jobs:
            options = self._options(calls.POLL, cursor.left())
            stream = self._stub.Poll(iter([calls.POLL.build(cursor)]), **options)
            try:
                for chunk in stream:
                    yield from self._polled(cursor, chunk)
                return
            except grpc.RpcError as err:
                if not cursor.resumes(err):
                    raise self._error(err, options["wait_for_ready"]) from None
            finally:
                stream.cancel()

    def kill(self, pid: int, signal: str | int = "TERM") -> int:
        """Deliver a signal; returns the job's ProcState right after delivery."""
        return self._call(calls.KILL, pid, signal)

    def nice(self, pid: int, value: int) -> int:
        return self._call(calls.NICE, pid, value)

    def stat(self, pid: int) -> kernel_pb2.ProcessInfo:
        return self._call(calls.STAT, pid)

    def ps(self, all: bool = False, user: str = "") -> list[kernel_pb2.ProcessInfo]:  # noqa: A002
        return list(self.ps_full(all, user).processes)

    def ps_full(self, all: bool = False, user: str = "") -> kernel_pb2.PsResponse:  # noqa: A002
        """Ps with the KV pool's occupancy."""
        return self._call(calls.PS, all, user)

    def models(self) -> list[common_pb2.ModelInfo]:
        return self._call(calls.MODELS)

    def formats(self) -> kernel_pb2.ModelsResponse:
        """The Models reply whole: quant_formats, default_quant and device with the models."""
        return self._call(calls.FORMATS)

    def deploy(self, path: str, name: str, dtype: str = "",
               timeout: float | None = None, quant: str = "", tp: int = 0,
               pp: int = 0, remote_url: str = "", api_key_env: str = "",
               api_key_file: str = "", remote_model: str = "",
               progress: calls.Progress | None = None,
               replicas: int = 0, nodes: list[str] | None = None,
               pp_steps: int = 0) -> common_pb2.ModelInfo:
        """Load a model (root only); loading takes a while, hence the job deadline.
        quant: "" (the service default), "none", "int8" or a recipe from formats(); tp > 1 runs
        it as that many tensor-parallel ranks, pp > 1 as that many pipeline stages; replicas > 1
        as that many copies, each its own inference process and KV pool; nodes places them: one
        host per replica ("head" for llmosd's own) or ["anywhere"] (kernel/nodes.py). With
        remote_url, NAME is a hosted model: an OpenAI-compatible endpoint (path unused), its
        key read by llmosd from the env var api_key_env or the 0600 file api_key_file.
        progress: called with each LoadProgress (.stage, .done, .total, .unit) as the model
        loads (DeployStream); leaving early (an exception, Ctrl-C) deploys nothing."""
        args = (path, name, dtype, quant, tp, pp, remote_url, api_key_env, api_key_file,
                remote_model, replicas, nodes, pp_steps)
        if progress is None:
            return self._call(calls.DEPLOY, *args, timeout=timeout)
        model = None
        for event in self._stream(calls.DEPLOY_STREAM, *args, timeout=timeout):
            model = calls.deployed(event)   # the last event; the stream's status follows
            if model is None:
                progress(event.progress)
        return calls.check_deployed(model, name)

    def undeploy(self, name: str) -> None:
        self._call(calls.UNDEPLOY, name)

    def alias(self, name: str, target: str = "") -> None:
        """Point the model name `name` at the deployed model `target` (root only); an empty
        target removes the alias."""
        self._call(calls.ALIAS, name, target)

    def aliases(self) -> dict[str, str]:
        return self._call(calls.ALIASES)

    def whoami(self) -> kernel_pb2.WhoAmIResponse:
        return self._call(calls.WHOAMI)

    def services(self) -> list[kernel_pb2.ServiceInfo]:
        return self._call(calls.SERVICES)

    def nodes(self) -> list[kernel_pb2.NodeInfo]:
        """The machines that joined llmosd (`llmosd node --join`), their devices and replicas."""
        return self._call(calls.NODES)

    def audit(self, limit: int = 50, user: str = "", call: str = "") -> list[kernel_pb2.AuditEntry]:
        """The last entries of the audit log (root)."""
        return self._call(calls.AUDIT, limit, user, call)

    def set_quota(self, user: str, max_jobs: int | None = None, max_tokens: int | None = None,
                  kv_share: float | None = None, reset: bool = False) -> common_pb2.Quota:
        """Change a user's quota (root); None keeps a field, 0 means no limit."""
        return self._call(calls.SET_QUOTA, user, max_jobs, max_tokens, kv_share, reset)

    def pipe(self, *steps: str | dict[str, Any], **common: Any) -> list[Process]:
        """Jobs joined by pipes, `a | b | c`: each step is a prompt template ("{input}" marks
        where the previous step's output goes) or spawn()'s keyword arguments; `common`
        applies to every step. Returns the jobs; the last one's wait() gives the result."""
        procs: list[Process] = []
        for step in steps:
            kw = {**common, **requests.pipe_step(step)}
            if procs:
                kw["stdin_pid"] = procs[-1].pid
            procs.append(self.spawn(kw.pop("prompt", None), **kw))
        return procs

    def shm_create(self, name: str, text: str, mode: str = "owner",
                   model: str | None = None) -> kernel_pb2.ShmInfo:
        """Compute `text` once as a named KV segment that jobs attach with shm=name."""
        model = model or self.model
        return self._call(calls.SHM_CREATE, name, model, text, mode)

    def shm_remove(self, name: str) -> kernel_pb2.ShmInfo:
        return self._call(calls.SHM_REMOVE, name)

    def shm_list(self) -> list[kernel_pb2.ShmInfo]:
        return self._call(calls.SHM_LIST)

    def mailbox(self, name: str = "") -> Mailbox:
        """A named mailbox (see llmasos/mailbox.py): create, send, receive, list, remove."""
        return Mailbox(self._stub, self._metadata, name, self.timeout, self.address)
