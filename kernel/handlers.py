"""The syscall handlers: sys_<name>(kernel, identity, request, context) → reply.

Arguments were validated (syscalls/validate.py) and the capability checked before a handler
runs; handlers raise SyscallError for what depends on state (unknown pid, another's job)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
from collections.abc import Generator, Iterator
from typing import Any

import grpc
import structlog

from llmasos.kernel import node_ranks, quota, rank_procs, replicas
from llmasos.kernel.auth import Identity
from llmasos.kernel.ipc_delivery import IPC_TIMEOUT, caller, check_stdout_mailbox, ipc_failed
from llmasos.kernel.kernel import Deployed, Kernel, load_request
from llmasos.kernel.pipes import Template
from llmasos.kernel.poll import Poll
from llmasos.kernel.proctable import Exit, Proc, State
from llmasos.kernel.segments import Segment
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
from llmasos.syscalls.table import BY_NAME, CAP_ADMIN

ENDED = (State.ZOMBIE, State.REAPED)
log = structlog.get_logger()


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
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return SyscallError("UNAVAILABLE", f"{what}: {e.details()}; retry shortly")
    return SyscallError("INTERNAL", f"{what}: {e.details()}")   # a bug, not a restart


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
    resolve_model(k, req)
    if usable_model(k, req.model).remote_url:
        return spawn_remote(k, ident, req)
    if req.stdin_pid:
        return spawn_reader(k, ident, req)
    seg = shm_for(k, ident, req)
    tok = tokenize(k, req, seg.text if seg else "")
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
    with k.table.lock, k.journal.batch():   # all n samples at once, journaled, or none
        jobs, tokens = quota.in_flight(k.table.live(), ident.user)
        quota.check_spawn(ident, jobs, tokens, need * max(1, req.n), max(1, req.n))
        share = ident.quota.kv_share
        k.kv_share[ident.user] = share if 0 < share < 1 and not ident.root else 1.0
        spawn_samples(k, ident, req, tok, max_tokens, pids)
        if seg is not None:
            for pid in pids:
                k.table.get(pid).shm = seg.name
                seg.attached.add(pid)
        for pid in pids:
            k.journal.record_spawn(k.table.get(pid))
    k.executor.wake()
    return kernel_pb2.SpawnResponse(pid=pids[0], pids=pids)


def shm_for(k: Kernel, ident: Identity, req: Any) -> Segment | None:
    """The KV segment a Spawn attaches (its text goes before the prompt)."""
    if not req.shm:
        return None
    with k.table.lock:
        seg = k.segments.get(req.shm, ident.user, is_admin(ident))
    if seg.model != req.model:
        raise SyscallError("INVALID_ARGUMENT", f"segment {req.shm!r} holds KV of {seg.model}, "
                           f"not {req.model}")
    return seg


def spawn_reader(k: Kernel, ident: Identity, req: Any) -> kernel_pb2.SpawnResponse:
    """A pipe's reader: its prompt is a template around another job's output (kernel/pipes.py)."""
    writer = lookup(k, ident, req.stdin_pid)
    if req.n > 1:
        raise SyscallError("INVALID_ARGUMENT", "n > 1 cannot read a pipe; spawn one reader")
    if k.pipes is None:
        raise SyscallError("FAILED_PRECONDITION", "this kernel runs without pipes")
    template = pipe_template(req)
    tok = tokenize(k, req)   # the template alone: checks the model and gives its limits
    errors = sampling_errors(req.sampling, tok.vocab_size or None)
    if errors:
        raise SyscallError("INVALID_ARGUMENT", f"{errors[0]} ({req.model})")
    max_tokens = req.sampling.max_tokens if req.sampling.HasField("max_tokens") \
        else DEFAULT_MAX_TOKENS
    need = min(len(tok.token_ids) + writer.max_tokens + max_tokens, tok.context_length)
    fits_pool(k, req.model, need, ident)
    check_stdout_mailbox(k, ident, req.stdout_mailbox)
    with k.table.lock:
        jobs, tokens = quota.in_flight(k.table.live(), ident.user)
        quota.check_spawn(ident, jobs, tokens, need, 1)
        proc = k.table.spawn(user=ident.user, uid=ident.uid, ppid=0, model=req.model,
                             nice=req.nice, name=req.name, prompt_ids=[],
                             sampling=req.sampling, max_tokens=max_tokens,
                             context_length=tok.context_length,
                             stdout_mailbox=req.stdout_mailbox,
                             ignore_sigpipe=req.ignore_sigpipe)
        k.pipes.connect(proc, writer, template)
        k.journal.record_spawn(proc)
    k.executor.wake()
    return kernel_pb2.SpawnResponse(pid=proc.pid, pids=[proc.pid])


def pipe_template(req: Any) -> Template:
    if req.WhichOneof("input") == "prompt":
        return Template(req.model, prompt=req.prompt)
    return Template(req.model, messages=[(m.role, m.content) for m in req.messages.messages])


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
                             fork_pending=bool(pids), stdout_mailbox=req.stdout_mailbox,
                             ignore_sigpipe=req.ignore_sigpipe)
        pids.append(proc.pid)
    k.table.get(pids[0]).forks = pids[1:]


def fits_pool(k: Kernel, model: str, tokens: int, ident: Identity) -> None:
    """A job that could never hold its KV, even alone (or within its owner's KV quota), is
    refused up front (no livelock)."""
    pager = replicas.any_pager(k, model)
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


def tokenize(k: Kernel, req: Any, prefix: str = "") -> inference_pb2.TokenizeResponse:
    if req.WhichOneof("input") == "prompt":
        treq = inference_pb2.TokenizeRequest(model=req.model, text=prefix + req.prompt)
    else:
        treq = inference_pb2.TokenizeRequest(model=req.model, messages=req.messages)
    try:
        return replicas.serving(k, req.model).Tokenize(treq, timeout=60)
    except grpc.RpcError as e:
        raise downstream(e, "tokenizing failed") from None


def sys_wait(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.WaitResponse:
    """Block until the job ends, reap it, hand out its status. Asked again after that (a reply
    lost in flight, a second waiter) it answers the same for proctable.ANSWERED_KEEP_S."""
    again = k.table.answered_wait(req.pid) if k.table.get(req.pid) is None else None
    if again is not None and (again.user == ident.user or is_admin(ident)):
        return wait_response(again, k)
    proc = lookup(k, ident, req.pid)
    limit = req.timeout_ms / 1000 if req.timeout_ms else None
    deadline = time.monotonic() + limit if limit else None
    ended = k.table.watch(proc)
    with ended:
        while proc.state not in ENDED:
            if not ctx.is_active():
                raise SyscallError("CANCELLED", "the caller went away")
            left = deadline - time.monotonic() if deadline else 1.0
            if left <= 0:
                raise SyscallError("DEADLINE_EXCEEDED", f"process {proc.pid} still running")
            ended.wait(min(left, 1.0))
        if proc.state == State.REAPED:   # another Wait (or the zombie timeout) reaped it
            if k.table.answered_wait(proc.pid) is proc:
                return wait_response(proc, k)
            raise SyscallError("NOT_FOUND", f"process {proc.pid} was already reaped")
        if not ctx.is_active():              # nobody to hand the status to: keep the zombie
            raise SyscallError("CANCELLED", "the caller went away")
        k.table.reap(proc, answered=True)
        k.journal.record_reap(proc.pid, answered=True)
    return wait_response(proc, k)


def wait_response(proc: Proc, k: Kernel) -> kernel_pb2.WaitResponse:
    return kernel_pb2.WaitResponse(info=proc_info(proc, k), text=proc.text,
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
    news = k.table.watch(proc)
    while True:
        with news:
            while (len(proc.output_ids) == sent_tokens and len(proc.text) == sent_chars
                   and proc.state not in ENDED and ctx.is_active()):
                news.wait(1.0)
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


def sys_poll(k: Kernel, ident: Identity, requests: Iterator[kernel_pb2.PollRequest],
             ctx: Any) -> Iterator[kernel_pb2.PollChunk]:
    """Follow many jobs' output over one stream (kernel/poll.py); refusals and jobs of other
    users are audited one by one, as their Reads would be."""
    peer = ctx.peer()

    def audit(code: str, message: str, follow: kernel_pb2.ReadRequest) -> None:
        proc = k.table.get(follow.pid)
        if code in ("PERMISSION_DENIED", "UNAUTHENTICATED") or \
                (code == "OK" and proc is not None and proc.user != ident.user):
            k.audit.record(call="Poll", code=code, message=message, user=ident.user,
                           uid=ident.uid, args={"pid": follow.pid, "offset": follow.offset},
                           peer=peer)

    poll = Poll(k.table, lambda pid: lookup(k, ident, pid), BY_NAME["Poll"].check, audit)
    threading.Thread(target=poll.drain, args=(requests,), name="poll-requests",
                     daemon=True).start()
    yield from poll.chunks(ctx.is_active)


def sys_kill(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.KillResponse:
    proc = lookup(k, ident, req.pid)
    with k.table.lock:
        if proc.state in ENDED:
            raise SyscallError("FAILED_PRECONDITION", f"process {proc.pid} has already exited")
        if req.signal == SIGCONT and proc.state != State.STOPPED and \
                proc.pending_signal != SIGSTOP:
            raise SyscallError("FAILED_PRECONDITION", f"process {proc.pid} is not stopped")
        if proc.segment:
            raise SyscallError("FAILED_PRECONDITION", f"process {proc.pid} holds KV segment "
                               f"{proc.segment!r}; remove it with `ipcrm -s {proc.segment}`")
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
    k.journal.record_nice(proc.pid, proc.nice)
    k.executor.wake()
    return kernel_pb2.NiceResponse(nice=proc.nice)


def sys_ps(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.PsResponse:
    user = req.user or None
    if user is None and not (req.all and is_admin(ident)):
        user = ident.user
    if user not in (None, ident.user) and not is_admin(ident):
        raise SyscallError("PERMISSION_DENIED", "only root may list another user's jobs")
    procs = k.table.listing(user)
    return kernel_pb2.PsResponse(processes=[proc_info(p, k) for p in procs],
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
        usage.block_bytes = k.block_bytes.get(replicas.split(name)[0], 0)
        for user, blocks in u.blocks_by_user.items():
            by_user[user] = by_user.get(user, 0) + blocks
    if only_user is not None:
        by_user = {only_user: by_user[only_user]} if only_user in by_user else {}
    usage.blocks_by_user.update(by_user)
    return usage


def sys_stat(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.ProcessInfo:
    return proc_info(lookup(k, ident, req.pid), k)


def proc_info(p: Proc, k: Kernel | None = None) -> kernel_pb2.ProcessInfo:
    return kernel_pb2.ProcessInfo(
        pid=p.pid, ppid=p.ppid, user=p.user, state=int(p.state), model=p.model, nice=p.nice,
        prompt_tokens=len(p.prompt_ids), generated_tokens=len(p.output_ids),
        kv_blocks=p.kv_blocks, created_unix=p.created, started_unix=p.started,
        ended_unix=p.ended, exit_status=p.exit_status, exit_reason=int(p.exit_reason),
        exit_message=p.exit_message, cpu_seconds=p.cpu_seconds, preemptions=p.preemptions,
        name=p.name, stdin_pid=p.stdin_pid, stdout_pids=p.stdout_pids,
        stdin_exit_reason=int(p.stdin_exit), shm=p.shm, replica=p.replica,
        replicas=replicas.count(k, p.model) if k is not None else 1)


# --- models -----------------------------------------------------------------------------------

def sys_models(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.ModelsResponse:
    try:
        reply = k.inference().ListModels(inference_pb2.ListModelsRequest(), timeout=30)
    except grpc.RpcError as e:
        raise downstream(e, "listing models failed") from None
    for m in reply.models:
        m.replicas = replicas.count(k, m.name)
    return kernel_pb2.ModelsResponse(
        models=[*reply.models, *remote_infos(k)],
        quant_formats=reply.quant_formats, default_quant=reply.default_quant,
        device=reply.device, aliases=[kernel_pb2.ModelAlias(name=n, target=t)
                                      for n, t in sorted(aliases(k).items())])


def sys_deploy(k: Kernel, ident: Identity, req: Any, ctx: Any) -> common_pb2.ModelInfo:
    """Deploy: answered once the model is loaded (DeployStream also sends the progress)."""
    for event in deploy_events(k, req, ctx):
        if event.HasField("model"):
            return event.model
    raise SyscallError("INTERNAL", f"the deploy of {req.name} ended without its model")


def sys_deploy_stream(k: Kernel, ident: Identity, req: Any,
                      ctx: Any) -> Iterator[common_pb2.DeployEvent]:
    yield from deploy_events(k, req, ctx)


def deploy_events(k: Kernel, req: Any, ctx: Any) -> Iterator[common_pb2.DeployEvent]:
    """Both Deploys: the load's progress, then the model, deployed and journaled, last."""
    with deploying(k, req.name):
        if req.name in k.models and not k.models[req.name].error:
            raise SyscallError("ALREADY_EXISTS", f"a model named {req.name!r} is deployed; "
                               "undeploy it first or choose another name")
        if req.remote_url:   # nothing to load: one event
            info = deploy_remote(k, req)
        else:
            path = os.path.abspath(os.path.expanduser(req.path))
            if not os.path.exists(path):
                raise SyscallError("NOT_FOUND", f"{path} does not exist")
            n = check_replicas(k, req)
            check_pp_steps(req)
            world = max(1, req.tp) * max(1, req.pp)
            by_rank = world > 1 and n == 1   # nodes names each rank's host, else each replica's
            dep = Deployed(path, req.dtype, quant=req.quant, tp=req.tp, pp=req.pp, replicas=n,
                           pp_steps=req.pp_steps,
                           nodes=[] if by_rank else k.nodes.placement(list(req.nodes), n),
                           ranks=node_ranks.placement(k, list(req.nodes), world)
                           if by_rank and req.nodes else [])
            replicas.start_services(k, replicas.local_span(dep), world)
            with k.nodes.starting(dep.nodes, replicas.START_TIMEOUT):
                info = yield from load_replicas(k, req.name, dep, ctx)
                k.models[req.name] = dep   # (replaces an unavailable one of the same name)
            k.journal.record_deploy(req.name, dataclasses.asdict(dep))
    yield common_pb2.DeployEvent(model=info)


def check_pp_steps(req: Any) -> None:
    if req.pp_steps and req.pp <= 1:
        raise SyscallError("INVALID_ARGUMENT", "pp_steps is for a model deployed in pipeline "
                           "stages; add --pp, or drop --pp-steps")
    if req.pp_steps > max(1, req.pp):
        raise SyscallError("INVALID_ARGUMENT", f"pp_steps={req.pp_steps} but the model has "
                           f"{req.pp} stages: at most {req.pp} steps are in flight at once")


def check_replicas(k: Kernel, req: Any) -> int:
    """How many replicas a Deploy asks for; refused when the host cannot give each a core
    (nodes: each host its replicas, kernel/nodes.py). A tp/pp model with replicas > 1 and
    nodes has each replica's ranks on its host; with one replica nodes names each rank's."""
    n = max(1, req.replicas)
    if req.nodes and (req.tp > 1 or req.pp > 1) and n == 1:
        return 1   # one replica; nodes names each tp×pp rank's host (kernel/node_ranks.py)
    if req.nodes and req.nodes[0] != "anywhere" and req.replicas <= 1:
        n = len(req.nodes)   # one replica per host named
    cores = replicas.host_cores()
    here = n if not req.nodes else k.nodes.placement(list(req.nodes), n).count("")
    if here > cores:
        raise SyscallError("INVALID_ARGUMENT", f"replicas={n} but this host has {cores} cores, "
                           f"which the replicas share; deploy with --replicas {cores} or fewer")
    return n


_DEPLOYING = threading.Lock()   # guards the kernel's set of names being deployed


@contextlib.contextmanager
def deploying(k: Kernel, name: str) -> Iterator[None]:
    """One deploy of a name at a time, held until its model is kept or its load cleaned up."""
    with _DEPLOYING:
        names = k.__dict__.setdefault("deploying", set())   # kernel.py is the lead's
        if name in names:
            raise SyscallError("ALREADY_EXISTS", f"a deploy of {name!r} is under way; wait for "
                               "it to end or choose another name")
        names.add(name)
    try:
        yield
    finally:
        with _DEPLOYING:
            names.discard(name)


def load_replicas(k: Kernel, name: str, dep: Deployed,
                  ctx: Any) -> Generator[common_pb2.DeployEvent, None, common_pb2.ModelInfo]:
    """Load the model into each replica's service (replica 0's progress is relayed), each with
    its own KV pool; the pagers are attached once all are loaded. A deploy that stops part way
    leaves no replica loaded."""
    infos: list[common_pb2.ModelInfo] = []
    pagers: dict[str, Any] = {}
    try:
        for r in range(dep.replicas):
            infos.append((yield from load_events(k, name, dep, r, ctx)))
            pagers[replicas.lane(name, r)] = k.new_pager(name, replicas.stub(k, name, r, dep))
    except BaseException:   # a caller gone too (GeneratorExit)
        for r in range(len(infos)):
            abandon(k, name, r, dep)
        raise
    k.pagers.update(pagers)
    infos[0].replicas = dep.replicas
    return infos[0]


# The service's own answer about the load; other codes mean the call was cut short.
CUT_SHORT = (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.UNAVAILABLE)


def load_events(k: Kernel, name: str, dep: Deployed, replica: int, ctx: Any
                ) -> Generator[common_pb2.DeployEvent, None, common_pb2.ModelInfo]:
    """Relay one replica's LoadModelStream (the progress of replica 0 only: one bar); returns
    the loaded model. A load stopped short of that (a caller gone, a deadline, an error here)
    is abandoned: nothing stays loaded."""
    left = ctx.time_remaining()   # the caller's deadline bounds the load (600 s without one)
    request = load_request(name, dep, replicas.threads(k, replicas.local_span(dep)))
    if replica == 0:   # its tp/pp ranks on nodes, if any
        request = k.nodes.ranks.prepare(name, dep, request)
    if replicas.host(dep, replica):   # a node's share of its cores
        request.threads = k.nodes.nodes[replicas.host(dep, replica)].cores() // max(
            1, dep.nodes.count(replicas.host(dep, replica)))
    call = replicas.stub(k, name, replica, dep).LoadModelStream(
        request, timeout=min(600.0, left) if left is not None else 600.0)
    if not ctx.add_callback(call.cancel):   # the caller going away stops the load
        call.cancel()
    model, kept, answered = None, False, False
    try:
        for event in call:
            if event.HasField("model"):   # the last message
                model = event.model
                break
            if replica == 0:
                yield event
        if model is None:
            raise SyscallError("INTERNAL", f"the inference service ended the load of "
                               f"{name} without its model")
        if not ctx.is_active():
            raise gone(ctx)
        kept = True
        return model
    except grpc.RpcError as e:
        answered = model is None and e.code() not in CUT_SHORT   # the service's own refusal
        if not ctx.is_active():
            raise gone(ctx) from None
        raise downstream(e, "deploying failed") from None
    finally:
        if not (kept or answered):
            call.cancel()
            abandon(k, name, replica, dep)


