"""Data parallelism: a model deployed with replicas=N runs as N copies, each its own inference
process with its own KV pool, and the kernel keeps one pager and one step in flight per copy.

    replica 0      the inference service              lane  "name"
    replica r > 0  the service inference.r            lane  "name@r"

A lane is the key of one replica's pager (model names never hold "@"); inference.r holds
replica r of every model deployed with more than r replicas. A job runs on the lane of its
model and its replica (Proc.replica, -1 until placed). The step loop places new jobs first:
the scheduler service picks a replica by load and by prefix-cache hits
(services/scheduler/placement.py); a model with one replica needs no call. n > 1 samples follow
their parent and a job attaching a KV segment follows the segment's holder (they share KV).

A replica whose process dies has its jobs moved (the step loop, kernel/executor.py): back to
READY with their tokens so far, unplaced, and placed again on a live replica where they are
recomputed (greedy output is the same); with no live replica they wait for the restarted one.
Replicas sharing a host split its cores: every inference process runs cores // N torch threads
for the largest N deployed.

A replica may run on a joined node (kernel/nodes.py): Deployed.nodes names each replica's host
("" for this one); stub() routes a lane to its host, and the services here serve only the
replicas placed here.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import structlog

from llmasos.kernel import devices
from llmasos.kernel.pending_io import RPC_ERRORS
from llmasos.kernel.proctable import Proc, State
from llmasos.kernel.supervisor import ServiceSpec
from llmasos.proto import scheduler_pb2
from llmasos.syscalls import SyscallError

if TYPE_CHECKING:
    from llmasos.kernel.kernel import Kernel

log = structlog.get_logger()
INFERENCE = "inference"
START_TIMEOUT = 300.0   # a replica's service starts before its model is loaded into it
ENDED = (State.ZOMBIE, State.REAPED)


def lane(model: str, replica: int) -> str:
    """The pager key of one replica of a model ("name@-" for a job not placed yet)."""
    if replica < 0:
        return f"{model}@-"
    return model if replica == 0 else f"{model}@{replica}"


def lane_of(proc: Proc) -> str:
    return lane(proc.model, proc.replica)


def slot_lane(key: str, slot: int) -> str:
    """The step loop's key for one slot of a lane: the lane itself for slot 0, "lane#s" for
    the others. Every slot of a lane shares the lane's pager and service."""
    return key if slot <= 0 else f"{key}#{slot}"


def slot_lane_of(proc: Proc) -> str:
    return slot_lane(lane_of(proc), proc.slot)


def base(key: str) -> str:
    """The lane a slot's key belongs to (the pager's key)."""
    return key.partition("#")[0]


def split(key: str) -> tuple[str, int]:
    """lane (or a slot of it) → (model, replica)."""
    model, _, r = base(key).partition("@")
    return model, (0 if not r else -1 if r == "-" else int(r))


def service_name(replica: int) -> str:
    return INFERENCE if replica == 0 else f"{INFERENCE}.{replica}"


def replica_of_service(name: str) -> int | None:
    """The replica index an inference service holds; None for the other services."""
    if name == INFERENCE:
        return 0
    head, _, r = name.partition(".")
    return int(r) if head == INFERENCE and r.isdigit() else None


def host_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        os.cpu_count() or 1


def depth(k: Kernel, model: str) -> int:
    """Steps of a model's replica in flight at once: for a pp model what its Deploy asked
    (pp_steps), else llmosd's pp_steps setting, else one per stage when its stages run on more
    than one host and one when they share this host's cores (measured there: two 4-row decode
    steps in flight took 1.12-1.27x one 8-row step in two runs, README); one for any other model."""
    dep = k.models.get(model)
    if dep is None or dep.pp <= 1:
        return 1
    spread = dep.pp if any(dep.ranks) else 1
    return max(1, min(dep.pp, dep.pp_steps or k.cfg.pp_steps or spread))


def count(k: Kernel, model: str) -> int:
    dep = k.models.get(model)
    return max(1, dep.replicas) if dep is not None else 1


