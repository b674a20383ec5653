"""The head's side of nodes: machines that joined with `llmosd node --join` (kernel/node_agent.py)
and run model replicas for this kernel.

    join        Join(token) on the Kernel address; the token is checked against the head's
                join tokens (kernel/join_tokens.py); the node gets a session secret
    heartbeat   every HEARTBEAT_S the node reports its devices and services; the reply lists
                the services it should run (inference.r for each replica r placed there)
    attach      the watcher thread connects to a node's service once it is HEALTHY (a channel
                carrying the session secret, which the node's services demand, as local
                services demand the per-boot one), loads the models placed there and gives
                the step loop a fresh pager per replica: a remote replica is then a lane like
                any other
    loss        a node silent for TIMEOUT_S is LOST: its channels close (a step in flight
                there fails at once) and its replicas' jobs move to the live replicas, where
                they are recomputed; a service that restarts there is a dead replica too
    ranks       tp/pp ranks of a model whose rank 0 runs here: kernel/node_ranks.py

A model's placement (Deployed.nodes) names the host of each replica: "" for this one.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import structlog

from llmasos.kernel import join_tokens, replicas
from llmasos.kernel.node_ranks import Ranks
from llmasos.kernel.supervisor import secret_channel
from llmasos.proto import inference_pb2, inference_pb2_grpc, kernel_pb2, node_pb2, node_pb2_grpc
from llmasos.syscalls import SyscallError

if TYPE_CHECKING:
    from llmasos.kernel.kernel import Kernel

log = structlog.get_logger()
HEARTBEAT_S = 0.5
TIMEOUT_S = 3.0           # six heartbeats missed: the node is LOST
WATCH_S = 0.2
NODE_SECRET_KEY = "x-llmasos-node-secret"
HEAD = "head"             # this host, in a placement list
ANYWHERE = "anywhere"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class Attached:
    """The head's connection to one service on a node, and the incarnation it serves."""

    address: str
    incarnation: int
    channel: grpc.Channel


@dataclass
class Node:
    name: str
    host: str
    secret: str
    devices: list[kernel_pb2.Device]
    joined_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    state: str = "LIVE"                                   # LIVE, LOST
    services: dict[str, node_pb2.NodeService] = field(default_factory=dict)   # as reported
    ranks: dict[str, node_pb2.NodeRank] = field(default_factory=dict)   # tp/pp ranks, likewise
    attached: dict[str, Attached] = field(default_factory=dict)

    def cores(self) -> int:
        return sum(d.cores for d in self.devices if d.kind == "cpu") or 1


def service_of(replica: int) -> str:
    return f"{replicas.INFERENCE}.{replica}"


