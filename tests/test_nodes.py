"""Across nodes (issue 16 items 4-5): join tokens, the node agent, devices, placement, and
replicas on another host. The multi-host part makes two hosts as Linux network namespaces
joined by a veth pair (tests/netns.py): the head llmosd in one, a node agent in the other;
a model with a replica on each serves 16 greedy jobs as one replica does, and when the node's
link is cut mid-load its jobs complete on the head. Needs root and `ip netns` (else skipped)."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from llmasos.kernel import devices, join_tokens
from llmasos.kernel.node_agent import pin
from llmasos.kernel.nodes import NODE_SECRET_KEY
from llmasos.proto import kernel_pb2, node_pb2, node_pb2_grpc

from conftest import (
    BOOT_TIMEOUT,
    MODEL,
    PROMPTS,
    System,
    boot,
    converting_once,
    embedded_gguf,
    shutdown,
)
from netns import Host, Network, unavailable

HERE = Path(__file__).resolve().parent
JOBS = [*PROMPTS, *(f"{p} Then" for p in PROMPTS)]   # 16 distinct prompts
TOKENS = 16
LLMOSD = [sys.executable, "-m", "llmasos.kernel.main"]


def make_token(home: Path, ttl: float = 600) -> str:
    out = subprocess.run([*LLMOSD, "node", "token", "--home", str(home), "--ttl", str(ttl)],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def start_agent(address: str, token: str, name: str, home: Path,
                host: Host | None = None, **extra: str) -> subprocess.Popen:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LLMASOS_")},
           "LLMASOS_JOIN_TOKEN": token, **extra}
    cmd = [*LLMOSD, "node", "--join", address, "--name", name, "--home", str(home)]
    kw = dict(stdout=subprocess.PIPE, stderr=(home.parent / f"{name}.log").open("w"),
              text=True, env=env)
    return host.popen(cmd, **kw) if host is not None else subprocess.Popen(cmd, **kw)


def joined(agent: subprocess.Popen, timeout: float = 60) -> str:
    """The agent's first line: 'llmosd node NAME joined ADDRESS', or why it exited."""
    sel = selectors.DefaultSelector()
    sel.register(agent.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        raise AssertionError("the node agent said nothing")
    return agent.stdout.readline().strip()


def stop(proc: subprocess.Popen, timeout: float = 30) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("did not stop on SIGTERM") from None


# --- no network needed -------------------------------------------------------------------------

def test_join_tokens_admit_until_they_expire(tmp_path: Path) -> None:
    token, expiry = join_tokens.create(str(tmp_path), ttl=60, now=1000.0)
    assert token.startswith(join_tokens.PREFIX) and expiry == 1060.0
    assert join_tokens.check(str(tmp_path), token, now=1059.0) == ""
    assert "expired" in join_tokens.check(str(tmp_path), token, now=1060.0)
    assert "unknown join token" in join_tokens.check(str(tmp_path), token + "x", now=1000.0)
    assert token not in join_tokens.path(str(tmp_path)).read_text()   # only its digest
    assert oct(join_tokens.path(str(tmp_path)).stat().st_mode & 0o777) == "0o600"


def test_devices_report_this_machine() -> None:
    found = devices.inventory()
    cpu, gpus = found[0], found[1:]
    assert cpu.kind == "cpu" and cpu.cores == len(os.sched_getaffinity(0))
    assert cpu.memory_total > cpu.memory_used > 0
    assert all(g.kind == "gpu" and g.memory_total > 0 for g in gpus)   # none without NVML


def test_each_service_on_a_gpu_node_takes_its_own_gpu() -> None:
    gpus = [kernel_pb2.Device(kind="cpu", cores=16),
            *(kernel_pb2.Device(kind="gpu", index=i) for i in range(2))]
    wanted = ["inference.1", "inference.2", "inference.3"]
    cuda = {"device": "cuda"}
    assert [pin(n, wanted, gpus, cuda) for n in wanted] == [
        {"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"},
        {"CUDA_VISIBLE_DEVICES": "0"}]
    assert pin("inference.1", wanted, gpus, {"device": "cpu"}) == {}
    assert pin("inference.1", wanted, gpus[:1], cuda) == {}   # no GPU: no pinning


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    system = boot(tmp_path_factory.mktemp("head"), "--no-embedded")
    yield system
    assert shutdown(system) == 0


def test_a_bad_or_expired_token_is_refused(head: System, tmp_path: Path) -> None:
    expired, _ = join_tokens.create(str(head.home), ttl=-1)
    for token, words in (("llmj-bogus", "unknown join token"), (expired, "expired")):
        agent = start_agent(head.address, token, "n-bad", tmp_path / "n-bad")
        line = joined(agent)
        assert agent.wait(30) == 1
        assert "UNAUTHENTICATED" in line and words in line, line
    audit = head.call("Audit", kernel_pb2.AuditRequest(limit=50, call="NodeJoin")).entries
    assert sum(e.code == "UNAUTHENTICATED" for e in audit) >= 2
    stub = node_pb2_grpc.NodeHeadStub(head.channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Heartbeat(node_pb2.HeartbeatRequest(name="nobody"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_node_joins_reports_devices_and_is_lost_when_silent(head: System,
                                                              tmp_path: Path) -> None:
    agent = start_agent(head.address, make_token(head.home), "n1", tmp_path / "n1")
    try:
        assert joined(agent) == f"llmosd node n1 joined {head.address}"
        nodes = {n.name: n for n in head.call("Services", kernel_pb2.ServicesRequest()).nodes}
        assert nodes["n1"].state == "LIVE" and nodes["n1"].address == "127.0.0.1"
        audit = head.call("Audit", kernel_pb2.AuditRequest(limit=50, call="NodeJoin")).entries
        assert any(e.code == "OK" and '"node": "n1"' in e.args_json for e in audit)
        cpu = nodes["n1"].devices[0]
        assert cpu.kind == "cpu" and cpu.cores >= 1 and cpu.memory_total > 0
        stub = node_pb2_grpc.NodeHeadStub(head.channel)
        with pytest.raises(grpc.RpcError) as err:   # a heartbeat without the session secret
            stub.Heartbeat(node_pb2.HeartbeatRequest(name="n1"), timeout=10,
                           metadata=[(NODE_SECRET_KEY, "0" * 64)])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        refused = [
            (dict(nodes=["head", "n9"]), grpc.StatusCode.INVALID_ARGUMENT, "no node named 'n9'"),
            (dict(nodes=["n1", "head"]), grpc.StatusCode.FAILED_PRECONDITION, "replica 0"),
            (dict(nodes=["head", "n1"], replicas=3), grpc.StatusCode.INVALID_ARGUMENT,
             "one host per replica"),
            (dict(nodes=["head", "n1"], tp=3), grpc.StatusCode.INVALID_ARGUMENT,
             "one host per rank"),   # tp/pp ranks on nodes: tests/test_node_ranks.py
            (dict(nodes=["head", "n1", "n1"], tp=3, replicas=2),   # replicas: one host each
             grpc.StatusCode.INVALID_ARGUMENT, "3 hosts for 2 replicas"),
            (dict(pp_steps=2), grpc.StatusCode.INVALID_ARGUMENT, "add --pp"),
            (dict(pp=2, pp_steps=3), grpc.StatusCode.INVALID_ARGUMENT, "at most 2 steps"),
        ]
        for fields, code, words in refused:
            with pytest.raises(grpc.RpcError) as err:
                head.call("Deploy", kernel_pb2.DeployRequest(
                    path=embedded_gguf(), name="smol-nodes", **fields))
            assert err.value.code() == code and words in err.value.details(), fields
        shell = subprocess.run([sys.executable, "-m", "llmasos.shell.main", "-c", "nodes"],
                               capture_output=True, text=True, timeout=60, env={
                                   **os.environ, "LLMASOS_ADDR": head.address,
                                   "LLMASOS_TOKEN": head.root_token})
        assert "n1" in shell.stdout and "LIVE" in shell.stdout and "cpu" in shell.stdout
        os.kill(agent.pid, signal.SIGKILL)   # silent from now on
        agent.wait(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            nodes = {n.name: n for n in head.call("Services", kernel_pb2.ServicesRequest()).nodes}
            if nodes["n1"].state == "LOST":
                break
            time.sleep(0.2)
        assert nodes["n1"].state == "LOST" and nodes["n1"].heartbeat_age_s >= 3
        with pytest.raises(grpc.RpcError) as err:
            head.call("Deploy", kernel_pb2.DeployRequest(path=embedded_gguf(), name="smol-n",
                                                         nodes=["head", "n1"]))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "LOST" in err.value.details()
        assert "node_lost" in head.log_text()
    finally:
        agent.kill()


def test_a_node_joins_a_head_that_serves_tls(tmp_path: Path) -> None:
    """The agent's calls to the head use TLS when $LLMASOS_CA names the head's certificate."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    system = boot(tmp_path / "head", "--no-embedded", "--tls-cert", str(cert),
                  "--tls-key", str(key))
    agent = start_agent(system.address, make_token(system.home), "n-tls", tmp_path / "n-tls",
                        LLMASOS_CA=str(cert))
    try:
        assert joined(agent).startswith("llmosd node n-tls joined")
        assert stop(agent) == 0
        assert "node_joined" in system.log_text()
    finally:
        agent.kill()
        assert shutdown(system) == 0


# --- two hosts: network namespaces -------------------------------------------------------------

@dataclass
class Hosts:
    head: Host
    node: Host
    address: str          # the head llmosd's
    home: Path
    proc: subprocess.Popen
    agent: subprocess.Popen

    @property
    def token(self) -> str:
        return (self.home / "root.token").read_text().strip()

    def drive(self, *args: str, timeout: float = 900) -> object:
        """One step of the client, run in the head's namespace (tests/nodes_driver.py)."""
        done = self.head.run([sys.executable, str(HERE / "nodes_driver.py"), self.address,
                              self.token, *args], capture_output=True, text=True,
                             timeout=timeout)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def tool(self, *cmd: str) -> str:
        """A userland command run in the head's namespace."""
        env = {**os.environ, "LLMASOS_ADDR": self.address, "LLMASOS_TOKEN": self.token}
        done = self.head.run([sys.executable, "-m", *cmd], capture_output=True, text=True,
                             timeout=120, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    def log(self) -> str:
        return (self.home / "llmosd.log").read_text(errors="replace")


def boot_in(host: Host, home: Path) -> tuple[subprocess.Popen, str]:
    """llmosd with the embedded model, listening on the host's link address; its log is
    appended to, so a rebooted head's log keeps what the one before it said."""
    address = f"{host.address}:7070"
    home.mkdir(parents=True, exist_ok=True)
    proc = host.popen([*LLMOSD, "run", "--listen", address, "--insecure", "--no-http",
                       "--home", str(home)], stdout=subprocess.PIPE,
                      stderr=(home / "llmosd.log").open("a"), text=True,
                      env={**os.environ, "LLMASOS_HOME": str(home)})
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if sel.select(0.5) and proc.stdout.readline().startswith("llmosd ready"):
            return proc, address
    proc.kill()
    raise AssertionError(f"llmosd did not boot:\n{(home / 'llmosd.log').read_text()[-4000:]}")


def two_hosts(tmp_path_factory: pytest.TempPathFactory, label: str) -> Iterator[Hosts]:
    """A head with the embedded model in one namespace, node n1 joined from another."""
    why = unavailable()
    if why:
        pytest.skip(why)
    net = Network()
    try:
        head, node = net.make(2)
        home = tmp_path_factory.mktemp(label)
        with converting_once():
            proc, address = boot_in(head, home / "head")
        agent = start_agent(address, make_token(home / "head"), "n1", home / "n1", node)
        assert joined(agent) == f"llmosd node n1 joined {address}"
        system = Hosts(head, node, address, home / "head", proc, agent)
        yield system
        assert stop(agent) == 0
        assert stop(system.proc, 90) == 0
    finally:
        net.remove()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    yield from two_hosts(tmp_path_factory, "nodes")


@pytest.fixture(scope="module")
def one_replica(hosts: Hosts) -> list[list[int]]:
    """The 16 jobs on the embedded model, on the head alone: the expected tokens."""
    return [r["tokens"] for r in hosts.drive("jobs", MODEL, str(TOKENS), json.dumps(JOBS))]


@pytest.mark.slow
def test_replicas_across_two_hosts_serve_as_one(hosts: Hosts,
                                                one_replica: list[list[int]]) -> None:
    assert hosts.drive("deploy", embedded_gguf(), "smol-2h", "head,n1") == \
        {"ok": True, "replicas": 2}
    seen = hosts.drive("services")
    remote = seen["services"]["n1/inference.1"]
    assert remote["state"] == "HEALTHY" and remote["node"] == "n1"
    assert remote["replicas"] == ["smol-2h@1"]
    assert remote["address"].startswith(hosts.node.address + ":")
    assert "smol-2h@0" in seen["services"]["inference"]["replicas"]
    n1 = seen["nodes"]["n1"]
    assert n1["state"] == "LIVE" and n1["replicas"] == ["smol-2h@1"]
    assert n1["devices"][0]["kind"] == "cpu" and n1["devices"][0]["cores"] >= 1
    results = hosts.drive("jobs", "smol-2h", str(TOKENS), json.dumps(JOBS))
    assert [r["tokens"] for r in results] == one_replica
    assert {r["replica"] for r in results} == {0, 1}, "both hosts got jobs"
    table = hosts.tool("llmasos.tools.ps", "--services")
    assert "n1/inference.1" in table and "smol-2h@1" in table and "LIVE" in table
    assert "smol-2h@1" in hosts.tool("llmasos.shell.main", "-c", "nodes")


@pytest.mark.slow
def test_anywhere_spreads_replicas_and_undeploy_unloads_them(
        hosts: Hosts, one_replica: list[list[int]]) -> None:
    assert hosts.drive("deploy", embedded_gguf(), "smol-any", "anywhere", "2") == \
        {"ok": True, "replicas": 2}
    remote = hosts.drive("services")["services"]["n1/inference.1"]
    assert remote["replicas"] == ["smol-2h@1", "smol-any@1"]   # one service, both models
    results = hosts.drive("jobs", "smol-any", str(TOKENS), json.dumps(JOBS[:4]))
    assert [r["tokens"] for r in results] == one_replica[:4]
    assert {r["replica"] for r in results} == {0, 1}
    hosts.drive("undeploy", "smol-any")
    seen = hosts.drive("services")
    assert seen["services"]["n1/inference.1"]["replicas"] == ["smol-2h@1"]
    assert seen["nodes"]["n1"]["replicas"] == ["smol-2h@1"]


@pytest.mark.slow
def test_kill_9_of_a_replica_on_the_node_loses_no_job(hosts: Hosts,
                                                      one_replica: list[list[int]]) -> None:
    """The node's supervisor restarts it; the head moves its jobs, then attaches the new one."""
    before = hosts.drive("services")["services"]["n1/inference.1"]
    out = hosts.drive("crash", "smol-2h", str(TOKENS), str(before["pid"]), json.dumps(JOBS))
    assert out["busy"], "no job ran on the node's replica before the kill"
    assert [r["status"] for r in out["results"]] == [0] * len(JOBS)
    assert [r["tokens"] for r in out["results"]] == one_replica
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        after = hosts.drive("services")["services"]["n1/inference.1"]
        if after["state"] == "HEALTHY" and after["pid"] != before["pid"] and \
                hosts.log().count("node_replica_attached") >= 2:
            break
        time.sleep(1)
    assert after["state"] == "HEALTHY" and after["pid"] != before["pid"]
    results = hosts.drive("jobs", "smol-2h", str(TOKENS), json.dumps(JOBS[:4]))
    assert [r["tokens"] for r in results] == one_replica[:4]
    assert 1 in {r["replica"] for r in results}, "the restarted replica serves again"


@pytest.mark.slow
def test_a_node_cut_off_mid_load_loses_no_job(hosts: Hosts,
                                              one_replica: list[list[int]]) -> None:
    out = hosts.drive("cut", "smol-2h", str(TOKENS), hosts.head.iface, json.dumps(JOBS))
    assert out["busy"], "no job ran on the node's replica before the cut"
    assert [r["status"] for r in out["results"]] == [0] * len(JOBS)
    assert [r["tokens"] for r in out["results"]] == one_replica
    seen = hosts.drive("services")
    assert seen["nodes"]["n1"]["state"] == "LOST"
    assert seen["services"]["n1/inference.1"]["state"] == "LOST"
    log = hosts.log()
    assert "node_lost" in log and "replica_down_jobs_moved" in log
    hosts.head.link(up=True)   # the node comes back: its replica is attached again
    attached = hosts.log().count("node_replica_attached")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and \
            hosts.log().count("node_replica_attached") == attached:
        time.sleep(0.5)
    assert "node_back" in hosts.log(), "the node's heartbeats came back"
    assert hosts.log().count("node_replica_attached") == attached + 1, "its replica came back"
    results = hosts.drive("jobs", "smol-2h", str(TOKENS), json.dumps(JOBS))
    assert [r["tokens"] for r in results] == one_replica
    assert {r["replica"] for r in results} == {0, 1}


@pytest.mark.slow
def test_kill_9_of_the_head_and_the_node_joins_again(hosts: Hosts,
                                                     one_replica: list[list[int]]) -> None:
    """The journal keeps the placement; the node, unknown to the new head, joins again with
    its token and its replica is started and attached anew."""
    before = hosts.log()   # the new head appends to the same log
    os.kill(hosts.proc.pid, signal.SIGKILL)
    hosts.proc.wait(10)
    hosts.proc, _ = boot_in(hosts.head, hosts.home)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and \
            "node_replica_attached" not in hosts.log()[len(before):]:
        time.sleep(0.5)
    since = hosts.log()[len(before):]
    assert "node_joined" in since and "node_replica_attached" in since
    results = hosts.drive("jobs", "smol-2h", str(TOKENS), json.dumps(JOBS))
    assert [r["tokens"] for r in results] == one_replica
    assert {r["replica"] for r in results} == {0, 1}


@pytest.mark.slow
def test_undeploy_stops_the_service_on_the_node(hosts: Hosts) -> None:
    hosts.drive("undeploy", "smol-2h")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        seen = hosts.drive("services")
        if "n1/inference.1" not in seen["services"]:
            break
        time.sleep(0.5)
    assert "n1/inference.1" not in seen["services"]
    assert seen["nodes"]["n1"]["state"] == "LIVE" and seen["nodes"]["n1"]["replicas"] == []