def gone(ctx: Any) -> SyscallError:
    left = ctx.time_remaining()
    if left is not None and left <= 0:
        return SyscallError("DEADLINE_EXCEEDED", "the caller's deadline passed; nothing was "
                            "deployed (raise the timeout)")
    return SyscallError("CANCELLED", "the caller went away; nothing was deployed")


ABANDON_TIMEOUT = 180.0   # the service waits up to 120 s for a cancelled load to stop


def abandon(k: Kernel, name: str, replica: int = 0, dep: Deployed | None = None) -> None:
    """Leave nothing of a load the kernel gave up on in the (replica's) inference service."""
    try:
        replicas.stub(k, name, replica, dep).UnloadModel(inference_pb2.UnloadModelRequest(
            name=name, abandoned=True), timeout=ABANDON_TIMEOUT)
    except (grpc.RpcError, SyscallError) as e:   # a service gone lost the load with itself
        log.warning("abandon_failed", model=name, replica=replica, error=str(e))


def sys_undeploy(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.UndeployResponse:
    model_or_404(k, req.name)
    users = [p.pid for p in k.table.live() if p.model == req.name]
    if users:
        raise SyscallError("FAILED_PRECONDITION", f"{req.name} is used by running processes "
                           f"{users[:10]}; kill them or wait for them first")
    if k.models[req.name].remote_url:   # nothing was loaded in the inference service
        return undeploy_remote(k, req.name)
    try:
        k.inference().UnloadModel(inference_pb2.UnloadModelRequest(name=req.name), timeout=60)
    except grpc.RpcError as e:
        raise downstream(e, "undeploying failed") from None
    n = replicas.count(k, req.name)
    dep = k.models.pop(req.name, None)
    for r in range(n):
        k.pagers.pop(replicas.lane(req.name, r), None)
    k.journal.record_undeploy(req.name)
    for r in range(1, n):   # a replica that is down holds nothing
        abandon(k, req.name, r, dep)
    replicas.retire_unused(k)
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
            last_exit=svc.last_exit, replicas=local_lanes(k, svc.spec.name)))
        out += local_ranks(svc.spec.name, svc.pid)
    return kernel_pb2.ServicesResponse(services=[*out, *k.nodes.services(admin)],
                                       nodes=k.nodes.infos(admin))