def host(dep: object, replica: int) -> str:
    """The node a model's replica runs on ("" for this host)."""
    nodes = getattr(dep, "nodes", None) or []
    return nodes[replica] if replica < len(nodes) else ""


def host_of(k: Kernel, model: str, replica: int) -> str:
    return host(k.models.get(model), replica)


def local_span(dep: object) -> int:
    """How many of this host's inference services the model's replicas need (1 + the highest
    index placed here)."""
    return 1 + max((r for r in range(max(1, dep.replicas)) if not host(dep, r)), default=0)


def widest(k: Kernel) -> int:
    return max((local_span(d) for d in list(k.models.values())), default=1)


def stub(k: Kernel, model: str, replica: int, dep: object = None) -> object:
    """The inference stub holding a model's replica: a service here, or one on a node."""
    node = host(dep if dep is not None else k.models.get(model), replica)
    return k.nodes.stub(node, replica) if node else k.replica(replica)


def threads(k: Kernel, replicas: int = 1) -> int:
    """torch threads for every inference process (0: leave them as they are)."""
    n = max(widest(k), replicas)
    return max(1, host_cores() // n) if n > 1 else 0


def live_replicas(k: Kernel, model: str) -> list[int]:
    """The replicas of a model that can take jobs now (pager attached)."""
    return [r for r in range(count(k, model)) if lane(model, r) in k.pagers]


def any_pager(k: Kernel, model: str) -> object | None:
    """A pager of the model (every replica's pool has the same geometry)."""
    for r in range(count(k, model)):
        pager = k.pagers.get(lane(model, r))
        if pager is not None:
            return pager
    return None


def serving(k: Kernel, model: str) -> object:
    """An inference stub for the model's text calls (Tokenize): replica 0's service, or while it
    restarts another replica's."""
    if k.supervisor.channel(service_name(0)) is None:
        for r in [r for r in live_replicas(k, model) if r > 0]:
            return stub(k, model, r)
    return k.inference()


# --- the replicas' services -------------------------------------------------------------------

def gpu_env(replica: int, world: int, gpus: list[int], device: str) -> dict[str, str]:
    """Replica r's service sees every GPU, listed from position r·world on: its cuda:0 is its
    own GPU and its tp/pp ranks take the ones after it (parallel.rank_device), so R replicas
    of a model of world W on R·W GPUs share none. {} on the CPU or with fewer than 2 GPUs
    (replica 0, the inference service, sees them in their own order)."""
    if not device.startswith("cuda") or len(gpus) < 2:
        return {}
    start = (replica * max(1, world)) % len(gpus)
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus[start:] + gpus[:start])}


def spec(k: Kernel, replica: int, world: int = 1) -> ServiceSpec:
    """inference.r: the inference service without the embedded model, on its own GPUs."""
    main = k.supervisor.services[INFERENCE].spec
    gpus = [d.index for d in devices.gpus()] if k.cfg.device.startswith("cuda") else []
    return ServiceSpec(service_name(replica), {**main.options, "embedded": "0"},
                       main.start_timeout, module=INFERENCE,
                       env=gpu_env(replica, world, gpus, k.cfg.device))


def start_services(k: Kernel, replicas: int, world: int = 1) -> None:
    """Start (and wait for) the services inference.1 .. inference.{replicas-1}; before boot
    they only join the others (the journal's replicated models need them). world: the tp·pp
    ranks of the model they are started for (each replica's GPUs, gpu_env)."""
    for r in range(1, replicas):
        if not k.supervisor.add(spec(k, r, world), START_TIMEOUT):
            state = k.supervisor.services[service_name(r)].state
            raise SyscallError("UNAVAILABLE", f"the service {service_name(r)} for replica {r} "
                               f"is {state}; see `llm-ps --services` and llmosd's log")


def retire_unused(k: Kernel) -> None:
    """Stop the replica services no deployed model needs any more."""
    need = widest(k)
    for name in [n for n in list(k.supervisor.services) if (replica_of_service(n) or 0) >= need]:
        k.supervisor.retire(name)
        log.info("replica_service_retired", service=name)


