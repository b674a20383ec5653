"""Data parallelism (issue 16): a model deployed with replicas=2 runs as two inference processes,
each with its own KV pool and the kernel's pager for it. New jobs are spread over the replicas
by load and follow their cached prefixes; greedy output is the same as on one replica; kill -9
of a replica mid-load, or of llmosd itself, loses no job. Through the real daemon."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import psutil
import pytest
import torch

from llmasos.kernel.config import Config
from llmasos.kernel.kernel import Deployed
from llmasos.kernel.proctable import ProcessTable
from llmasos.kernel.replicas import depth, gpu_env, place_slots, slot_lane_of
from llmasos.kernel.replicas import split as rsplit
from llmasos.proto import common_pb2, kernel_pb2, scheduler_pb2
from llmasos.services.inference.parallel import rank_device
from llmasos.services.scheduler.placement import PREFIX_WORTH_MAX, place

from conftest import (
    MODEL,
    PROMPTS,
    System,
    assert_no_kv_held,
    boot,
    booted_model_system,
    embedded_gguf,
    greedy,
    shutdown,
    wait,
)

model_system = pytest.fixture(scope="module", name="model_system")(booted_model_system)

NAME = "smol-dp"
TOKENS = 16
JOBS = [*PROMPTS, *(f"{p} Then" for p in PROMPTS)]   # 16 distinct prompts


# --- devices and slots, alone ------------------------------------------------------------------

def test_each_replica_and_rank_takes_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replica r of a world-W model sees the GPUs from position r·W on, so its rank i (cuda:i)
    is GPU r·W+i: two replicas of tp=2 on 4 GPUs share none. The CPU, or one GPU: no pinning."""
    gpus = [0, 1, 2, 3]
    assert [gpu_env(r, 2, gpus, "cuda") for r in (1, 2)] == [
        {"CUDA_VISIBLE_DEVICES": "2,3,0,1"}, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}]
    assert gpu_env(1, 1, gpus, "cuda") == {"CUDA_VISIBLE_DEVICES": "1,2,3,0"}
    assert gpu_env(1, 2, gpus, "cpu") == {} and gpu_env(1, 2, [0], "cuda") == {}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [rank_device("cuda", r) for r in range(6)] == [
        "cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    assert rank_device("cpu", 3) == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert rank_device("cuda", 2) == "cuda"


def test_a_pp_models_jobs_are_spread_over_its_slots() -> None:
    """Each placed job of a pp=2 model gets the slot carrying fewer jobs, keeps it, and runs
    on that slot's key; one slot (or no pp) leaves every job on the lane itself. By default a
    pp model has one slot per stage when its stages span hosts, one when they share this one."""
    k = SimpleNamespace(table=ProcessTable(), cfg=Config(),
                        models={"pp": Deployed("x", "float32", pp=2, ranks=["", "n1"]),
                                "one": Deployed("y", ""), "here": Deployed("z", "", pp=2),
                                "asked": Deployed("w", "", pp=3, pp_steps=2)})
    assert [depth(k, m) for m in ("pp", "one", "here", "asked")] == [2, 1, 1, 2]
    jobs = [k.table.spawn(user="u", uid=1, ppid=0, model="pp", nice=0, replica=0)
            for _ in range(5)]
    other = k.table.spawn(user="u", uid=1, ppid=0, model="one", nice=0, replica=0)
    unplaced = k.table.spawn(user="u", uid=1, ppid=0, model="pp", nice=0)
    jobs[0].slot = 1   # already placed: kept
    place_slots(k)
    assert [j.slot for j in jobs] == [1, 0, 0, 1, 0] and other.slot == unplaced.slot == -1
    assert [slot_lane_of(j) for j in jobs[:2]] == ["pp#1", "pp"] and slot_lane_of(other) == "one"
    assert rsplit("pp@2#1") == ("pp", 2)
    k.cfg.pp_steps = 1
    fresh = k.table.spawn(user="u", uid=1, ppid=0, model="pp", nice=0, replica=0)
    place_slots(k)
    assert fresh.slot == -1 and depth(k, "pp") == 1


# --- the placement policy alone ----------------------------------------------------------------

def replicas(*loads: int) -> list[scheduler_pb2.ReplicaLoad]:
    return [scheduler_pb2.ReplicaLoad(replica=i, live_jobs=n, free_blocks=100)
            for i, n in enumerate(loads)]


def test_placement_spreads_a_burst_and_follows_cached_prefixes() -> None:
    burst = [scheduler_pb2.PlaceJob(pid=i) for i in range(6)]
    assert place(scheduler_pb2.PlaceRequest(replicas=replicas(0, 0), jobs=burst)) == \
        [0, 1, 0, 1, 0, 1]
    assert place(scheduler_pb2.PlaceRequest(replicas=replicas(3, 0, 1), jobs=burst[:3])) == \
        [1, 1, 2]
    cached = scheduler_pb2.PlaceJob(pid=9, cached_blocks=[0, 3])
    assert place(scheduler_pb2.PlaceRequest(replicas=replicas(0, 2), jobs=[cached])) == [1]
    far = PREFIX_WORTH_MAX + 1   # a hit outweighs small load differences, not large ones
    big = scheduler_pb2.PlaceJob(pid=9, cached_blocks=[0, 50])
    assert place(scheduler_pb2.PlaceRequest(replicas=replicas(0, far), jobs=[big])) == [0]
    assert place(scheduler_pb2.PlaceRequest(replicas=[], jobs=[cached])) == []


# --- through the daemon ------------------------------------------------------------------------

def llmsh(system: System, line: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMASOS_")}
    env.update(LLMASOS_ADDR=system.address, LLMASOS_HOME=str(system.home),
               LLMASOS_TOKEN=system.root_token)
    return subprocess.run([sys.executable, "-m", "llmasos.shell.main", "-c", line],
                          capture_output=True, text=True, timeout=900, env=env)


def spawn_all(system: System, model: str, prompts: list[str], tokens: int = TOKENS) -> list[int]:
    return [system.call("Spawn", kernel_pb2.SpawnRequest(
        model=model, prompt=p, sampling=greedy(tokens))).pid for p in prompts]


def until_all_ended(system: System, pids: list[int], timeout: float = 300) -> None:
    """Wait for every job to be a zombie without reaping it (ps still lists it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ps = system.call("Ps", kernel_pb2.PsRequest(all=True)).processes
        if all(p.state == common_pb2.PROC_ZOMBIE for p in ps if p.pid in pids):
            return
        time.sleep(0.2)
    raise AssertionError("jobs did not end")


_ONE: dict[int, list[list[int]]] = {}


def one_replica(system: System, tokens: int = TOKENS) -> list[list[int]]:
    """The 16 jobs at once on the embedded model (one replica): the expected output."""
    if tokens not in _ONE:
        _ONE[tokens] = [list(wait(system, pid).token_ids)
                        for pid in spawn_all(system, MODEL, JOBS, tokens)]
    return _ONE[tokens]


@pytest.fixture(scope="module")
def replicated(model_system: System) -> System:
    out = llmsh(model_system, f"deploy {embedded_gguf()} {NAME} --replicas 2")
    assert out.returncode == 0 and "as 2 replicas" in out.stdout, out.stderr
    return model_system


def test_two_replicas_serve_16_jobs_as_one_does(replicated: System) -> None:
    system = replicated
    want = one_replica(system)
    models = {m.name: m for m in system.call("Models", kernel_pb2.ModelsRequest()).models}
    assert models[NAME].replicas == 2 and models[MODEL].replicas == 1
    assert system.services()["inference.1"].state == "HEALTHY"
    pids = spawn_all(system, NAME, JOBS)
    until_all_ended(system, pids)
    table = llmsh(system, "ps -a -o pid,model").stdout   # zombies: still listed
    shown = {int(line.split()[0]): line.split()[1] for line in table.splitlines()[1:]}
    replies = [wait(system, pid) for pid in pids]
    assert [list(r.token_ids) for r in replies] == want
    assert {r.info.replica for r in replies} == {0, 1}, "both replicas got jobs"
    assert all(r.info.replicas == 2 for r in replies)
    assert {shown[pid] for pid in pids} == {f"{NAME}@0", f"{NAME}@1"}
    assert all(shown[r.info.pid] == f"{NAME}@{r.info.replica}" for r in replies)
    assert_no_kv_held(system)


def test_a_job_goes_where_its_prefix_is_cached(replicated: System) -> None:
    system = replicated
    stems = [" ".join(f"{w}{i}" for i in range(40)) for w in ("alpha", "omega")]   # > 2 blocks
    first = [wait(system, pid) for pid in spawn_all(system, NAME, stems, tokens=2)]
    where = {s: r.info.replica for s, r in zip(stems, first, strict=True)}
    assert set(where.values()) == {0, 1}   # a burst of two: one each
    for stem in reversed(stems):   # alone, on an idle system: the cache decides, not the load
        reply = wait(system, spawn_all(system, NAME, [f"{stem} and then"], tokens=2)[0])
        assert reply.info.replica == where[stem], stem


@pytest.mark.parametrize("victim", ["inference.1", "inference"])
def test_kill_9_of_a_replica_mid_load_loses_no_job(replicated: System, victim: str) -> None:
    system = replicated
    want = one_replica(system)
    before = system.services()[victim]
    replica = 0 if victim == "inference" else 1
    pids = spawn_all(system, NAME, JOBS)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:   # until a job there has produced a token
        ps = system.call("Ps", kernel_pb2.PsRequest(all=True)).processes
        if any(p.pid in pids and p.replica == replica and p.generated_tokens > 0 for p in ps):
            break
        time.sleep(0.05)
    os.kill(before.pid, signal.SIGKILL)
    replies = [wait(system, pid) for pid in pids]
    assert [r.info.exit_status for r in replies] == [0] * len(pids)
    assert [list(r.token_ids) for r in replies] == want
    after = system.wait_services(lambda s: s[victim].state == "HEALTHY")[victim]
    assert after.restarts == before.restarts + 1 and after.pid != before.pid
    assert "replica_down_jobs_moved" in system.log_text()
    pids = spawn_all(system, NAME, JOBS[:4])   # the restarted replica serves again
    assert [list(wait(system, pid).token_ids) for pid in pids] == want[:4]
    assert_no_kv_held(system)


def test_bad_replicas_are_refused(replicated: System) -> None:
    cores = len(os.sched_getaffinity(0))
    cases = [
        (dict(replicas=-1), grpc.StatusCode.INVALID_ARGUMENT, "at least 1"),
        (dict(replicas=cores + 1), grpc.StatusCode.INVALID_ARGUMENT, f"--replicas {cores}"),
    ]
    for fields, code, words in cases:
        with pytest.raises(grpc.RpcError) as err:
            replicated.call("Deploy", kernel_pb2.DeployRequest(
                path=embedded_gguf(), name="smol-bad", **fields), timeout=600)
        assert err.value.code() == code and words in err.value.details(), fields
    with pytest.raises(grpc.RpcError) as err:
        replicated.call("Deploy", kernel_pb2.DeployRequest(
            name="hosted", remote_url="https://example.invalid/v1", replicas=2))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "smol-bad" not in {m.name for m in replicated.call(
        "Models", kernel_pb2.ModelsRequest()).models}


def test_replicas_of_a_tensor_parallel_model_serve_as_one_rank_does(
        replicated: System, tmp_path: Path) -> None:
    """--replicas 2 --tp 2 on a tiny random model (4 heads): two inference processes, each rank
    0 of its own tp group, give the tokens the unsplit model gives."""
    from test_parallel import tiny_folder
    folder = tiny_folder(tmp_path, "llama")
    system = replicated
    one = llmsh(system, f"deploy {folder} tiny-one")
    both = llmsh(system, f"deploy {folder} tiny-dp-tp --replicas 2 --tp 2")
    assert one.returncode == 0 and both.returncode == 0, (one.stderr, both.stderr)
    models = {m.name: m for m in system.call("Models", kernel_pb2.ModelsRequest()).models}
    assert (models["tiny-dp-tp"].replicas, models["tiny-dp-tp"].tp) == (2, 2)
    prompts = [" ".join(f"w{(7 * i + j) % 120 + 2}" for j in range(3 + i)) for i in range(8)]
    want = [list(wait(system, pid).token_ids) for pid in spawn_all(system, "tiny-one", prompts)]
    replies = [wait(system, pid) for pid in spawn_all(system, "tiny-dp-tp", prompts)]
    assert [list(r.token_ids) for r in replies] == want
    assert {r.info.replica for r in replies} == {0, 1}, "both replicas got jobs"
    for name in ("tiny-one", "tiny-dp-tp"):
        system.call("Undeploy", kernel_pb2.UndeployRequest(name=name))
    assert_no_kv_held(system)


def test_undeploy_stops_the_replica_service(replicated: System) -> None:
    replicated.call("Undeploy", kernel_pb2.UndeployRequest(name=NAME))
    assert "inference.1" not in replicated.services()
    assert replicated.services()["inference"].state == "HEALTHY"


# --- the kernel crashes: replicas and placements come back from the journal ---------------------

def crash(system: System) -> None:
    """kill -9 llmosd; its services (both replicas') notice and exit by themselves."""
    children = psutil.Process(system.proc.pid).children(recursive=True)
    os.kill(system.proc.pid, signal.SIGKILL)
    system.proc.wait(10)
    system.channel.close()
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"services outlived the kernel: {[p.pid for p in alive]}"


def test_kill_9_of_llmosd_brings_replicas_and_jobs_back(model_system: System,
                                                       tmp_path: Path) -> None:
    want = one_replica(model_system)[:len(PROMPTS)]   # JOBS begins with PROMPTS
    home = tmp_path / "home"
    system = boot(home, "--no-embedded")
    try:
        system.call("Deploy", kernel_pb2.DeployRequest(path=embedded_gguf(), name="m",
                                                       replicas=2), timeout=600)
        pids = spawn_all(system, "m", PROMPTS)
        while True:   # both replicas are decoding
            ps = system.call("Ps", kernel_pb2.PsRequest(all=True)).processes
            if {p.replica for p in ps if p.generated_tokens > 2} == {0, 1}:
                break
            time.sleep(0.05)
    finally:
        crash(system)
    system = boot(home, "--no-embedded")
    try:
        models = {m.name: m for m in system.call("Models", kernel_pb2.ModelsRequest()).models}
        assert models["m"].replicas == 2
        assert system.services()["inference.1"].state == "HEALTHY"
        replies = [wait(system, pid) for pid in pids]
        assert {r.info.replica for r in replies} == {0, 1}   # put back where they ran
        assert [list(r.token_ids) for r in replies] == want
    finally:
        assert shutdown(system) == 0
