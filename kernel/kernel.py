"""The kernel's state in one place: the process table, the supervised services, the deployed
models and their pagers. Handlers (handlers.py) and the step loop (executor.py) share it."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import grpc
import structlog

from llmasos.kernel import replicas
from llmasos.kernel.config import Config
from llmasos.kernel.journal import Journal, NoJournal
from llmasos.kernel.nodes import Nodes
from llmasos.kernel.pager import Pager
from llmasos.kernel.proctable import ProcessTable
from llmasos.kernel.segments import Segments
from llmasos.kernel.supervisor import Service, ServiceSpec, Supervisor
from llmasos.proto import (
    inference_pb2,
    inference_pb2_grpc,
    ipc_pb2_grpc,
    scheduler_pb2_grpc,
)
from llmasos.syscalls import SyscallError

log = structlog.get_logger()


@dataclass
class Deployed:
    """What the kernel must redeploy if the inference service restarts."""

    path: str
    dtype: str
    embedded: bool = False
    tp: int = 0              # tensor-parallel ranks, passed through to the inference service
    pp: int = 0              # pipeline stages, likewise
    pp_steps: int = 0        # a pp model's steps in flight per replica (0: replicas.depth's rule)
    error: str = ""          # set when a redeploy failed: the model is unavailable until
                             # it is deployed again
    quant: str = ""  # the recipe asked for at deploy ("" = the inference service's default)
    remote_url: str = ""     # a hosted model (kernel/remote_jobs.py): no weights, no pager
    api_key_env: str = ""    # where its key is read at request time; never the key itself
    api_key_file: str = ""
    remote_model: str = ""   # the name the endpoint knows it by
    replicas: int = 1        # copies, each its own inference process and pager (replicas.py)
    nodes: list[str] = field(default_factory=list)   # each replica's host ("" here; nodes.py)
    ranks: list[str] = field(default_factory=list)   # each tp/pp rank's host (node_ranks.py)


class Kernel:
    """Shared state, and what guards it (no lock is ever held across an RPC):

    table        ProcessTable; its own lock guards the table, every Proc and the pagers'
                 contents (the step loop and handlers take it to decide and record only)
    pagers       lane → Pager (a lane is one replica of a model: kernel/replicas.py); the
                 dict is replaced entry-wise (atomic under the GIL) by
                 deploys and inference restarts; a Pager is used under table.lock
    models       model → Deployed; written by Deploy/Undeploy and inference (re)starts
    kv_share     user → fraction of each model's pool its jobs may hold (quota), under
                 table.lock
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.table = ProcessTable(zombie_ttl=cfg.zombie_ttl)
        self.models: dict[str, Deployed] = {}
        self.pagers: dict = {}          # lane → Pager (kernel/pager.py, kernel/replicas.py)
        self.block_bytes: dict[str, int] = {}   # model name → bytes of one KV block
        self.kv_share: dict[str, float] = {}
        self.draining = threading.Event()
        self.executor = None            # set by main (kernel/executor.py)
        self.pipes = None               # set by main (kernel/pipes.py)
        self.segments = Segments(self)  # named KV segments (kernel/segments.py)
        self.journal: Journal | NoJournal = NoJournal()   # set by main (kernel/journal.py)
        self.remote = None              # set by main (kernel/remote_jobs.py)
        self.nodes = Nodes(self)        # joined machines and their replicas (kernel/nodes.py)
        specs = [
            ServiceSpec("security"),
            ServiceSpec("ipc"),
            ServiceSpec("scheduler", {"policy": cfg.policy}),
            ServiceSpec("inference", {"embedded": "1" if cfg.embedded else "0",
                                      "kv_budget_mb": str(cfg.kv_budget_mb),
                                      "device": cfg.device, "quant": cfg.quant}),
        ]
        self.supervisor = Supervisor(specs, cfg.home, cfg.restart_max, cfg.restart_window,
                                     on_start=self._service_started,
                                     on_exit=self._service_died)

    # --- reaching services ---------------------------------------------------------------

    def channel(self, name: str) -> grpc.Channel:
        chan = self.supervisor.channel(name)
        if chan is None:
            state = self.supervisor.services[name].state
            raise SyscallError("UNAVAILABLE", f"the {name} service is {state}; "
                               + ("see `llm-ps --services`" if state == "FAILED"
                                  else "retry shortly"))
        return chan

    def inference(self) -> inference_pb2_grpc.InferenceStub:
        return inference_pb2_grpc.InferenceStub(self.channel("inference"))

    def replica(self, index: int) -> inference_pb2_grpc.InferenceStub:
        """The inference service that holds replica `index` of the models (kernel/replicas.py)."""
        if index == 0:
            return self.inference()
        return inference_pb2_grpc.InferenceStub(self.channel(replicas.service_name(index)))

    def scheduler(self) -> scheduler_pb2_grpc.SchedulerStub:
        return scheduler_pb2_grpc.SchedulerStub(self.channel("scheduler"))

    def ipc(self) -> ipc_pb2_grpc.IpcStub:
        return ipc_pb2_grpc.IpcStub(self.channel("ipc"))

    # --- service (re)starts --------------------------------------------------------------

    def _service_started(self, svc: Service) -> None:
        replica = replicas.replica_of_service(svc.spec.name)
        if replica is not None:
            self._inference_started(svc, replica)

    def _service_died(self, svc: Service) -> None:
        """A replica's process is gone: the step loop moves its jobs to the live replicas."""
        replica = replicas.replica_of_service(svc.spec.name)
        if replica is not None and self.executor is not None:
            self.executor.replica_died(replica)

    def _inference_started(self, svc: Service, replica: int = 0) -> None:
        """A new incarnation has empty KV memory: redeploy, attach fresh pagers, recompute. A
        model that cannot be redeployed (its file moved) ends its jobs with the reason and is
        unavailable until deployed again (a replica of it: its jobs run on the others); the
        service itself is healthy."""
        stub = inference_pb2_grpc.InferenceStub(svc.channel)
        loaded = {m.name: m for m in stub.ListModels(inference_pb2.ListModelsRequest(),
                                                     timeout=60).models}
        lost: dict[str, str] = {}
        for name, dep in list(self.models.items()):
            if name in loaded or dep.embedded or dep.error or dep.remote_url or \
                    replica >= max(1, dep.replicas) or replicas.host(dep, replica):
                continue
            try:
                request = self.nodes.ranks.prepare(name, dep, load_request(
                    name, dep, replicas.threads(self)))
            except SyscallError as e:   # its ranks' node is lost: its jobs wait for it
                log.warning("model_waits_for_nodes", model=name, reason=e.message)
                continue
            try:
                loaded[name] = stub.LoadModel(request, timeout=600)
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise   # the service died again: a failed start, retried by the supervisor
                lost[name] = (f"model {name!r} could not be redeployed after the inference "
                              f"service restarted: {e.details()}; deploy it again")
        for name in loaded:
            if name not in self.models:   # loaded by the service itself at start
                self.models[name] = Deployed(loaded[name].source, loaded[name].dtype,
                                             embedded=True)
        fresh = {replicas.lane(name, replica): self.new_pager(name, stub) for name in loaded}
        for name in list(lost):   # a replica of a model others still serve: only it is out
            if [r for r in replicas.live_replicas(self, name) if r != replica]:
                log.error("replica_unavailable", model=name, replica=replica, reason=lost.pop(name))
        for name, why in lost.items():
            self.models[name].error = why
            self.pagers.pop(name, None)
            log.error("model_unavailable", model=name, reason=why)
        if self.executor is None:
            self.pagers.update(fresh)
            return
        self.executor.replica_restarted(replica, svc.incarnation, fresh)
        for name, why in lost.items():
            self.executor.model_lost(name, why)

    def kv_limits(self, lane: str, users: set[str]) -> dict[str, int]:
        """Blocks of this replica's pool each user's jobs may hold (users under a quota only)."""
        pager = self.pagers.get(lane)
        if pager is None:
            return {}
        model = replicas.split(lane)[0]
        return {u: max(0, int(pager.num_blocks * self.kv_share[u])
                       - self.segments.held_blocks(u, model))   # its segments count too
                for u in users if self.kv_share.get(u, 1.0) < 1.0}

    def lanes(self) -> list[str]:
        """Every replica of every deployed model, as its pager's key (kernel/replicas.py)."""
        return [replicas.lane(name, r) for name, dep in list(self.models.items())
                for r in range(max(1, dep.replicas))]

    def attach_pager(self, name: str, stub: inference_pb2_grpc.InferenceStub,
                     replica: int = 0) -> None:
        self.pagers[replicas.lane(name, replica)] = self.new_pager(name, stub)

    def new_pager(self, name: str, stub: inference_pb2_grpc.InferenceStub) -> Pager:
        """A pager over the model's KV pool in the service behind stub."""
        geo = stub.Geometry(inference_pb2.GeometryRequest(model=name), timeout=30)
        self.block_bytes[name] = geo.block_bytes
        log.info("pager_attached", model=name, blocks=geo.num_blocks, block_size=geo.block_size,
                 block_bytes=geo.block_bytes)
        return Pager(geo.num_blocks, geo.block_size)


def load_request(name: str, dep: Deployed, threads: int) -> inference_pb2.LoadModelRequest:
    return inference_pb2.LoadModelRequest(name=name, path=dep.path, dtype=dep.dtype,
                                          quant=dep.quant, tp=dep.tp, pp=dep.pp, threads=threads)
