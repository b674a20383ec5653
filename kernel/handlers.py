"""The syscall handlers: sys_<name>(kernel, identity, request, context) → reply.

Arguments were validated (syscalls/validate.py) and the capability checked before a handler
runs; handlers raise SyscallError for what depends on state (unknown pid, another's job)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import grpc

from llmasos.kernel import quota
from llmasos.kernel.auth import Identity
from llmasos.kernel.ipc_delivery import IPC_TIMEOUT, caller, check_stdout_mailbox, ipc_failed
from llmasos.kernel.kernel import Deployed, Kernel
from llmasos.kernel.proctable import Proc, State
from llmasos.proto import (
    common_pb2,
    inference_pb2,
    ipc_pb2,
    kernel_pb2,
    security_pb2,
    security_pb2_grpc,
)
from llmasos.syscalls import SyscallError
from llmasos.syscalls.limits import DEFAULT_MAX_TOKENS, SIGCONT, SIGSTOP, sampling_errors
from llmasos.syscalls.table import CAP_ADMIN

ENDED = (State.ZOMBIE, State.REAPED)


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


def usable_model(k: Kernel, name: str) -> Deployed:
    dep = model_or_404(k, name)
    if dep.error:
        raise SyscallError("FAILED_PRECONDITION", dep.error)
    return dep


# --- jobs -------------------------------------------------------------------------------------

def sys_spawn(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.SpawnResponse:
    if k.draining.is_set():
        raise SyscallError("UNAVAILABLE", "llmosd is shutting down; no new jobs")
    if req.nice < 0 and not is_admin(ident):
        raise SyscallError("PERMISSION_DENIED", "only root may spawn with a negative nice")
    usable_model(k, req.model)
    tok = tokenize(k, req)
    if len(tok.token_ids) >= tok.context_length:
        raise SyscallError("INVALID_ARGUMENT", f"prompt is {len(tok.token_ids)} tokens; "
                           f"{req.model} holds at most {tok.context_length - 1}")
    errors = sampling_errors(req.sampling, tok.vocab_size or None)   # the model's real bounds
    if errors:
        raise SyscallError("INVALID_ARGUMENT", f"{errors[0]} ({req.model})")
    max_tokens = req.sampling.max_tokens if req.sampling.HasField("max_tokens") \
        else DEFAULT_MAX_TOKENS
    need = min(len(tok.token_ids) + max_tokens, tok.context_length)
    fits_pool(k, req.model, need, ident)
    check_stdout_mailbox(k, ident, req.stdout_mailbox)
    pids: list[int] = []
    with k.table.lock:   # the step loop must see all n samples at once, or none
        jobs, tokens = quota.in_flight(k.table.live(), ident.user)
        quota.check_spawn(ident, jobs, tokens, need * max(1, req.n), max(1, req.n))
        share = ident.quota.kv_share
        k.kv_share[ident.user] = share if 0 < share < 1 and not ident.root else 1.0
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
                             fork_pending=bool(pids), stdout_mailbox=req.stdout_mailbox)
        pids.append(proc.pid)
    k.table.get(pids[0]).forks = pids[1:]


def fits_pool(k: Kernel, model: str, tokens: int, ident: Identity) -> None:
    """A job that could never hold its KV, even alone (or within its owner's KV quota), is
    refused up front (no livelock)."""
    pager = k.pagers.get(model)
    if pager is None:
        return
    need = pager.blocks_for(tokens)
    if need > pager.num_blocks:
        raise SyscallError("RESOURCE_EXHAUSTED", f"this job may need {tokens} tokens of KV "
                           f"({need} blocks) but the pool holds "
                           f"{pager.num_blocks}; lower max_tokens or raise --kv-budget-mb")
    limit = quota.kv_limit_blocks(ident, pager.num_blocks)
    if need > limit:
        raise SyscallError("RESOURCE_EXHAUSTED", f"quota: this job may need {need} KV blocks "
                           f"but {ident.user}'s kv_share allows {limit} of {pager.num_blocks}; "
                           "lower max_tokens, or " + quota.FIX.format(user=ident.user,
                                                                       flag="--kv-share"))


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
        while proc.state not in ENDED:
            if not ctx.is_active():
                raise SyscallError("CANCELLED", "the caller went away")
            left = deadline - time.monotonic() if deadline else 1.0
            if left <= 0:
                raise SyscallError("DEADLINE_EXCEEDED", f"process {proc.pid} still running")
            k.table.changed.wait(min(left, 1.0))
        if proc.state == State.REAPED:   # another Wait (or the zombie timeout) reaped it
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
    """Stream output from token `offset` on; the stream ends when the job ends or is reaped
    by anyone (a concurrent Wait, the zombie timeout), with its exit status."""
    proc = lookup(k, ident, req.pid)
    with k.table.lock:
        if req.offset > len(proc.output_ids):
            raise SyscallError("OUT_OF_RANGE", f"offset {req.offset} is past the "
                               f"{len(proc.output_ids)} tokens process {proc.pid} has produced")
        sent_tokens = req.offset
        sent_chars = proc.text_ends[sent_tokens - 1] if sent_tokens else 0
    while True:
        with k.table.changed:
            while (len(proc.output_ids) == sent_tokens and len(proc.text) == sent_chars
                   and proc.state not in ENDED and ctx.is_active()):
                k.table.changed.wait(1.0)
            text, ids = proc.text[sent_chars:], proc.output_ids[sent_tokens:]
            lps = proc.output_logprobs[sent_tokens:sent_tokens + len(ids)]
            done = proc.state in ENDED
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
        if proc.state in ENDED:
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
    if proc.state in ENDED:
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
    return kernel_pb2.PsResponse(processes=[proc_info(p) for p in procs],
                                 kv=kv_usage(k, None if is_admin(ident) else ident.user))


def kv_usage(k: Kernel, only_user: str | None = None) -> kernel_pb2.KvUsage:
    """Pool occupancy; with only_user, blocks_by_user holds that user's entry alone (a
    non-admin sees the pool's totals and its own share, not who else uses it)."""
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
    if only_user is not None:
        by_user = {only_user: by_user[only_user]} if only_user in by_user else {}
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
    return kernel_pb2.ModelsResponse(models=reply.models)


def sys_deploy(k: Kernel, ident: Identity, req: Any, ctx: Any) -> common_pb2.ModelInfo:
    if req.name in k.models and not k.models[req.name].error:
        raise SyscallError("ALREADY_EXISTS", f"a model named {req.name!r} is deployed; "
                           "undeploy it first or choose another name")
    path = os.path.abspath(os.path.expanduser(req.path))
    if not os.path.exists(path):
        raise SyscallError("NOT_FOUND", f"{path} does not exist")
    stub = k.inference()
    try:
        info = stub.LoadModel(inference_pb2.LoadModelRequest(
            name=req.name, path=path, dtype=req.dtype, tp=req.tp,
            pp=req.pp), timeout=600)
        k.attach_pager(req.name, stub)
    except grpc.RpcError as e:
        raise downstream(e, "deploying failed") from None
    # replaces an unavailable one
    k.models[req.name] = Deployed(path, req.dtype, tp=req.tp, pp=req.pp)
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
                                     capabilities=sorted(ident.caps),
                                     quota=common_pb2.Quota(**ident.quota.to_dict()))


