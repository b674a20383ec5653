"""tp/pp ranks across hosts (issue 16 items 1, 2, 4): a model deployed with `--tp 3 --nodes
head,n1,n1` runs rank 0 in the head's inference service and ranks 1-2 on the node, started by
its agent, every tensor crossing the veth link through torch.distributed (gloo bound to each
host's link address). Greedy output equals tp=1's, alone and batched; a node cut off mid-load
loses no job (kernel/node_ranks.py: the head restarts rank 0's service, the model waits for the
node and is loaded again there when it comes back). Two network namespaces (tests/netns.py);
needs root and `ip netns` (else skipped)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator

import psutil
import pytest
from test_nodes import Hosts, two_hosts

from conftest import MODEL, PROMPTS, embedded_gguf

TOKENS = 12


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    yield from two_hosts(tmp_path_factory, "ranks")


@pytest.fixture(scope="module")
def tp1(hosts: Hosts) -> list[list[int]]:
    """The prompts' greedy tokens on the embedded model, one process on the head."""
    return [r["tokens"] for r in hosts.drive("jobs", MODEL, str(TOKENS), json.dumps(PROMPTS))]


def wait_for(hosts: Hosts, event: str, count: int, timeout: float = 300) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if hosts.log().count(event) >= count:
            return True
        time.sleep(0.5)
    return False


def in_flight_counts(text: str, model: str) -> dict[str, float]:
    """The head's steps_in_flight histogram for a model: bucket bound → launches at most it."""
    pattern = rf'llmasos:steps_in_flight_bucket{{le="([0-9.+Inf]+)",model_name="{model}"}} (\S+)'
    return {le: float(n) for le, n in re.findall(pattern, text)}


def test_tp_placement_is_checked(hosts: Hosts) -> None:
    for nodes, code in (("head,n1", "INVALID_ARGUMENT"),         # 2 hosts for 3 ranks
                        ("n1,head,n1", "FAILED_PRECONDITION"),   # rank 0 is the head's
                        ("head,n9,n9", "INVALID_ARGUMENT")):     # no such node
        out = hosts.drive("deploy", embedded_gguf(), "smol-bad", nodes, "0", "3")
        assert out["ok"] is False and out["code"] == code, (nodes, out)


@pytest.mark.slow
def test_tp3_across_two_hosts_equals_tp1(hosts: Hosts, tp1: list[list[int]]) -> None:
    out = hosts.drive("deploy", embedded_gguf(), "smol-tp3", "head,n1,n1", "0", "3")
    assert out == {"ok": True, "replicas": 1}, out
    seen = hosts.drive("services")
    for rank in (1, 2):
        row = seen["services"][f"n1/rank.smol-tp3.{rank}"]
        assert row["state"] == "RUNNING" and row["node"] == "n1" and row["pid"] > 0
    assert "ranks_placed" in hosts.log()
    table = hosts.tool("llmasos.tools.ps", "--services")
    assert "n1/rank.smol-tp3.1" in table and "n1/rank.smol-tp3.2" in table
    results = hosts.drive("jobs", "smol-tp3", str(TOKENS), json.dumps(PROMPTS))  # batched
    assert [r["tokens"] for r in results] == tp1
    alone = hosts.drive("jobs", "smol-tp3", str(TOKENS), json.dumps(PROMPTS[:1]))
    assert alone[0]["tokens"] == tp1[0]


@pytest.mark.slow
def test_a_node_with_ranks_cut_off_mid_load_loses_no_job(hosts: Hosts,
                                                         tp1: list[list[int]]) -> None:
    """Rank 0 does not sit in a collective for its 300 s timeout: the head restarts its
    service when the node is LOST, the model waits for the node (its jobs READY), and is
    loaded again across both hosts once the node is back; every job completes unchanged."""
    spawned = hosts.drive("spawn-busy", "smol-tp3", str(TOKENS), json.dumps(PROMPTS))
    assert spawned["busy"], "no job made a token before the cut"
    hosts.head.link(up=False)
    cut_at = time.monotonic()
    try:
        assert wait_for(hosts, "model_waits_for_nodes", 1, 180), hosts.log()[-3000:]
        assert "ranks_lost_restarting_inference" in hosts.log()
        waited_s = time.monotonic() - cut_at
    finally:
        hosts.head.link(up=True)
    results = hosts.drive("wait", json.dumps(spawned["pids"]))
    assert [r["status"] for r in results] == [0] * len(PROMPTS)
    assert [r["tokens"] for r in results] == tp1
    assert waited_s < 120, "rank 0 waited for the collective timeout"
    assert "ranks_back" in hosts.log()
    seen = hosts.drive("services")
    running = [n for n, s in seen["services"].items()
               if n.startswith("n1/rank.smol-tp3.") and s["state"] == "RUNNING"]
    assert len(running) == 2, seen["services"]   # the new group's; the old ones killed


