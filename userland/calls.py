"""The syscalls as the clients see them: one row per call, saying how its request is built
from the method's arguments, how its reply becomes what the method returns, and whether the
channel may send it again. LLMClient and AsyncLLMClient both run this table; they differ only
in how they invoke the stub (a call or an await)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from llmasos import requests
from llmasos.errors import LLMError, ModelNotFound, NotFound
from llmasos.names import signal_number
from llmasos.process import Completion
from llmasos.proto import common_pb2, kernel_pb2

# deploy(progress=...): called with each LoadProgress (stage, done, total, unit) of the load
Progress = Callable[[common_pb2.LoadProgress], Any]


@dataclass(frozen=True)
class Call:
    name: str                    # the rpc of llmasos.v1.Kernel
    build: Callable[..., Any]    # the method's arguments -> the request message
    read: Callable[[Any], Any]   # the reply -> what the method returns
    idempotent: bool             # sending it twice does no harm: retried on UNAVAILABLE
    job: bool = False            # waits on a job or a load: job_timeout, not timeout


def _same(reply: Any) -> Any:
    return reply


def _kill(pid: int, signal: str | int = "TERM") -> kernel_pb2.KillRequest:
    return kernel_pb2.KillRequest(pid=pid, signal=signal_number(signal))


def _deploy(path: str, name: str, dtype: str = "", quant: str = "", tp: int = 0,
            pp: int = 0, remote_url: str = "", api_key_env: str = "", api_key_file: str = "",
            remote_model: str = "", replicas: int = 0,
            nodes: list[str] | None = None, pp_steps: int = 0) -> kernel_pb2.DeployRequest:
    """A model file or folder; or, with remote_url, a hosted model (path is then unused)."""
    if remote_url:
        return kernel_pb2.DeployRequest(name=name, remote_url=remote_url, api_key_env=api_key_env,
                                        api_key_file=api_key_file, remote_model=remote_model)
    return kernel_pb2.DeployRequest(path=os.path.abspath(path), name=name, dtype=dtype,
                                    quant=quant, tp=tp, pp=pp, replicas=replicas,
                                    nodes=nodes or [], pp_steps=pp_steps)


def _set_quota(user: str, max_jobs: int | None = None, max_tokens: int | None = None,
               kv_share: float | None = None, reset: bool = False) -> kernel_pb2.SetQuotaRequest:
    given = {"max_jobs": max_jobs, "max_tokens": max_tokens, "kv_share": kv_share}
    return kernel_pb2.SetQuotaRequest(user=user, reset=reset,
                                      **{k: v for k, v in given.items() if v is not None})


# Spawn, Deploy and Undeploy are not idempotent: a retry after the kernel took the first
# request would start a second job (or fail on the first's effect), so they are only sent
# again when gRPC knows the first never reached the kernel (see connect.py).
SPAWN = Call("Spawn", requests.spawn, lambda r: r.pid, idempotent=False)
WAIT = Call("Wait", lambda pid: kernel_pb2.WaitRequest(pid=pid), Completion.from_wait,
            idempotent=True, job=True)
READ = Call("Read", lambda pid, offset=0: kernel_pb2.ReadRequest(pid=pid, offset=offset),
            _same, idempotent=True, job=True)
POLL = Call("Poll", lambda cursor: cursor.request(), _same, idempotent=True, job=True)
KILL = Call("Kill", _kill, lambda r: r.state, idempotent=True)
NICE = Call("Nice", lambda pid, value: kernel_pb2.NiceRequest(pid=pid, nice=value),
            lambda r: r.nice, idempotent=True)
STAT = Call("Stat", lambda pid: kernel_pb2.StatRequest(pid=pid), _same, idempotent=True)
PS = Call("Ps", lambda all=False, user="": kernel_pb2.PsRequest(all=all, user=user),  # noqa: A006
          _same, idempotent=True)
MODELS = Call("Models", kernel_pb2.ModelsRequest, lambda r: list(r.models), idempotent=True)
DEPLOY = Call("Deploy", _deploy, _same, idempotent=False, job=True)
DEPLOY_STREAM = Call("DeployStream", _deploy, _same, idempotent=False, job=True)  # + progress
UNDEPLOY = Call("Undeploy", lambda name: kernel_pb2.UndeployRequest(name=name),
                lambda r: None, idempotent=False)
WHOAMI = Call("WhoAmI", kernel_pb2.WhoAmIRequest, _same, idempotent=True)
SERVICES = Call("Services", kernel_pb2.ServicesRequest, lambda r: list(r.services),
                idempotent=True)
NODES = Call("Services", kernel_pb2.ServicesRequest, lambda r: list(r.nodes),
             idempotent=True)   # the joined machines (kernel/nodes.py)
AUDIT = Call("Audit", lambda limit=50, user="", call="": kernel_pb2.AuditRequest(
    limit=limit, user=user, call=call), lambda r: list(r.entries), idempotent=True)
SET_QUOTA = Call("SetQuota", _set_quota, _same, idempotent=True)  # sets, never adds

ALIAS = Call("Alias", lambda name, target="": kernel_pb2.AliasRequest(name=name, target=target),
              lambda r: None, idempotent=True)   # sets (or removes) the same alias again
FORMATS = Call("Models", kernel_pb2.ModelsRequest, _same, idempotent=True)   # the reply whole
ALIASES = Call("Models", kernel_pb2.ModelsRequest,
               lambda r: {a.name: a.target for a in r.aliases}, idempotent=True)
SHM_CREATE = Call("ShmCreate", requests.shm_create, _same, idempotent=False, job=True)
SHM_REMOVE = Call("ShmRemove", lambda name: kernel_pb2.ShmRemoveRequest(name=name), _same,
                  idempotent=True)
SHM_LIST = Call("ShmList", kernel_pb2.ShmListRequest, lambda r: list(r.segments),
                idempotent=True)

CALLS = (SPAWN, WAIT, READ, POLL, KILL, NICE, STAT, PS, MODELS, DEPLOY, DEPLOY_STREAM, UNDEPLOY,
         WHOAMI, SERVICES, AUDIT, SET_QUOTA, ALIAS, SHM_CREATE, SHM_REMOVE, SHM_LIST)
RETRIED = tuple(c.name for c in CALLS if c.idempotent)

# Codes that may come from the client's side of the wire; any other means llmosd answered.
LOCAL_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
               grpc.StatusCode.CANCELLED)


def answered(err: grpc.RpcError) -> bool:
    """Whether a failed call was answered by llmosd (so it was reachable)."""
    return err.code() not in LOCAL_CODES


def deployed(event: common_pb2.DeployEvent) -> common_pb2.ModelInfo | None:
    """The model a DeployStream event carries (its last), else None (a progress event)."""
    return event.model if event.HasField("model") else None


def check_deployed(model: common_pb2.ModelInfo | None, name: str) -> common_pb2.ModelInfo:
    if model is None:   # a stream ends with its model or an error status; never neither
        raise LLMError(f"the deploy of {name} ended without its model; see llmosd's log")
    return model


def model_not_found(err: NotFound, model: str, deployed: list[str] | None) -> NotFound:
    """Spawn's NOT_FOUND, naming the deployed models when the model asked for is not one of
    them (deployed is None when listing them failed too: the kernel's message stands)."""
    if deployed is None or model in deployed:
        return err
    message = err.message if "deployed" in err.message else \
        f"{err.message}; deployed models: {', '.join(deployed) or 'none'}"
    return ModelNotFound(message, deployed)


@dataclass
class ReadCursor:
    """How far a Read stream got, so a broken one is re-opened where it broke: no gap, no
    repeat (the kernel resumes the text at the end of the `offset`th token's text). A stream
    that keeps breaking without progress for `patience` seconds fails."""

    pid: int
    patience: float
    deadline: float            # time.monotonic() past which the read is over
    tokens: int = 0            # output tokens received
    broken_since: float | None = field(default=None)

    def request(self) -> kernel_pb2.ReadRequest:
        return READ.build(self.pid, self.tokens)

    def left(self) -> float:
        return max(self.deadline - time.monotonic(), 0.001)

    def advance(self, chunk: kernel_pb2.ReadChunk) -> None:
        self.tokens += len(chunk.token_ids)
        self.broken_since = None

    def resumes(self, err: grpc.RpcError) -> bool:
        """Whether to re-open after this error: UNAVAILABLE (llmosd went away or restarts),
        time left, and progress within `patience`."""
        now = time.monotonic()
        if err.code() != grpc.StatusCode.UNAVAILABLE or self.patience <= 0 or \
                now >= self.deadline:
            return False
        if self.broken_since is None:
            self.broken_since = now
        return now - self.broken_since <= self.patience


@dataclass
class PollCursor:
    """How far a Poll of a fixed set of jobs got, one ReadCursor each (the same patience and
    deadline): a broken stream is re-opened with each job from where it broke, and a job that
    has ended leaves the set."""

    jobs: dict[int, ReadCursor]

    @classmethod
    def of(cls, pids: list[int], patience: float, deadline: float) -> PollCursor:
        return cls({pid: ReadCursor(pid, patience, deadline) for pid in pids})

    def request(self) -> kernel_pb2.PollRequest:
        return kernel_pb2.PollRequest(follow=[c.request() for c in self.jobs.values()])

    def left(self) -> float:
        return min(c.left() for c in self.jobs.values())

    def advance(self, entry: kernel_pb2.PollEntry) -> None:
        self.jobs[entry.pid].advance(entry.chunk)
        for cursor in self.jobs.values():   # progress on any job is progress
            cursor.broken_since = None
        if entry.chunk.done:
            del self.jobs[entry.pid]

    def resumes(self, err: grpc.RpcError) -> bool:
        return all(c.resumes(err) for c in list(self.jobs.values()))