class Nodes:
    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.nodes: dict[str, Node] = {}
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.pending: dict[str, set[int]] = {}   # node → replicas a deploy is starting there
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="nodes", daemon=True)
        self.ranks = Ranks(k)   # tp/pp ranks placed on nodes (kernel/node_ranks.py)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        with self.lock:
            for node in self.nodes.values():
                for att in node.attached.values():
                    att.channel.close()
                node.attached.clear()

    # --- what runs where -------------------------------------------------------------------

    def placed(self, name: str) -> set[int]:
        """The replica indices whose service the node should run: its placements, and those a
        deploy is starting."""
        wanted = set(self.pending.get(name, ()))
        for dep in list(self.k.models.values()):
            wanted |= {r for r, host in enumerate(dep.nodes) if host == name}
        return wanted

    def lanes_on(self, name: str, replica: int) -> list[str]:
        return [replicas.lane(m, replica) for m, dep in list(self.k.models.items())
                if replica < len(dep.nodes) and dep.nodes[replica] == name]

    def state(self, name: str) -> str | None:
        """LIVE or LOST; None for a node that never joined."""
        with self.lock:
            node = self.nodes.get(name)
            return node.state if node is not None else None

    def host_of(self, name: str) -> str:
        with self.lock:
            return self.nodes[name].host

    def live(self) -> list[str]:
        with self.lock:
            return sorted(n for n, node in self.nodes.items() if node.state == "LIVE")

    def stub(self, name: str, replica: int) -> inference_pb2_grpc.InferenceStub:
        """The inference service holding `replica` on the node; UNAVAILABLE while it is not
        attached (the node is lost, or its service restarting)."""
        with self.lock:
            node = self.nodes.get(name)
            att = node.attached.get(service_of(replica)) if node is not None else None
            state = node.state if node is not None else "not joined"
        if att is None:
            raise SyscallError("UNAVAILABLE", f"replica {replica} on node {name!r} is not "
                               f"serving (the node is {state}); see `llmsh nodes`")
        return inference_pb2_grpc.InferenceStub(att.channel)

    @contextmanager
    def starting(self, placement: list[str], timeout: float) -> Iterator[None]:
        """While a deploy loads: the replicas it places on nodes are wanted there, and each one
        is attached before the load starts (UNAVAILABLE when one does not come up)."""
        remote = [(host, r) for r, host in enumerate(placement) if host]
        with self.lock:
            for host, r in remote:
                self.pending.setdefault(host, set()).add(r)
        try:
            for host, r in remote:
                self._wait_attached(host, r, timeout)
            yield
        finally:
            with self.lock:
                for host, r in remote:
                    self.pending.get(host, set()).discard(r)

    def _wait_attached(self, host: str, replica: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                node = self.nodes.get(host)
                if node is None or node.state != "LIVE":
                    raise SyscallError("FAILED_PRECONDITION", f"node {host!r} is "
                                       f"{node.state if node else 'not joined'}; see `llmsh nodes`")
                if service_of(replica) in node.attached:
                    return
                svc = node.services.get(service_of(replica))
                if svc is not None and svc.state == "FAILED":
                    raise SyscallError("UNAVAILABLE", f"the service {svc.name} on node {host!r} "
                                       f"FAILED: {svc.last_exit}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SyscallError("UNAVAILABLE", f"the service {service_of(replica)} on "
                                       f"node {host!r} did not start in {timeout:.0f}s")
                self.changed.wait(min(left, 0.5))

    # --- the NodeHead calls ----------------------------------------------------------------

    def join(self, req: node_pb2.JoinRequest, peer: str) -> node_pb2.JoinResponse:
        why = join_tokens.check(self.k.cfg.home, req.token)
        if why:
            raise NodeRefusal(grpc.StatusCode.UNAUTHENTICATED, why)
        if not NAME.match(req.name) or req.name in (HEAD, ANYWHERE):
            raise NodeRefusal(grpc.StatusCode.INVALID_ARGUMENT, f"a node name is 1..64 chars "
                              f"of [A-Za-z0-9._-], not {HEAD!r} or {ANYWHERE!r}; got "
                              f"{req.name!r} (give --name)")
        host = req.host or peer_host(peer)
        with self.lock:
            old = self.nodes.get(req.name)
            if old is not None:   # the node's agent restarted: its old services are gone
                self._lose(old, "joined again")
            self.nodes[req.name] = Node(req.name, host, secrets.token_hex(32), list(req.devices))
            secret = self.nodes[req.name].secret
            self.ranks.node_back(req.name)   # models waiting for it (e.g. after a restart)
            self.changed.notify_all()
        log.info("node_joined", node=req.name, host=host, devices=len(req.devices))
        return node_pb2.JoinResponse(secret=secret, heartbeat_s=HEARTBEAT_S, timeout_s=TIMEOUT_S)

    def heartbeat(self, req: node_pb2.HeartbeatRequest,
                  secret: str) -> node_pb2.HeartbeatResponse:
        with self.lock:
            node = self.nodes.get(req.name)
            if node is None:
                raise NodeRefusal(grpc.StatusCode.NOT_FOUND, f"no node named {req.name!r} has "
                                  "joined this head; join again")
            if not secrets.compare_digest(secret.encode(), node.secret.encode()):
                raise NodeRefusal(grpc.StatusCode.UNAUTHENTICATED,
                                  "wrong node session secret; join again")
            if node.state == "LOST":
                log.warning("node_back", node=node.name)
                node.state = "LIVE"
                self.ranks.node_back(node.name)
            node.last_seen = time.monotonic()
            node.devices = list(req.devices) or node.devices
            node.services = {s.name: s for s in req.services}
            node.ranks = {r.key: r for r in req.ranks}
            self.ranks.exited(node.name, list(req.ranks))
            wanted = sorted(self.placed(node.name))
            self.changed.notify_all()
        base = self.k.supervisor.services[replicas.INFERENCE].spec.options
        return node_pb2.HeartbeatResponse(services=[
            node_pb2.WantedService(name=service_of(r), module=replicas.INFERENCE,
                                   options={**base, "embedded": "0"}) for r in wanted],
            ranks=self.ranks.wanted(node.name))

    # --- the watcher -----------------------------------------------------------------------

    def _watch(self) -> None:
        while not self.stopping.wait(WATCH_S):
            try:
                self._tick()
            except Exception:   # the watcher must live on
                log.exception("nodes_watch_failed")

    def _tick(self) -> None:
        now = time.monotonic()
        todo: list[tuple[Node, node_pb2.NodeService]] = []
        with self.lock:
            for node in self.nodes.values():
                if node.state == "LIVE" and now - node.last_seen > TIMEOUT_S:
                    self._lose(node, f"no heartbeat for {now - node.last_seen:.1f}s")
                if node.state != "LIVE":
                    continue
                for name, svc in node.services.items():
                    att = node.attached.get(name)
                    fresh = svc.state == "HEALTHY" and svc.address and (
                        att is None or (att.address, att.incarnation) !=
                        (svc.address, svc.incarnation))
                    if att is not None and (fresh or svc.state not in ("HEALTHY", "UNHEALTHY")):
                        self._detach(node, name, f"its service is {svc.state}")
                    if fresh:
                        todo.append((node, svc))
        for node, svc in todo:
            self._attach(node, svc)

    def _lose(self, node: Node, why: str) -> None:
        """(under the lock) The node is gone: its replicas are dead replicas."""
        node.state = "LOST"
        for name in list(node.attached):
            self._detach(node, name, why)
        log.warning("node_lost", node=node.name, reason=why)
        self.ranks.node_lost(node.name)
        self.changed.notify_all()

    def _detach(self, node: Node, name: str, why: str) -> None:
        """(under the lock) Close the channel (a step in flight there fails at once) and move
        the jobs of the replicas it held."""
        att = node.attached.pop(name)
        replica = int(name.rpartition(".")[2])
        if self.k.executor is not None:
            self.k.executor.replica_died(replica, node.name)
        att.channel.close()
        log.warning("node_replica_down", node=node.name, service=name, reason=why)

    def _attach(self, node: Node, svc: node_pb2.NodeService) -> None:
        """Connect to a node's new service incarnation, load the models placed on it (the
        RPCs run without the lock) and hand the step loop fresh pagers."""
        replica = int(svc.name.rpartition(".")[2])
        channel = secret_channel(svc.address, node.secret)
        stub = inference_pb2_grpc.InferenceStub(channel)
        try:
            fresh = self._load_placed(node, replica, stub)
        except (grpc.RpcError, SyscallError) as e:
            channel.close()
            log.warning("node_attach_failed", node=node.name, service=svc.name, error=str(e))
            return
        with self.lock:
            if node.state != "LIVE" or self.nodes.get(node.name) is not node:
                channel.close()
                return
            node.attached[svc.name] = Attached(svc.address, svc.incarnation, channel)
            self.changed.notify_all()
        log.info("node_replica_attached", node=node.name, service=svc.name,
                 address=svc.address, incarnation=svc.incarnation, models=sorted(fresh))
        if self.k.executor is not None and fresh:
            self.k.executor.replica_restarted(replica, svc.incarnation, fresh, node.name)
        elif fresh:
            self.k.pagers.update(fresh)

    def _load_placed(self, node: Node, replica: int,
                     stub: inference_pb2_grpc.InferenceStub) -> dict:
        """Redeploy into the service what is placed on it; the lane → fresh pager of each."""
        from llmasos.kernel.kernel import load_request
        loaded = {m.name for m in stub.ListModels(inference_pb2.ListModelsRequest(),
                                                  timeout=60).models}
        fresh = {}
        threads = max(1, node.cores() // max(1, len(self.placed(node.name))))
        for lane in self.lanes_on(node.name, replica):
            model = replicas.split(lane)[0]
            dep = self.k.models.get(model)
            if dep is None or dep.error:
                continue
            if model not in loaded:
                stub.LoadModel(load_request(model, dep, threads), timeout=600)
            fresh[lane] = self.k.new_pager(model, stub)
        return fresh

    # --- placement at Deploy ---------------------------------------------------------------

    def placement(self, asked: list[str], n: int) -> list[str]:
        """One host per replica ("" for this one) from a Deploy's `nodes`; refusals name why."""
        if not asked:
            return []
        live = self.live()
        if asked == [ANYWHERE]:
            hosts = ["", *live]
            return [hosts[r % len(hosts)] for r in range(n)]
        if ANYWHERE in asked:
            raise SyscallError("INVALID_ARGUMENT", f"{ANYWHERE!r} stands alone in nodes")
        if len(asked) != n:
            raise SyscallError("INVALID_ARGUMENT", f"nodes lists {len(asked)} hosts for "
                               f"{n} replicas; name one host per replica (or 'anywhere')")
        out = ["" if h == HEAD else h for h in asked]
        if out[0]:
            raise SyscallError("FAILED_PRECONDITION", "replica 0 runs on the head (it answers "
                               f"the model's Tokenize and Models); list {HEAD!r} first")
        with self.lock:
            for host in [h for h in out if h]:
                node = self.nodes.get(host)
                if node is None:
                    raise SyscallError("INVALID_ARGUMENT", f"no node named {host!r} has joined; "
                                       f"joined: {sorted(self.nodes) or 'none'} "
                                       "(see `llmsh nodes`)")
                if node.state != "LIVE":
                    raise SyscallError("FAILED_PRECONDITION", f"node {host!r} is {node.state}; "
                                       "deploy on live nodes only")
                if out.count(host) > node.cores():
                    raise SyscallError("INVALID_ARGUMENT", f"{out.count(host)} replicas on node "
                                       f"{host!r}, which has {node.cores()} cores")
        return out

    # --- what ps shows ---------------------------------------------------------------------

    def infos(self, admin: bool) -> list[kernel_pb2.NodeInfo]:
        now = time.monotonic()
        with self.lock:
            return [kernel_pb2.NodeInfo(
                name=n.name, address=n.host if admin else "", state=n.state,
                heartbeat_age_s=now - n.last_seen, devices=n.devices,
                services=sorted(n.services), joined_s=time.time() - n.joined_at,
                replicas=sorted(ln for r in self.placed(n.name)
                                for ln in self.lanes_on(n.name, r)))
                for n in sorted(self.nodes.values(), key=lambda n: n.name)]

    def services(self, admin: bool) -> list[kernel_pb2.ServiceInfo]:
        """The services the nodes run for this head, as ServiceInfo rows named node/service."""
        out = []
        with self.lock:
            for node in sorted(self.nodes.values(), key=lambda n: n.name):
                for s in sorted(node.services.values(), key=lambda s: s.name):
                    replica = int(s.name.rpartition(".")[2])
                    out.append(kernel_pb2.ServiceInfo(
                        name=f"{node.name}/{s.name}", pid=s.pid,
                        address=s.address if admin else "",
                        state=s.state if node.state == "LIVE" else "LOST",
                        restarts=s.restarts, incarnation=s.incarnation, last_exit=s.last_exit,
                        node=node.name, replicas=sorted(self.lanes_on(node.name, replica))))
                for r in sorted(node.ranks.values(), key=lambda r: r.key):
                    model, _, rest = r.key.partition("/")
                    # key model/port/rank: a rank of the head's replica 0; model/inference.r/rank:
                    # a rank that the node's replica r started itself
                    owner, _, rank = rest.rpartition("/")
                    replica = replicas.replica_of_service(owner) or 0
                    out.append(kernel_pb2.ServiceInfo(
                        name=f"{node.name}/rank.{model}.{rank}", pid=r.pid,
                        state=r.state if node.state == "LIVE" else "LOST",
                        last_exit=f"exit {r.exit_code}" if r.state == "EXITED" else "",
                        node=node.name, replicas=[replicas.lane(model, replica)]))
        return out


class NodeRefusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string (ipv4:10.0.0.2:5000, ipv6:[::1]:5000)."""
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0]
    return host if kind == "ipv4" else host.strip("[]") if kind == "ipv6" else ""


class NodeHeadServicer(node_pb2_grpc.NodeHeadServicer):
    """Join and Heartbeat on the Kernel address, authenticated by join token and session
    secret (not by a user's token: kernel/auth.py leaves these calls to us)."""

    def __init__(self, nodes: Nodes) -> None:
        self.nodes = nodes

    def Join(self, request: node_pb2.JoinRequest,   # noqa: N802
             context: grpc.ServicerContext) -> node_pb2.JoinResponse:
        try:
            reply = self.nodes.join(request, context.peer())
        except NodeRefusal as e:
            self._refused(context, "NodeJoin", e, request.name)
        audit = getattr(self.nodes.k, "audit", None)
        if audit is not None:   # a machine joining is a privileged event, as a deploy is
            audit.record(call="NodeJoin", code="OK", args={"node": request.name,
                                                          "host": request.host},
                         peer=context.peer())
        return reply

    def Heartbeat(self, request: node_pb2.HeartbeatRequest,   # noqa: N802
                  context: grpc.ServicerContext) -> node_pb2.HeartbeatResponse:
        secret = dict(context.invocation_metadata()).get(NODE_SECRET_KEY, "")
        try:
            return self.nodes.heartbeat(request, secret)
        except NodeRefusal as e:
            self._refused(context, "NodeHeartbeat", e, request.name)

    def _refused(self, context: grpc.ServicerContext, call: str, e: NodeRefusal,
                 name: str) -> None:
        audit = getattr(self.nodes.k, "audit", None)
        if audit is not None and e.code == grpc.StatusCode.UNAUTHENTICATED:
            audit.record(call=call, code=e.code.name, message=e.message, args={"node": name},
                         peer=context.peer())
        context.abort(e.code, e.message)