@pytest.mark.slow
def test_kill_9_of_a_rank_on_the_node_loses_no_job(hosts: Hosts, tp1: list[list[int]]) -> None:
    """Rank 0's group breaks (its service restarts, as for a local rank); the model is loaded
    again with new ranks on the node and the jobs are recomputed."""
    before = hosts.drive("services")["services"]
    victim = next(s["pid"] for n, s in before.items()
                  if n.startswith("n1/rank.smol-tp3.") and s["state"] == "RUNNING")
    placed = hosts.log().count("ranks_placed")
    spawned = hosts.drive("spawn-busy", "smol-tp3", str(TOKENS), json.dumps(PROMPTS))
    assert spawned["busy"], "no job made a token before the kill"
    os.kill(victim, signal.SIGKILL)
    results = hosts.drive("wait", json.dumps(spawned["pids"]))
    assert [r["status"] for r in results] == [0] * len(PROMPTS)
    assert [r["tokens"] for r in results] == tp1
    assert hosts.log().count("ranks_placed") == placed + 1, "one new group, not a restart loop"


@pytest.mark.slow
def test_pp2_with_its_second_stage_on_the_node_equals_tp1(hosts: Hosts,
                                                          tp1: list[list[int]]) -> None:
    out = hosts.drive("deploy", embedded_gguf(), "smol-pp2", "head,n1", "0", "0", "2")
    assert out == {"ok": True, "replicas": 1}, out
    assert hosts.drive("services")["services"]["n1/rank.smol-pp2.1"]["state"] == "RUNNING"
    results = hosts.drive("jobs", "smol-pp2", str(TOKENS), json.dumps(PROMPTS))
    assert [r["tokens"] for r in results] == tp1
    # its stages on two hosts: two steps (of other jobs) in flight at once, one in each stage
    flying = in_flight_counts(hosts.drive("metrics"), "smol-pp2")
    assert flying["+Inf"] > flying["1.0"] > 0 and flying["2.0"] == flying["+Inf"], flying
    hosts.drive("undeploy", "smol-pp2")
    deadline = time.monotonic() + 60   # its rank on the node is stopped with it
    while time.monotonic() < deadline and \
            "n1/rank.smol-pp2.1" in hosts.drive("services")["services"]:
        time.sleep(0.5)
    assert "n1/rank.smol-pp2.1" not in hosts.drive("services")["services"]


@pytest.mark.slow
def test_replicas_of_a_pp_model_on_two_hosts_equal_tp1(hosts: Hosts,
                                                       tp1: list[list[int]]) -> None:
    """--replicas 2 --pp 2 --nodes head,n1: each replica is a pp=2 group on its own host (the
    node's inference.1 starts its stage-1 rank beside it); both serve tp=1's tokens."""
    out = hosts.drive("deploy", embedded_gguf(), "smol-rpp", "head,n1", "2", "0", "2")
    assert out == {"ok": True, "replicas": 2}, out
    node_service = hosts.drive("services")["services"]["n1/inference.1"]
    assert "smol-rpp@1" in node_service["replicas"]
    ranks = [c for c in psutil.Process(node_service["pid"]).children()
             if "smol-rpp" in " ".join(c.cmdline())]
    assert len(ranks) == 1, "the node replica's stage 1 runs on the node"
    deadline = time.monotonic() + 30   # the agent reports it with its next heartbeat
    while time.monotonic() < deadline and \
            "n1/rank.smol-rpp.1" not in hosts.drive("services")["services"]:
        time.sleep(0.5)
    row = hosts.drive("services")["services"]["n1/rank.smol-rpp.1"]
    assert row["pid"] == ranks[0].pid and row["replicas"] == ["smol-rpp@1"], row
    results = hosts.drive("jobs", "smol-rpp", str(TOKENS), json.dumps(PROMPTS))
    assert [r["tokens"] for r in results] == tp1
    assert {r["replica"] for r in results} == {0, 1}, "both hosts got jobs"
    hosts.drive("undeploy", "smol-rpp")
