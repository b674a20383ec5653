"""tp/pp ranks on nodes, the head's side. A model deployed with `--tp/--pp` and `--nodes`
names one host per rank (Deployed.ranks, "" for this one; rank 0 always here: it is the one the
kernel steps, in the head's inference service, services/inference/parallel.py).

    load       before each load of such a model (deploy, or the head's inference service
               restarting) the kernel picks a free port on the head's address toward the
               nodes for the group's c10d store and puts it in the LoadModelRequest with the
               ranks the nodes start; the group's plan is kept here
    heartbeat  each node's reply lists its ranks of the current plans (WantedRank); the agent
               starts services/inference/rank.py for each, gloo bound to the node's address,
               and kills the ranks no longer listed
    loss       a node holding ranks is LOST: the head's inference service is killed, not left
               in a collective for COLLECTIVE_TIMEOUT; the supervisor restarts it and every
               other model's jobs are recomputed; the model's plan is dropped and its jobs wait
               READY (no pager) until the node is LIVE again, then its group is loaded anew
               (a new port, new ranks) and its jobs are recomputed there
    failure    a node's rank that exits non-zero (it could not start or load, or its group
               broke) is treated the same way but for the waiting: rank 0 may be in the
               rendezvous for it, so the head's service is restarted and the model loaded anew
               (a deploy under way fails instead, UNAVAILABLE)
    guard      a restart happens only while the service is still the incarnation a plan was
               made for: ranks of a group already gone never take down its successor
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from llmasos.kernel import replicas
from llmasos.proto import inference_pb2, node_pb2
from llmasos.syscalls import SyscallError

if TYPE_CHECKING:
    from llmasos.kernel.kernel import Deployed, Kernel

log = structlog.get_logger()
HEAD = "head"
ANYWHERE = "anywhere"


@dataclass(frozen=True)
class RankPlan:
    """One load of a model's rank group: where its store listens and each rank's host."""

    model: str
    store: str               # HOST:PORT on the head
    hosts: tuple[str, ...]   # per rank; "" for the head
    incarnation: int = 0     # of the head's inference service that holds rank 0

    def key(self, rank: int) -> str:
        return f"{self.model}/{self.store.rpartition(':')[2]}/{rank}"

    def wanted(self, node: str) -> list[node_pb2.WantedRank]:
        return [node_pb2.WantedRank(key=self.key(r), model=self.model, rank=r,
                                    world=len(self.hosts), store=self.store)
                for r, h in enumerate(self.hosts) if h == node]


def route_to(host: str) -> str:
    """This machine's address on the route to host (sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return s.getsockname()[0]


def free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def placement(k: Kernel, asked: list[str], world: int) -> list[str]:
    """One host per rank ("" for the head) from a Deploy's `nodes`; refusals name why."""
    if asked == [ANYWHERE]:
        hosts = ["", *k.nodes.live()]
        return [hosts[r % len(hosts)] for r in range(world)]
    if ANYWHERE in asked:
        raise SyscallError("INVALID_ARGUMENT", f"{ANYWHERE!r} stands alone in nodes")
    if len(asked) != world:
        raise SyscallError("INVALID_ARGUMENT", f"nodes lists {len(asked)} hosts for {world} "
                           "tp×pp ranks; name one host per rank, rank 0 first (e.g. --tp 3 "
                           "--nodes head,n1,n1), or 'anywhere'")
    out = ["" if h == HEAD else h for h in asked]
    if out[0]:
        raise SyscallError("FAILED_PRECONDITION", "rank 0 runs on the head (the kernel steps "
                           f"it); list {HEAD!r} first")
    for host in sorted({h for h in out if h}):
        state = k.nodes.state(host)
        if state is None:
            raise SyscallError("INVALID_ARGUMENT", f"no node named {host!r} has joined "
                               "(see `llmsh nodes`)")
        if state != "LIVE":
            raise SyscallError("FAILED_PRECONDITION", f"node {host!r} is {state}; deploy on "
                               "live nodes only")
    return out


