"""The kernel's state in one place: the process table, the supervised services, the deployed
models and their pagers. Handlers (handlers.py) and the step loop (executor.py) share it."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import grpc
import structlog

from llmasos.kernel.config import Config
from llmasos.kernel.pager import Pager
from llmasos.kernel.proctable import ProcessTable
from llmasos.kernel.supervisor import Service, ServiceSpec, Supervisor
from llmasos.proto import (
    inference_pb2,
    inference_pb2_grpc,
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
    quant: str = ""  # the recipe asked for at deploy ("" = the inference service's default)


class Kernel:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.table = ProcessTable(zombie_ttl=cfg.zombie_ttl)
        self.models: dict[str, Deployed] = {}
        self.pagers: dict = {}          # model name → Pager (kernel/pager.py)
        self.block_bytes: dict[str, int] = {}   # model name → bytes of one KV block
        self.draining = threading.Event()
        self.executor = None            # set by main (kernel/executor.py)
        specs = [
            ServiceSpec("security"),
            ServiceSpec("ipc"),
            ServiceSpec("scheduler", {"policy": cfg.policy}),
            ServiceSpec("inference", {"embedded": "1" if cfg.embedded else "0",
                                      "kv_budget_mb": str(cfg.kv_budget_mb),
                                      "device": cfg.device, "quant": cfg.quant}),
        ]
        self.supervisor = Supervisor(specs, cfg.home, cfg.restart_max, cfg.restart_window,
                                     on_start=self._service_started)

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

    def scheduler(self) -> scheduler_pb2_grpc.SchedulerStub:
        return scheduler_pb2_grpc.SchedulerStub(self.channel("scheduler"))

    # --- service (re)starts --------------------------------------------------------------

    def _service_started(self, svc: Service) -> None:
        if svc.spec.name == "inference":
            self._inference_started(svc)

    def _inference_started(self, svc: Service) -> None:
        """A new incarnation has empty KV memory: reset the pagers, redeploy, recompute."""
        stub = inference_pb2_grpc.InferenceStub(svc.channel)
        loaded = {m.name: m for m in stub.ListModels(inference_pb2.ListModelsRequest(),
                                                     timeout=60).models}
        for name, dep in list(self.models.items()):
            if name not in loaded and not dep.embedded:
                loaded[name] = stub.LoadModel(inference_pb2.LoadModelRequest(
                    name=name, path=dep.path, dtype=dep.dtype, quant=dep.quant), timeout=600)
        for name, info in loaded.items():
            if name not in self.models:   # loaded by the service itself at start
                self.models[name] = Deployed(info.source, info.dtype, embedded=True)
            self.attach_pager(name, stub)
        if self.executor is not None:
            self.executor.inference_restarted(svc.incarnation)

    def attach_pager(self, name: str, stub: inference_pb2_grpc.InferenceStub) -> None:
        geo = stub.Geometry(inference_pb2.GeometryRequest(model=name), timeout=30)
        self.pagers[name] = Pager(geo.num_blocks, geo.block_size)
        self.block_bytes[name] = geo.block_bytes
        log.info("pager_attached", model=name, blocks=geo.num_blocks, block_size=geo.block_size,
                 block_bytes=geo.block_bytes)