def sys_services(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.ServicesResponse:
    """Everyone sees names, pids, states, restarts and uptime; only admins see where the
    internal services listen."""
    now, admin = time.time(), is_admin(ident)
    out = []
    for svc in k.supervisor.services.values():
        up = now - svc.started_at if svc.state in ("HEALTHY", "UNHEALTHY") else 0.0
        out.append(kernel_pb2.ServiceInfo(
            name=svc.spec.name, pid=svc.pid, address=svc.address if admin else "",
            state=svc.state,
            restarts=svc.restarts, incarnation=svc.incarnation, uptime_s=up,
            last_exit=svc.last_exit))
    return kernel_pb2.ServicesResponse(services=out)



# --- protection -------------------------------------------------------------------------------

def sys_setquota(k: Kernel, ident: Identity, req: Any, ctx: Any) -> common_pb2.Quota:
    """Change a user's quota in the security service's store; it applies at the user's next
    call (the kernel drops its cached identities of that user)."""
    sreq = security_pb2.SetUserQuotaRequest(user=req.user, reset=req.reset)
    for name in ("max_jobs", "max_tokens", "kv_share"):
        if req.HasField(name):
            setattr(sreq, name, getattr(req, name))
    try:
        reply = security_pb2_grpc.SecurityStub(k.channel("security")).SetQuota(sreq, timeout=30)
    except grpc.RpcError as e:
        raise downstream(e, "setting the quota failed") from None
    k.auth.invalidate(req.user)
    return reply.quota


def sys_audit(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.AuditResponse:
    entries = k.audit.tail(req.limit or 50, user=req.user, call=req.call)
    return kernel_pb2.AuditResponse(entries=[kernel_pb2.AuditEntry(
        time_unix=e.get("time", 0.0), user=e.get("user", ""), uid=e.get("uid", -1),
        call=e.get("call", ""), args_json=json.dumps(e.get("args", {}), sort_keys=True),
        code=e.get("code", ""), message=e.get("message", ""), peer=e.get("peer", ""))
        for e in entries])
# --- mailboxes (syscalls 20-24): the IPC service keeps them and decides who may use which -----

def mbox_info(m: ipc_pb2.Mailbox) -> kernel_pb2.MboxInfo:
    return kernel_pb2.MboxInfo(name=m.name, owner=m.owner, mode=m.mode, members=m.members,
                               messages=m.depth, bytes=m.bytes, max_messages=m.capacity,
                               max_bytes=m.max_bytes, created_unix=m.created_unix)


def sys_mbox_create(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.MboxInfo:
    try:
        reply = k.ipc().CreateMailbox(ipc_pb2.CreateMailboxRequest(
            name=req.name, capacity=req.max_messages, mode=req.mode, members=req.members,
            max_bytes=req.max_bytes, caller=caller(ident)), timeout=IPC_TIMEOUT)
    except grpc.RpcError as e:
        raise ipc_failed(e, "creating the mailbox failed") from None
    return mbox_info(reply.mailbox)


def sys_mbox_send(k: Kernel, ident: Identity, req: Any,
                  ctx: Any) -> kernel_pb2.MboxSendResponse:
    try:
        reply = k.ipc().Send(ipc_pb2.SendRequest(
            name=req.name, payload=req.text.encode(), sender=ident.user, caller=caller(ident)),
            timeout=IPC_TIMEOUT)
    except grpc.RpcError as e:
        raise ipc_failed(e, "sending failed") from None
    return kernel_pb2.MboxSendResponse(sequence=reply.sequence)


def sys_mbox_recv(k: Kernel, ident: Identity, req: Any,
                  ctx: Any) -> kernel_pb2.MboxRecvResponse:
    """Long-poll in the IPC service (no kernel lock held); a caller that goes away cancels it,
    and a cancelled receive takes no message."""
    wait_ms = req.timeout_ms
    left = ctx.time_remaining()
    if left is not None:   # never wait past the caller's own deadline
        wait_ms = min(wait_ms, max(int(left * 1000), 0))
    future = k.ipc().Receive.future(ipc_pb2.ReceiveRequest(
        name=req.name, timeout_ms=wait_ms, caller=caller(ident)),
        timeout=wait_ms / 1000 + IPC_TIMEOUT)
    ctx.add_callback(future.cancel)
    try:
        reply = future.result()
    except grpc.FutureCancelledError:
        raise SyscallError("CANCELLED", "the caller went away") from None
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.CANCELLED:
            raise SyscallError("CANCELLED", "the caller went away") from None
        raise ipc_failed(e, "receiving failed") from None
    return kernel_pb2.MboxRecvResponse(text=reply.payload.decode(errors="replace"),
                                       sender=reply.sender, sequence=reply.sequence,
                                       pid=reply.pid)


def sys_mbox_list(k: Kernel, ident: Identity, req: Any,
                  ctx: Any) -> kernel_pb2.MboxListResponse:
    try:
        if req.name:
            boxes = [k.ipc().StatMailbox(ipc_pb2.StatMailboxRequest(
                name=req.name, caller=caller(ident)), timeout=IPC_TIMEOUT)]
        else:
            boxes = list(k.ipc().ListMailboxes(ipc_pb2.ListMailboxesRequest(
                caller=caller(ident)), timeout=IPC_TIMEOUT).mailboxes)
    except grpc.RpcError as e:
        raise ipc_failed(e, "listing mailboxes failed") from None
    return kernel_pb2.MboxListResponse(mailboxes=[mbox_info(m) for m in boxes])


def sys_mbox_remove(k: Kernel, ident: Identity, req: Any,
                    ctx: Any) -> kernel_pb2.MboxRemoveResponse:
    try:
        reply = k.ipc().RemoveMailbox(ipc_pb2.RemoveMailboxRequest(
            name=req.name, caller=caller(ident)), timeout=IPC_TIMEOUT)
    except grpc.RpcError as e:
        raise ipc_failed(e, "removing the mailbox failed") from None
    return kernel_pb2.MboxRemoveResponse(discarded=reply.discarded)