class Ranks:
    """The current rank plan of each model whose ranks run on nodes."""

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.plans: dict[str, RankPlan] = {}
        self.lock = threading.Lock()
        self.returning: set[str] = set()   # models a thread is loading again
        self.waiting: set[str] = set()     # models not loaded for a node that is away

    def prepare(self, name: str, dep: Deployed,
                request: inference_pb2.LoadModelRequest) -> inference_pb2.LoadModelRequest:
        """Fill in where the ranks go and keep the plan; FAILED_PRECONDITION when a node
        holding ranks is not LIVE (the model waits for it)."""
        hosts = list(getattr(dep, "ranks", None) or [])
        if not any(hosts):
            return request
        nodes = sorted({h for h in hosts if h})
        down = [h for h in nodes if self.k.nodes.state(h) != "LIVE"]
        if down:
            with self.lock:
                self.plans.pop(name, None)
                self.waiting.add(name)
            raise SyscallError("FAILED_PRECONDITION", f"model {name!r} has ranks on node(s) "
                               f"{down}, which are not live; it waits for them")
        address = route_to(self.k.nodes.host_of(nodes[0]))
        port = free_port(address)
        plan = RankPlan(name, f"{address}:{port}", tuple(hosts), self._incarnation())
        with self.lock:
            self.plans[name] = plan
            self.waiting.discard(name)
        request.rank_address, request.rendezvous_port = address, port
        request.remote_ranks.extend(r for r, h in enumerate(hosts) if h)
        log.info("ranks_placed", model=name, store=plan.store, hosts=hosts)
        return request

    def wanted(self, node: str) -> list[node_pb2.WantedRank]:
        """The ranks the node should run: those of plans whose model is deployed or deploying."""
        live = set(self.k.models) | set(self.k.__dict__.get("deploying", ()))
        with self.lock:
            for gone in [m for m in self.plans if m not in live]:
                del self.plans[gone]
            return [w for plan in self.plans.values() for w in plan.wanted(node)]

    def on(self, node: str) -> list[str]:
        """The models with ranks placed on the node."""
        return [m for m, dep in list(self.k.models.items())
                if node in (getattr(dep, "ranks", None) or [])]

    def node_lost(self, node: str) -> None:
        """(nodes lock held) Rank 0 of a group with ranks there would sit in a collective:
        restart the head's inference service now; the models wait for the node (module doc)."""
        models = self.on(node)
        with self.lock:
            plans = [self.plans.pop(m) for m in models if m in self.plans]
        if models:
            self._restart(plans, "ranks_lost_restarting_inference", node=node, models=models)

    def exited(self, node: str, reported: list[node_pb2.NodeRank]) -> None:
        """(nodes lock held) A rank of a current group failed on the node (it did not start,
        or its group broke): rank 0 may wait for it in the rendezvous, so its service is
        restarted and the model loaded again (a rank that exits 0 was told to)."""
        failed = {r.key for r in reported if r.state == "EXITED" and r.exit_code != 0}
        if not failed:
            return
        with self.lock:
            broken = [p for p in self.plans.values()
                      if any(p.key(r) in failed for r, h in enumerate(p.hosts) if h == node)]
            for p in broken:
                del self.plans[p.model]
        if broken:
            self._restart(broken, "node_rank_failed_restarting_inference", node=node,
                          models=[p.model for p in broken])

    def _incarnation(self) -> int:
        svc = self.k.supervisor.services.get(replicas.INFERENCE)
        return svc.incarnation if svc is not None else 0

    def _restart(self, plans: list[RankPlan], event: str, **why: object) -> None:
        """Kill the head's inference service (its supervisor restarts it) if it is still the
        incarnation that holds these groups' rank 0."""
        svc = self.k.supervisor.services.get(replicas.INFERENCE)
        pid = svc.pid if svc is not None else 0
        if not pid or svc.incarnation not in {p.incarnation for p in plans}:
            return
        log.warning(event, pid=pid, incarnation=svc.incarnation, **why)
        os.kill(pid, signal.SIGKILL)

    def node_back(self, node: str) -> None:
        """(nodes lock held) Load again, in the background, the models waiting for the node
        (those whose load found it away; the others load when the head's service starts)."""
        for m in self.on(node):
            if m not in self.waiting or m in self.returning:
                continue
            self.returning.add(m)
            threading.Thread(target=self._reload, args=(m,), daemon=True,
                             name=f"ranks-back-{m}").start()

    def _reload(self, name: str) -> None:
        from llmasos.kernel.kernel import load_request
        try:
            dep = self.k.models.get(name)
            if dep is None or any(self.k.nodes.state(h) != "LIVE" for h in dep.ranks if h):
                return
            stub = self.k.replica(0)
            loaded = {m.name for m in stub.ListModels(inference_pb2.ListModelsRequest(),
                                                      timeout=60).models}
            if name not in loaded:
                request = self.prepare(name, dep, load_request(name, dep,
                                                               replicas.threads(self.k)))
                stub.LoadModel(request, timeout=600)
            pager = self.k.new_pager(name, stub)
            if self.k.executor is not None:
                self.k.executor.lane_back(replicas.lane(name, 0), pager)
            else:
                self.k.pagers[replicas.lane(name, 0)] = pager
            log.info("ranks_back", model=name)
        except Exception as e:   # noqa: BLE001 - the next return of the node tries again
            log.error("ranks_back_failed", model=name, error=str(e))
        finally:
            self.returning.discard(name)
