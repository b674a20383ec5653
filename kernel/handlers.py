"""The syscall handlers: sys_<name>(kernel, identity, request, context) → reply.

Arguments were validated (syscalls/validate.py) and the capability checked before a handler
runs; handlers raise SyscallError for what depends on state (unknown pid, another's job)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import grpc

from llmasos.kernel.auth import Identity
from llmasos.kernel.kernel import Deployed, Kernel
from llmasos.kernel.proctable import Proc, State
from llmasos.proto import common_pb2, inference_pb2, kernel_pb2
from llmasos.syscalls import SyscallError
from llmasos.syscalls.table import CAP_ADMIN

SIGKILL, SIGTERM, SIGCONT, SIGSTOP = 9, 15, 18, 19
DEFAULT_MAX_TOKENS = 256


def is_admin(ident: Identity) -> bool:
    return ident.root or CAP_ADMIN in ident.caps


def downstream(e: grpc.RpcError, what: str) -> SyscallError:
    """A service's error, passed on with its code when it is the caller's to fix."""
    code = e.code()
    passed = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.DEADLINE_EXCEEDED}
    if code in passed:
        return SyscallError(code.name, e.details())
    return SyscallError("UNAVAILABLE", f"{what}: {e.details()}; retry shortly")


def lookup(k: Kernel, ident: Identity, pid: int) -> Proc:
    proc = k.table.get(pid)
    if proc is None:
        raise SyscallError("NOT_FOUND", f"no process {pid}; see `llm-ps`")
    if proc.user != ident.user and not is_admin(ident):
        raise SyscallError("PERMISSION_DENIED", f"process {pid} belongs to {proc.user}")
    return proc


def model_or_404(k: Kernel, name: str) -> Deployed:
    if name not in k.models:
        known = ", ".join(sorted(k.models)) or "none"
        raise SyscallError("NOT_FOUND", f"no model {name!r}; deployed: {known}")
    return k.models[name]


# --- jobs -------------------------------------------------------------------------------------

def sys_spawn(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.SpawnResponse:
    if k.draining.is_set():
        raise SyscallError("UNAVAILABLE", "llmosd is shutting down; no new jobs")
    if req.nice < 0 and not is_admin(ident):
        raise SyscallError("PERMISSION_DENIED", "only root may spawn with a negative nice")
    model_or_404(k, req.model)
    tok = tokenize(k, req)
    if len(tok.token_ids) >= tok.context_length:
        raise SyscallError("INVALID_ARGUMENT", f"prompt is {len(tok.token_ids)} tokens; "
                           f"{req.model} holds at most {tok.context_length - 1}")
    max_tokens = req.sampling.max_tokens if req.sampling.HasField("max_tokens") \
        else DEFAULT_MAX_TOKENS
    fits_pool(k, req.model, min(len(tok.token_ids) + max_tokens, tok.context_length))
    pids: list[int] = []
    with k.table.lock:   # the step loop must see all n samples at once, or none
        spawn_samples(k, ident, req, tok, max_tokens, pids)
    k.executor.wake()
    return kernel_pb2.SpawnResponse(pid=pids[0], pids=pids)


def spawn_samples(k: Kernel, ident: Identity, req: Any, tok: Any, max_tokens: int,
                  pids: list[int]) -> None:
    """n jobs for one request; the first is the parent whose prompt KV the others share."""
    for i in range(max(1, req.n)):
        sampling = req.sampling
        if i and sampling.HasField("seed"):   # each sample its own stream, reproducibly
            sampling = common_pb2.SamplingParams()
            sampling.CopyFrom(req.sampling)
            sampling.seed = (req.sampling.seed + i) % 2**64
        proc = k.table.spawn(user=ident.user, uid=ident.uid, ppid=pids[0] if pids else 0,
                             model=req.model, nice=req.nice, name=req.name,
                             prompt_ids=list(tok.token_ids), sampling=sampling,
                             max_tokens=max_tokens, context_length=tok.context_length,
                             fork_pending=bool(pids))
        pids.append(proc.pid)
    k.table.get(pids[0]).forks = pids[1:]


def fits_pool(k: Kernel, model: str, tokens: int) -> None:
    """A job that could never hold its KV, even alone, is refused up front (no livelock)."""
    pager = k.pagers.get(model)
    if pager is not None and pager.blocks_for(tokens) > pager.num_blocks:
        raise SyscallError("RESOURCE_EXHAUSTED", f"this job may need {tokens} tokens of KV "
                           f"({pager.blocks_for(tokens)} blocks) but the pool holds "
                           f"{pager.num_blocks}; lower max_tokens or raise --kv-budget-mb")


def tokenize(k: Kernel, req: Any) -> inference_pb2.TokenizeResponse:
    if req.WhichOneof("input") == "prompt":
        treq = inference_pb2.TokenizeRequest(model=req.model, text=req.prompt)
    else:
        treq = inference_pb2.TokenizeRequest(model=req.model, messages=req.messages)
    try:
        return k.inference().Tokenize(treq, timeout=60)
    except grpc.RpcError as e:
        raise downstream(e, "tokenizing failed") from None


def sys_wait(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.WaitResponse:
    proc = lookup(k, ident, req.pid)
    limit = req.timeout_ms / 1000 if req.timeout_ms else None
    deadline = time.monotonic() + limit if limit else None
    with k.table.changed:
        while proc.state != State.ZOMBIE:
            if not ctx.is_active():
                raise SyscallError("CANCELLED", "the caller went away")
            left = deadline - time.monotonic() if deadline else 1.0
            if left <= 0:
                raise SyscallError("DEADLINE_EXCEEDED", f"process {proc.pid} still running")
            k.table.changed.wait(min(left, 1.0))
        if proc.pid not in k.table.procs:   # another Wait reaped it first
            raise SyscallError("NOT_FOUND", f"process {proc.pid} was already reaped")
        if not ctx.is_active():              # nobody to hand the status to: keep the zombie
            raise SyscallError("CANCELLED", "the caller went away")
        k.table.reap(proc)
    return kernel_pb2.WaitResponse(info=proc_info(proc), text=proc.text,
                                   token_ids=proc.output_ids, timings=timings(proc))


def timings(p: Proc) -> kernel_pb2.Timings:
    ms = 1000.0
    return kernel_pb2.Timings(
        queue_ms=(p.started - p.created) * ms if p.started else 0.0,
        ttft_ms=(p.first_token - p.created) * ms if p.first_token else 0.0,
        total_ms=((p.ended or time.time()) - p.created) * ms)


def sys_read(k: Kernel, ident: Identity, req: Any, ctx: Any) -> Iterator[kernel_pb2.ReadChunk]:
    proc = lookup(k, ident, req.pid)
    sent_chars = sent_tokens = 0
    while True:
        with k.table.changed:
            while (len(proc.output_ids) == sent_tokens and len(proc.text) == sent_chars
                   and proc.state != State.ZOMBIE and ctx.is_active()):
                k.table.changed.wait(1.0)
            text, ids = proc.text[sent_chars:], proc.output_ids[sent_tokens:]
            lps = proc.output_logprobs[sent_tokens:sent_tokens + len(ids)]
            done = proc.state in (State.ZOMBIE, State.REAPED)
            sent_chars, sent_tokens = sent_chars + len(text), sent_tokens + len(ids)
        if not ctx.is_active():
            return
        yield kernel_pb2.ReadChunk(text=text, token_ids=ids, logprobs=lps, done=done,
                                   exit_reason=int(proc.exit_reason) if done else 0)
        if done:
            return


def sys_kill(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.KillResponse:
    proc = lookup(k, ident, req.pid)
    with k.table.lock:
        if proc.state == State.ZOMBIE:
            raise SyscallError("FAILED_PRECONDITION", f"process {proc.pid} has already exited")
        if req.signal == SIGCONT and proc.state != State.STOPPED and \
                proc.pending_signal != SIGSTOP:
            raise SyscallError("FAILED_PRECONDITION", f"process {proc.pid} is not stopped")
        k.executor.signal(proc, req.signal)
        return kernel_pb2.KillResponse(state=int(proc.state))


def sys_nice(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.NiceResponse:
    proc = lookup(k, ident, req.pid)
    if req.nice < proc.nice and not is_admin(ident):
        raise SyscallError("PERMISSION_DENIED", "only root may raise a job's priority "
                           "(lower its nice value)")
    if proc.state == State.ZOMBIE:
        raise SyscallError("FAILED_PRECONDITION", f"process {proc.pid} has already exited")
    proc.nice = req.nice
    k.executor.wake()
    return kernel_pb2.NiceResponse(nice=proc.nice)


def sys_ps(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.PsResponse:
    user = req.user or None
    if user is None and not (req.all and is_admin(ident)):
        user = ident.user
    if user not in (None, ident.user) and not is_admin(ident):
        raise SyscallError("PERMISSION_DENIED", "only root may list another user's jobs")
    procs = k.table.listing(user)
    return kernel_pb2.PsResponse(processes=[proc_info(p) for p in procs], kv=kv_usage(k))


def kv_usage(k: Kernel) -> kernel_pb2.KvUsage:
    usage = kernel_pb2.KvUsage()
    by_user: dict[str, int] = {}
    for name, pager in list(k.pagers.items()):
        u = pager.usage()
        usage.total_blocks += u.total_blocks
        usage.free_blocks += u.free_blocks
        usage.block_size = u.block_size
        usage.block_bytes = k.block_bytes.get(name, 0)
        for user, blocks in u.blocks_by_user.items():
            by_user[user] = by_user.get(user, 0) + blocks
    usage.blocks_by_user.update(by_user)
    return usage


def sys_stat(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.ProcessInfo:
    return proc_info(lookup(k, ident, req.pid))


def proc_info(p: Proc) -> kernel_pb2.ProcessInfo:
    return kernel_pb2.ProcessInfo(
        pid=p.pid, ppid=p.ppid, user=p.user, state=int(p.state), model=p.model, nice=p.nice,
        prompt_tokens=len(p.prompt_ids), generated_tokens=len(p.output_ids),
        kv_blocks=p.kv_blocks, created_unix=p.created, started_unix=p.started,
        ended_unix=p.ended, exit_status=p.exit_status, exit_reason=int(p.exit_reason),
        exit_message=p.exit_message, cpu_seconds=p.cpu_seconds, preemptions=p.preemptions,
        name=p.name)


# --- models -----------------------------------------------------------------------------------

def sys_models(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.ModelsResponse:
    try:
        reply = k.inference().ListModels(inference_pb2.ListModelsRequest(), timeout=30)
    except grpc.RpcError as e:
        raise downstream(e, "listing models failed") from None
    return kernel_pb2.ModelsResponse(models=reply.models, quant_formats=reply.quant_formats,
                                     default_quant=reply.default_quant, device=reply.device)


def sys_deploy(k: Kernel, ident: Identity, req: Any, ctx: Any) -> common_pb2.ModelInfo:
    if req.name in k.models:
        raise SyscallError("ALREADY_EXISTS", f"a model named {req.name!r} is deployed; "
                           "undeploy it first or choose another name")
    path = os.path.abspath(os.path.expanduser(req.path))
    if not os.path.exists(path):
        raise SyscallError("NOT_FOUND", f"{path} does not exist")
    stub = k.inference()
    try:
        info = stub.LoadModel(inference_pb2.LoadModelRequest(
            name=req.name, path=path, dtype=req.dtype, quant=req.quant), timeout=600)
        k.attach_pager(req.name, stub)
    except grpc.RpcError as e:
        raise downstream(e, "deploying failed") from None
    k.models[req.name] = Deployed(path, req.dtype, quant=req.quant)
    return info


def sys_undeploy(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.UndeployResponse:
    model_or_404(k, req.name)
    users = [p.pid for p in k.table.live() if p.model == req.name]
    if users:
        raise SyscallError("FAILED_PRECONDITION", f"{req.name} is used by running processes "
                           f"{users[:10]}; kill them or wait for them first")
    try:
        k.inference().UnloadModel(inference_pb2.UnloadModelRequest(name=req.name), timeout=60)
    except grpc.RpcError as e:
        raise downstream(e, "undeploying failed") from None
    k.models.pop(req.name, None)
    k.pagers.pop(req.name, None)
    return kernel_pb2.UndeployResponse()


# --- system -----------------------------------------------------------------------------------

def sys_whoami(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.WhoAmIResponse:
    return kernel_pb2.WhoAmIResponse(user=ident.user, uid=ident.uid, root=ident.root,
                                     capabilities=sorted(ident.caps))


def sys_services(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.ServicesResponse:
    now = time.time()
    out = []
    for svc in k.supervisor.services.values():
        up = now - svc.started_at if svc.state in ("HEALTHY", "UNHEALTHY") else 0.0
        out.append(kernel_pb2.ServiceInfo(
            name=svc.spec.name, pid=svc.pid, address=svc.address, state=svc.state,
            restarts=svc.restarts, incarnation=svc.incarnation, uptime_s=up,
            last_exit=svc.last_exit))
    return kernel_pb2.ServicesResponse(services=out)

