"""LLMClient: the Python face of the syscall interface (llmasos.v1.Kernel).

    from llmasos import LLMClient
    client = LLMClient(model_name="smollm2-135m")
    print(client.generate_text(prompt="The quick brown fox"))
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

import grpc

from llmasos import connect, requests, tasks
from llmasos.errors import LLMError, ModelNotFound, NotFound, from_rpc
from llmasos.mailbox import Mailbox
from llmasos.names import signal_number
from llmasos.process import Completion, Process
from llmasos.proto import common_pb2, kernel_pb2, kernel_pb2_grpc

DEFAULT_TIMEOUT = 10.0       # seconds, for calls that answer at once
DEFAULT_JOB_TIMEOUT = 600.0  # seconds, for calls that wait on a job (Wait, Read)
NO_MODEL = "no model is deployed; deploy one with `llmsh -c 'deploy PATH NAME'`"


def with_deployed(message: str, deployed: list[str]) -> str:
    """The kernel's NOT_FOUND message, naming the deployed models if it does not already."""
    if "deployed" in message:
        return message
    return f"{message}; deployed models: {', '.join(deployed) or 'none'}"


class LLMClient:
    """A connection to llmosd. Every call has a deadline: `timeout` for calls that answer at
    once, `job_timeout` for those that wait on a job. Use it as a context manager to close it."""

    def __init__(self, model_name: str | None = None, address: str | None = None,
                 token: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 job_timeout: float = DEFAULT_JOB_TIMEOUT) -> None:
        self.address = connect.address(address)
        self.token = connect.find_token(token)
        self.timeout = timeout
        self.job_timeout = job_timeout
        self._model = model_name or os.environ.get("LLMASOS_MODEL") or None
        self._metadata = connect.metadata(self.token)
        self._channel = connect.channel(self.address)
        self._stub = kernel_pb2_grpc.KernelStub(self._channel)

    # -- plumbing -----------------------------------------------------------------------------

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _error(self, err: grpc.RpcError) -> LLMError:
        return from_rpc(err, self.address, "" if self.token else connect.token_hint())

    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=timeout or self.timeout,
                                               metadata=self._metadata)
        except grpc.RpcError as err:
            raise self._error(err) from None

    @contextlib.contextmanager
    def killing_on_interrupt(self, pid: int) -> Iterator[None]:
        """Ctrl-C (or an abandoned stream) while waiting on a job kills the job."""
        try:
            yield
        except (KeyboardInterrupt, GeneratorExit):
            with contextlib.suppress(LLMError, ValueError):  # ValueError: channel closed
                self.kill(pid, "KILL")
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

    # -- jobs ---------------------------------------------------------------------------------

    def spawn(self, prompt: str | None = None, *,
              messages: Iterable[requests.Message] | None = None, model: str | None = None,
              max_tokens: int | None = None,
              temperature: float | None = None, top_p: float | None = None,
              top_k: int | None = None, stop: str | list[str] | None = None,
              seed: int | None = None, priority: int = 0, n: int = 1, name: str = "",
              **sampling: float) -> Process:
        """Start a job on a raw prompt or on chat messages; returns at once with its handle."""
        params = requests.sampling(max_tokens, temperature, top_p, top_k, stop, seed, **sampling)
        req = requests.spawn(model or self.model, prompt, messages, params, priority, n, name)
        try:
            resp = self._call("Spawn", req)
        except NotFound as err:
            raise self._model_not_found(err, req.model) from None
        return Process(self, resp.pid)

    def _model_not_found(self, err: NotFound, model: str) -> NotFound:
        """Say which models exist when the one asked for does not."""
        with contextlib.suppress(LLMError):
            deployed = [m.name for m in self.models()]
            if model not in deployed:
                return ModelNotFound(with_deployed(err.message, deployed), deployed)
        return err

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
        return self.chat(tasks.messages("translate", text=text,
                                        target_language=target_language), **kw)

    def summarize(self, text: str, **kw: Any) -> str:
        return self.chat(tasks.messages("summarize", text=text), **kw)

    def answer(self, question: str, context: str | None = None, **kw: Any) -> str:
        if context:
            return self.chat(tasks.messages("answer_in_context", question=question,
                                            context=context), **kw)
        return self.chat(tasks.messages("answer", question=question), **kw)

    def generate_code(self, description: str, language: str = "Python", **kw: Any) -> str:
        return self.chat(tasks.messages("generate_code", description=description,
                                        language=language), **kw)

    # -- syscalls, one each -------------------------------------------------------------------

    def wait(self, pid: int, timeout: float | None = None) -> Completion:
        resp = self._call("Wait", kernel_pb2.WaitRequest(pid=pid), timeout or self.job_timeout)
        return Completion.from_wait(resp)

    def read(self, pid: int, timeout: float | None = None) -> Iterator[kernel_pb2.ReadChunk]:
        stream = self._stub.Read(kernel_pb2.ReadRequest(pid=pid),
                                 timeout=timeout or self.job_timeout, metadata=self._metadata)
        try:
            yield from stream
        except grpc.RpcError as err:
            raise self._error(err) from None
        finally:
            stream.cancel()

    def kill(self, pid: int, signal: str | int = "TERM") -> int:
        """Deliver a signal; returns the job's ProcState right after delivery."""
        req = kernel_pb2.KillRequest(pid=pid, signal=signal_number(signal))
        return self._call("Kill", req).state

    def nice(self, pid: int, value: int) -> int:
        return self._call("Nice", kernel_pb2.NiceRequest(pid=pid, nice=value)).nice

    def stat(self, pid: int) -> kernel_pb2.ProcessInfo:
        return self._call("Stat", kernel_pb2.StatRequest(pid=pid))

    def ps(self, all: bool = False, user: str = "") -> list[kernel_pb2.ProcessInfo]:  # noqa: A002
        return list(self.ps_full(all, user).processes)

    def ps_full(self, all: bool = False, user: str = "") -> kernel_pb2.PsResponse:  # noqa: A002
        """Ps with the KV pool's occupancy."""
        return self._call("Ps", kernel_pb2.PsRequest(all=all, user=user))

    def models(self) -> list[common_pb2.ModelInfo]:
        return list(self._call("Models", kernel_pb2.ModelsRequest()).models)

    def deploy(self, path: str, name: str, dtype: str = "",
               timeout: float | None = None, tp: int = 0, pp: int = 0
               ) -> common_pb2.ModelInfo:
        """Load a model (root only); loading takes a while, hence the job deadline. tp > 1
        runs it as that many tensor-parallel ranks, pp > 1 as that many pipeline stages."""
        req = kernel_pb2.DeployRequest(path=os.path.abspath(path), name=name, dtype=dtype,
                                       tp=tp, pp=pp)
        return self._call("Deploy", req, timeout or self.job_timeout)

    def undeploy(self, name: str) -> None:
        self._call("Undeploy", kernel_pb2.UndeployRequest(name=name))

    def whoami(self) -> kernel_pb2.WhoAmIResponse:
        return self._call("WhoAmI", kernel_pb2.WhoAmIRequest())

    def services(self) -> list[kernel_pb2.ServiceInfo]:
        return list(self._call("Services", kernel_pb2.ServicesRequest()).services)

    def audit(self, limit: int = 50, user: str = "", call: str = "") -> list[kernel_pb2.AuditEntry]:
        """The last entries of the audit log (root)."""
        req = kernel_pb2.AuditRequest(limit=limit, user=user, call=call)
        return list(self._call("Audit", req).entries)

    def set_quota(self, user: str, max_jobs: int | None = None, max_tokens: int | None = None,
                  kv_share: float | None = None, reset: bool = False) -> common_pb2.Quota:
        """Change a user's quota (root); None keeps a field, 0 means no limit."""
        given = {"max_jobs": max_jobs, "max_tokens": max_tokens, "kv_share": kv_share}
        req = kernel_pb2.SetQuotaRequest(user=user, reset=reset,
                                         **{k: v for k, v in given.items() if v is not None})
        return self._call("SetQuota", req)
    def mailbox(self, name: str = "") -> Mailbox:
        """A named mailbox (see llmasos/mailbox.py): create, send, receive, list, remove."""
        return Mailbox(self._stub, self._metadata, name, self.timeout, self.address)