def local_ranks(service: str, pid: int) -> list[kernel_pb2.ServiceInfo]:
    """The tp/pp worker ranks an inference service of this host started, as rank.MODEL.R."""
    r = replicas.replica_of_service(service)
    if r is None or not pid:
        return []
    return [kernel_pb2.ServiceInfo(name=f"rank.{model}.{rank}", pid=rank_pid, state="RUNNING",
                                   replicas=[replicas.lane(model, r)])
            for model, rank, rank_pid in rank_procs.child_ranks(pid)]


def local_lanes(k: Kernel, service: str) -> list[str]:
    """The model replicas a service of this host holds ("name@r")."""
    r = replicas.replica_of_service(service)
    if r is None:
        return []
    return [f"{m}@{r}" for m, dep in list(k.models.items())
            if r < max(1, dep.replicas) and not replicas.host(dep, r) and not dep.remote_url]



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


# --- shared KV segments (syscalls 25-27) ------------------------------------------------------

SHM_READY_TIMEOUT = 600.0


def sys_shm_create(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.ShmInfo:
    """Compute the prefix once (a holder job that only prefills), then pin it."""
    usable_model(k, req.model)
    tok = tokenize(k, kernel_pb2.SpawnRequest(model=req.model, prompt=req.text))
    if len(tok.token_ids) >= tok.context_length:
        raise SyscallError("INVALID_ARGUMENT", f"the segment is {len(tok.token_ids)} tokens; "
                           f"{req.model} holds at most {tok.context_length - 1}")
    fits_pool(k, req.model, len(tok.token_ids), ident)
    with k.table.lock:
        holder = k.table.spawn(user=ident.user, uid=ident.uid, ppid=0, model=req.model, nice=0,
                               name=f"shm:{req.name}", prompt_ids=list(tok.token_ids),
                               sampling=common_pb2.SamplingParams(), max_tokens=1,
                               context_length=tok.context_length, input_open=True)
        seg = Segment(req.name, ident.user, req.mode, list(req.members), req.model, req.text,
                      holder)
        try:
            k.segments.create(seg)
        except SyscallError:
            k.executor.end(holder, Exit.KILLED, 0, "segment name taken")
            raise
    k.executor.wake()
    deadline = time.monotonic() + SHM_READY_TIMEOUT
    with k.table.changed:
        while not k.segments.ready(seg):
            if holder.state in ENDED or not ctx.is_active() or time.monotonic() > deadline:
                k.segments.remove(seg)
                raise SyscallError("UNAVAILABLE", f"segment {req.name!r} was not computed: "
                                   f"{holder.exit_message or 'gave up'}")
            k.table.changed.wait(0.5)
        return k.segments.info(seg)


def sys_shm_remove(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.ShmInfo:
    with k.table.lock:
        seg = k.segments.get(req.name, ident.user, is_admin(ident))
        if seg.owner != ident.user and not is_admin(ident):
            raise SyscallError("PERMISSION_DENIED", f"segment {req.name!r} belongs to "
                               f"{seg.owner}; only its owner or an admin removes it")
        k.segments.remove(seg)
        return k.segments.info(seg)


def sys_shm_list(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.ShmListResponse:
    with k.table.lock:
        segs = [k.segments.info(s) for s in k.segments.by_name.values()
                if s.may_attach(ident.user, is_admin(ident))]
    return kernel_pb2.ShmListResponse(segments=segs)
# --- metrics ----------------------------------------------------------------------------------

def sys_metrics(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.MetricsResponse:
    from llmasos.kernel import metrics  # prometheus_client loads only when first scraped
    return kernel_pb2.MetricsResponse(text=metrics.exposition(k))
# --- model aliases ----------------------------------------------------------------------------
# A name that stands for a deployed model (`alias gpt3 smollm2-135m`), resolved at Spawn, so it
# can be repointed without touching clients. Kept in <home>/aliases.json across restarts.

def aliases_path(k: Kernel) -> str:
    return os.path.join(k.cfg.home, "aliases.json")


def aliases(k: Kernel) -> dict[str, str]:
    """name -> target, read from disk on first use."""
    table = getattr(k, "model_aliases", None)  # not in Kernel.__init__: kernel.py is the lead's
    if table is None:
        table = {}
        with contextlib.suppress(FileNotFoundError, ValueError), \
                open(aliases_path(k), encoding="utf-8") as f:
            table = {str(n): str(t) for n, t in json.load(f).items()}
        k.model_aliases = table
    return table


def resolve_model(k: Kernel, req: Any) -> None:
    """Replace an aliased req.model by its target; a deployed model's own name always wins."""
    target = aliases(k).get(req.model)
    if target is None or req.model in k.models:
        return
    if target not in k.models:
        raise SyscallError("NOT_FOUND", f"{req.model!r} is an alias of {target!r}, which is not "
                           f"deployed; repoint it with `alias {req.model} MODEL`")
    req.model = target


def sys_alias(k: Kernel, ident: Identity, req: Any, ctx: Any) -> kernel_pb2.AliasResponse:
    table = aliases(k)
    if not req.target:
        if table.pop(req.name, None) is None:
            raise SyscallError("NOT_FOUND", f"no alias {req.name!r}")
    else:
        if req.name in k.models:
            raise SyscallError("ALREADY_EXISTS", f"{req.name!r} is a deployed model's name; "
                               "choose another alias name")
        model_or_404(k, req.target)
        table[req.name] = req.target
    tmp = aliases_path(k) + f".tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(table, f)
    os.replace(tmp, aliases_path(k))  # atomic: a crash never leaves half a file
    return kernel_pb2.AliasResponse()


# --- hosted models (kernel/remote_jobs.py) ----------------------------------------------------
# A deployment that names an OpenAI-compatible endpoint: nothing is loaded, no pager; its jobs
# are streamed by RemoteJobs. Only where the key is read from is kept, never the key.

def deploy_remote(k: Kernel, req: Any) -> common_pb2.ModelInfo:
    key_file = os.path.abspath(os.path.expanduser(req.api_key_file)) if req.api_key_file else ""
    check_key_source(req.api_key_env, key_file)
    dep = Deployed("", "", remote_url=req.remote_url, api_key_env=req.api_key_env,
                   api_key_file=key_file, remote_model=req.remote_model or req.name)
    k.models[req.name] = dep   # replaces an unavailable one
    k.pagers.pop(req.name, None)
    k.journal.record_deploy(req.name, dataclasses.asdict(dep))
    return remote_info(req.name, dep)


def check_key_source(env_var: str, key_file: str) -> None:
    """The key must be readable by llmosd now; it is read again at each request."""
    from llmasos.drivers.remote.client import RemoteError, load_api_key
    if env_var and not os.environ.get(env_var):
        raise SyscallError("FAILED_PRECONDITION", f"{env_var} is not set in llmosd's "
                           f"environment; restart llmosd with {env_var}=KEY, or deploy with "
                           "--api-key-file FILE (mode 0600)")
    if key_file and not os.path.isfile(key_file):
        raise SyscallError("FAILED_PRECONDITION", f"{key_file} does not exist; write the key "
                           "there (chmod 600) or deploy with --api-key-env VAR")
    try:
        load_api_key(env_var, key_file)   # checks the file's mode; the value is dropped
    except RemoteError as e:
        raise SyscallError("FAILED_PRECONDITION", str(e)) from None
    except OSError as e:
        raise SyscallError("FAILED_PRECONDITION", f"cannot read {key_file}: {e.strerror}; "
                           "make it readable by llmosd's user (mode 0600)") from None


def remote_info(name: str, dep: Deployed) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(name=name, source=dep.remote_url, architecture="remote",
                                device="remote")


def remote_infos(k: Kernel) -> list[common_pb2.ModelInfo]:
    return [remote_info(n, d) for n, d in list(k.models.items()) if d.remote_url]


def undeploy_remote(k: Kernel, name: str) -> kernel_pb2.UndeployResponse:
    k.models.pop(name, None)
    k.journal.record_undeploy(name)
    return kernel_pb2.UndeployResponse()


def spawn_remote(k: Kernel, ident: Identity, req: Any) -> kernel_pb2.SpawnResponse:
    """A job of a hosted model: no tokenizing, no KV; the prompt is kept as text."""
    if req.stdin_pid or req.shm or req.n > 1:
        raise SyscallError("INVALID_ARGUMENT", f"{req.model} is a hosted model: its jobs take "
                           "a prompt or messages alone (no pipe input, KV segment or n > 1)")
    errors = sampling_errors(req.sampling, None)
    if errors:
        raise SyscallError("INVALID_ARGUMENT", f"{errors[0]} ({req.model})")
    max_tokens = req.sampling.max_tokens if req.sampling.HasField("max_tokens") \
        else DEFAULT_MAX_TOKENS
    check_stdout_mailbox(k, ident, req.stdout_mailbox)
    with k.table.lock, k.journal.batch():
        jobs, tokens = quota.in_flight(k.table.live(), ident.user)
        quota.check_spawn(ident, jobs, tokens, max_tokens, 1)
        proc = k.table.spawn(user=ident.user, uid=ident.uid, ppid=0, model=req.model,
                             nice=req.nice, name=req.name, prompt_ids=[],
                             prompt_text=remote_prompt(req), sampling=req.sampling,
                             max_tokens=max_tokens, context_length=0,
                             stdout_mailbox=req.stdout_mailbox,
                             ignore_sigpipe=req.ignore_sigpipe)
        k.table.set_state(proc, State.READY)
        k.journal.record_spawn(proc)
        k.remote.start(proc)
    return kernel_pb2.SpawnResponse(pid=proc.pid, pids=[proc.pid])


def remote_prompt(req: Any) -> str:
    """A prompt as is; chat messages as "role: content" lines and an open assistant turn (the
    endpoint's /v1/completions has no chat template)."""
    if req.WhichOneof("input") == "prompt":
        return req.prompt
    lines = [f"{m.role}: {m.content}" for m in req.messages.messages]
    return "\n".join([*lines, "assistant:"])
