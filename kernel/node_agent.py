"""The node agent: `llmosd node --join HOST:PORT --token T` offers this machine to a head llmosd
(kernel/nodes.py is the head's side; proto/node.proto the calls).

    join       with the join token the head's admin made (`llmosd node token`); the head
               answers a session secret
    heartbeat  every heartbeat_s: this machine's devices (kernel/devices.py) and the services
               it runs; the reply lists the services the head wants here
    supervise  the wanted services run under a Supervisor of our own (kernel/supervisor.py):
               each listens on TCP at this node's address and answers only calls carrying the
               session secret; crashed ones restart with backoff, unwanted ones stop
    ranks      the tp/pp worker ranks the reply lists (a model whose rank 0 runs on the head,
               kernel/node_ranks.py) run as services/inference/rank.py processes of ours,
               gloo bound to this node's address; one that exits stays so (its group is broken:
               the head loads a new one, under new keys); those no longer listed are killed
    head lost  the services keep running while the head is unreachable; a head that no longer
               knows us (it restarted) is joined again with the same token

The head decides everything: this agent keeps no state of its own beyond its supervisor's
run directory (`--home`, default $LLMASOS_HOME or ~/.local/state/llmasos-node).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import structlog

from llmasos.connect import tls_credentials
from llmasos.kernel import devices, rank_procs
from llmasos.kernel.nodes import NODE_SECRET_KEY
from llmasos.kernel.supervisor import ServiceSpec, Supervisor
from llmasos.proto import kernel_pb2, node_pb2, node_pb2_grpc

log = structlog.get_logger()
JOIN_WAIT_S = 60.0        # how long a first join keeps trying an unreachable head
DEVICES_EVERY_S = 2.0     # how often the heartbeat re-reads memory and GPU use
START_TIMEOUT = 300.0     # a service starts before a model is loaded into it


class JoinRefused(Exception):
    """The head answered the join with a refusal (a bad or expired token, a bad name)."""


def local_address(head: str) -> str:
    """The address of this machine on the route to the head (what the head can reach)."""
    host, _, port = head.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host.strip("[]") or "127.0.0.1", int(port or 7070)))   # sends nothing
        return s.getsockname()[0]


class Agent:
    def __init__(self, head: str, token: str, name: str, host: str, home: str) -> None:
        self.head, self.token, self.name, self.host, self.home = head, token, name, host, home
        creds = tls_credentials()
        self.channel = grpc.secure_channel(head, creds) if creds else grpc.insecure_channel(head)
        self.stub = node_pb2_grpc.NodeHeadStub(self.channel)
        self.supervisor: Supervisor | None = None
        self.secret = ""
        self.period = 0.5
        self.busy: set[str] = set()   # services a thread is starting or stopping
        self.ranks: dict[str, subprocess.Popen] = {}   # WantedRank.key → its process
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.devices = devices.inventory()
        self.devices_at = time.monotonic()

    # --- join ------------------------------------------------------------------------------

    def join(self, wait_s: float) -> None:
        """Join the head (retrying an unreachable one for wait_s); a fresh supervisor takes the
        new session secret (services of an old session could not answer the head anyway)."""
        request = node_pb2.JoinRequest(token=self.token, name=self.name, host=self.host,
                                       devices=self.devices)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                reply = self.stub.Join(request, timeout=10)
                break
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE,
                                    grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise JoinRefused(f"the head at {self.head} refused the join: "
                                      f"{e.code().name}: {e.details()}") from None
                if time.monotonic() >= deadline or self.stopping.wait(1.0):
                    raise JoinRefused(f"cannot reach the head at {self.head}: "
                                      f"{e.details()}") from None
        if self.supervisor is not None:
            self.supervisor.stop()
        self.secret, self.period = reply.secret, reply.heartbeat_s or 0.5
        self.supervisor = Supervisor([], self.home)
        self.supervisor.secret = reply.secret   # the node's services demand the session secret
        self.supervisor.start()
        log.info("node_joined", head=self.head, name=self.name, host=self.host,
                 heartbeat_s=self.period, devices=[d.kind for d in self.devices])
        print(f"llmosd node {self.name} joined {self.head}", flush=True)

    # --- heartbeat -------------------------------------------------------------------------

    def run(self) -> None:
        self.join(JOIN_WAIT_S)
        unreachable_since = 0.0
        while not self.stopping.wait(self.period):
            try:
                reply = self.stub.Heartbeat(self.report(), timeout=max(1.0, 2 * self.period),
                                            metadata=[(NODE_SECRET_KEY, self.secret)])
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED):
                    log.warning("head_forgot_us", reason=e.details())
                    self.join(JOIN_WAIT_S)
                elif not unreachable_since:
                    unreachable_since = time.monotonic()
                    log.warning("head_unreachable", head=self.head, error=e.code().name)
                continue
            if unreachable_since:
                log.info("head_reachable", after_s=round(time.monotonic() - unreachable_since, 1))
                unreachable_since = 0.0
            self.reconcile(reply.services)
            self.reconcile_ranks(reply.ranks)

    def report(self) -> node_pb2.HeartbeatRequest:
        if time.monotonic() - self.devices_at >= DEVICES_EVERY_S:
            self.devices, self.devices_at = devices.inventory(), time.monotonic()
        sup = self.supervisor
        with sup.lock:
            services = [node_pb2.NodeService(
                name=s.spec.name, address=s.address, state=s.state, incarnation=s.incarnation,
                pid=s.pid, restarts=s.restarts, last_exit=s.last_exit)
                for s in sup.services.values()]
        ranks = [node_pb2.NodeRank(key=key, pid=p.pid, state="RUNNING" if p.poll() is None
                                   else "EXITED", exit_code=p.returncode or 0)
                 for key, p in self.ranks.items()]
        ranks += [node_pb2.NodeRank(key=f"{model}/{s.name}/{rank}", pid=pid, state="RUNNING")
                  for s in services if s.pid
                  for model, rank, pid in rank_procs.child_ranks(s.pid)]   # a replica's own
        return node_pb2.HeartbeatRequest(name=self.name, devices=self.devices,
                                         services=services, ranks=ranks)

    # --- the head's wishes -----------------------------------------------------------------

    def reconcile(self, wanted: list[node_pb2.WantedService]) -> None:
        """Start the wanted services not running here, stop those no longer wanted (each in a
        thread of its own: the heartbeat never waits on a service). A FAILED one stays so
        until the head asks again after it is stopped."""
        sup = self.supervisor
        want = {w.name: w for w in wanted}
        with sup.lock:
            have = set(sup.services)
        for name in sorted(set(want) - have):
            w = want[name]
            spec = ServiceSpec(name, dict(w.options), START_TIMEOUT, module=w.module,
                               listen=f"{self.host}:0",
                               env=pin(name, sorted(want), self.devices, w.options))
            self.background(name, lambda s=spec: sup.add(s, START_TIMEOUT))
        for name in sorted(have - set(want)):
            self.background(name, lambda n=name: sup.retire(n))

    def reconcile_ranks(self, wanted: list[node_pb2.WantedRank]) -> None:
        """Kill the ranks no longer listed, start the listed ones never started."""
        want = {w.key: w for w in wanted}
        for key in sorted(set(self.ranks) - set(want)):
            end_rank(self.ranks.pop(key))
            log.info("node_rank_stopped", key=key)
        for key in sorted(set(want) - set(self.ranks)):
            self.ranks[key] = self.start_rank(want[key])

    def start_rank(self, w: node_pb2.WantedRank) -> subprocess.Popen:
        """rank.py joins rank 0's store on the head and reads the rest of its arguments there
        (services/inference/parallel.py, rank_argv)."""
        cmd = [sys.executable, "-m", "llmasos.services.inference.rank", f"--rank={w.rank}",
               f"--world={w.world}", f"--store={w.store}", f"--host={self.host}",
               f"--model={w.model}"]
        out = open(os.path.join(self.home, f"rank-{w.key.replace('/', '-')}.log"), "ab")  # noqa: SIM115
        with out:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT)
        log.info("node_rank_started", key=w.key, rank=w.rank, world=w.world, store=w.store,
                 pid=p.pid)
        return p

    def background(self, name: str, work: Callable[[], object]) -> None:
        with self.lock:
            if name in self.busy:
                return
            self.busy.add(name)

        def run() -> None:
            try:
                work()
            finally:
                with self.lock:
                    self.busy.discard(name)
        threading.Thread(target=run, name=f"node-{name}", daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        for p in self.ranks.values():
            end_rank(p)
        if self.supervisor is not None:
            self.supervisor.stop()
        self.channel.close()


def end_rank(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait()


def pin(name: str, wanted: list[str], found: list[kernel_pb2.Device],
        options: dict[str, str] | object) -> dict[str, str]:
    """One GPU per service where the node has GPUs and the head serves on CUDA (the services
    take turns over them); on the CPU each replica gets its share of the cores at load."""
    gpus = [d.index for d in found if d.kind == "gpu"]
    if not gpus or dict(options).get("device") != "cuda":
        return {}
    return {"CUDA_VISIBLE_DEVICES": str(gpus[wanted.index(name) % len(gpus)])}


def default_home() -> str:
    return os.environ.get("LLMASOS_HOME") or str(Path.home() / ".local/state/llmasos-node")


def main(args: argparse.Namespace) -> int:
    """`llmosd node --join HOST:PORT --token T`: run the agent until SIGTERM or SIGINT."""
    token = args.token or os.environ.get("LLMASOS_JOIN_TOKEN", "")
    if not token:
        print("llmosd node: give --token T (or $LLMASOS_JOIN_TOKEN): a join token made on the "
              "head with `llmosd node token`", flush=True)
        return 2
    home = args.home or default_home()
    os.makedirs(home, mode=0o700, exist_ok=True)
    try:
        host = args.advertise or local_address(args.join)
    except (OSError, ValueError) as e:
        print(f"llmosd node: cannot find a route to the head {args.join}: {e}", flush=True)
        return 1
    agent = Agent(args.join, token, args.name or socket.gethostname(), host, home)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
    try:
        agent.run()
    except JoinRefused as e:
        print(f"llmosd node: {e}", flush=True)
        log.error("join_refused", error=str(e))
        return 1
    finally:
        agent.close()
    return 0