# --- placement (the step loop, before each round) --------------------------------------------

def leader(k: Kernel, proc: Proc) -> Proc | None:
    """The job whose KV this one shares, and so whose replica it takes."""
    if proc.fork_pending:
        return k.table.get(proc.ppid)
    if proc.shm:
        seg = k.segments.by_name.get(proc.shm)
        return seg.holder if seg is not None else None
    return None


def place_new(k: Kernel) -> None:
    """Give every unplaced live job a replica; those of a replicated model are asked of the
    scheduler (one call per model). A job stays unplaced while none of its replicas is live."""
    asks: dict[str, list[Proc]] = {}
    with k.table.lock:
        for p in [p for p in k.table.live() if p.replica < 0]:
            if count(k, p.model) == 1:
                p.replica = 0
                continue
            lead = leader(k, p)
            if lead is not None and lead.state not in ENDED:
                if lead.replica >= 0 and lane(p.model, lead.replica) in k.pagers:
                    set_replica(k, p, lead.replica)
                if lead.replica < 0:
                    continue   # placed with its leader, next round
            if p.replica < 0:
                asks.setdefault(p.model, []).append(p)
        requests = {m: request(k, m, procs) for m, procs in asks.items()}
        place_slots(k)
    for model, req in requests.items():
        if not req.replicas:
            continue   # no live replica: they wait for one to come back
        try:
            reply = k.scheduler().Place(req, timeout=30)
        except RPC_ERRORS as e:   # the scheduler is restarting: placed next round
            log.warning("place_failed", model=model, error=str(e))
            continue
        with k.table.lock:
            for p, r in zip(asks[model], reply.replica, strict=False):
                if p.replica < 0 and p.state not in ENDED and lane(model, r) in k.pagers:
                    set_replica(k, p, r)
            place_slots(k)


def place_slots(k: Kernel) -> None:
    """Give each placed job of a pp model a slot of its replica, the one carrying the fewest
    (under the table lock). Each slot is a step in flight of its own, so with M stages up to
    M steps of different jobs are in the pipeline at once (vLLM's virtual engines); a job
    keeps its slot while it lives on that replica."""
    if all(depth(k, m) == 1 for m in list(k.models)):
        return   # no model has slots: nothing to look at
    load: dict[str, list[int]] = {}
    todo: list[Proc] = []
    for p in k.table.live():
        n = depth(k, p.model) if p.replica >= 0 else 1
        if n == 1:
            continue
        counts = load.setdefault(lane_of(p), [0] * n)
        if 0 <= p.slot < n:
            counts[p.slot] += 1
        else:
            todo.append(p)
    for p in todo:
        counts = load[lane_of(p)]
        p.slot = counts.index(min(counts))
        counts[p.slot] += 1


def set_replica(k: Kernel, proc: Proc, replica: int) -> None:
    proc.replica = replica
    k.journal.record_replica(proc)
    log.debug("job_placed", pid=proc.pid, model=proc.model, replica=replica)


def request(k: Kernel, model: str, procs: list[Proc]) -> scheduler_pb2.PlaceRequest:
    """Each live replica's load and each job's prefix hits there (under the table lock)."""
    live = live_replicas(k, model)
    pagers = [k.pagers[lane(model, r)] for r in live]
    jobs = {r: 0 for r in live}
    for p in k.table.live():
        if p.model == model and p.replica in jobs:
            jobs[p.replica] += 1
    return scheduler_pb2.PlaceRequest(
        replicas=[scheduler_pb2.ReplicaLoad(replica=r, live_jobs=jobs[r],
                                            free_blocks=pager.free_blocks)
                  for r, pager in zip(live, pagers, strict=True)],
        jobs=[scheduler_pb2.PlaceJob(pid=p.pid, cached_blocks=[
            pager.cached_blocks(p.user, p.tokens) for pager in pagers]) for p in procs])
