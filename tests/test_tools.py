"""llm-ps, llm-kill, llm-top: formatting, argument handling and exit codes, then the real
commands against a booted llmosd."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from llmasos import LLMClient, errors, fmt
from llmasos.proto import common_pb2, kernel_pb2
from llmasos.tools import kill, ps, top

from conftest import System

# -- formatting ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n,text", [(0, "0B"), (512, "512B"), (1536, "1.5K"), (20 << 20, "20M"),
                                    (3 << 30, "3.0G"), (5 << 40, "5.0T")])
def test_size(n, text):
    assert fmt.size(n) == text


@pytest.mark.parametrize("s,text", [(0.42, "0.4s"), (42, "42s"), (185, "3m05s"),
                                    (7620, "2h07m"), (356400, "4d03h"), (-3, "0.0s")])
def test_duration(s, text):
    assert fmt.duration(s) == text


def test_count():
    assert [fmt.count(n) for n in (999, 1234, 35_000, 4_100_000, 134_515_008)] == \
        ["999", "1.2k", "35k", "4.1M", "135M"]


def test_table_aligns_columns():
    out = fmt.table(["PID", "USER"], [[1, "root"], [12345, "al"]], right=["PID"])
    lines = out.splitlines()
    assert lines == ["  PID  USER", "    1  root", "12345  al"]


def _proc(pid: int, **kw) -> kernel_pb2.ProcessInfo:
    base = dict(user="root", state=common_pb2.PROC_RUNNING, model="smollm2-135m", nice=0,
                prompt_tokens=12, generated_tokens=30, kv_blocks=3, created_unix=1000.0)
    return kernel_pb2.ProcessInfo(pid=pid, **{**base, **kw})


def test_ps_render_default_columns():
    out = ps.render([_proc(7), _proc(12345, user="alice", state=common_pb2.PROC_STOPPED,
                                     nice=-5)], ps.fields(ps.DEFAULT_FIELDS), now=1185.0)
    header, *rows = out.splitlines()
    assert header.split() == ["PID", "USER", "STATE", "MODEL", "PRIO", "TOK_IN", "TOK_OUT",
                              "KV", "AGE"]
    assert rows[0].split() == ["7", "root", "RUNNING", "smollm2-135m", "0", "12", "30", "3",
                               "3m05s"]
    assert rows[1].split()[:3] == ["12345", "alice", "STOPPED"]
    assert len({len(r) for r in (header, *rows)}) == 1  # aligned: equal widths


def test_ps_fields():
    assert ps.fields("PID, state,name") == ["pid", "state", "name"]
    with pytest.raises(ValueError, match="unknown field bogus"):
        ps.fields("pid,bogus")
    with pytest.raises(ValueError):
        ps.fields(",")


def test_services_render():
    out = ps.render_services([kernel_pb2.ServiceInfo(
        name="inference", pid=42, address="127.0.0.1:5", state="HEALTHY", restarts=2,
        uptime_s=75)])
    assert out.splitlines()[1].split() == ["inference", "42", "127.0.0.1:5", "HEALTHY", "2",
                                           "1m15s", "-"]
    node = kernel_pb2.NodeInfo(name="n1", address="10.0.0.2", state="LIVE", heartbeat_age_s=0.4,
                               replicas=["smol@1"], devices=[
                                   kernel_pb2.Device(kind="cpu", cores=16, memory_total=2 << 30,
                                                     memory_used=1 << 30),
                                   kernel_pb2.Device(kind="gpu", index=0, name="H200",
                                                     memory_total=4 << 30, utilization=0.25)])
    out = ps.render_services([kernel_pb2.ServiceInfo(
        name="n1/inference.1", state="HEALTHY", node="n1", replicas=["smol@1"])], [node])
    assert out.splitlines()[1].split()[-1] == "smol@1"
    assert out.splitlines()[-1].split()[:5] == ["n1", "10.0.0.2", "LIVE", "0.4s", "smol@1"]
    assert out.splitlines()[-1].endswith("cpu 16c 1.0/2.0G, gpu0 H200 0.0/4.0G 25%")


def test_top_frame_and_rates():
    rates = top.Rates()
    snap = kernel_pb2.PsResponse(processes=[_proc(1, generated_tokens=10)],
                                 kv=kernel_pb2.KvUsage(total_blocks=100, free_blocks=75,
                                                       block_size=16, block_bytes=1024))
    assert rates.update(list(snap.processes), 10.0) == {}
    snap.processes[0].generated_tokens = 30
    r = rates.update(list(snap.processes), 12.0)
    assert r == {1: 10.0}
    text = top.frame(snap, [kernel_pb2.ServiceInfo(name="scheduler", state="HEALTHY")], r, 12.0)
    assert "tokens/s: 10.0" in text and "KV: 25/100 blocks (25.0%)" in text
    assert "scheduler healthy" in text
    header = [line for line in text.splitlines() if line.startswith("PID")][0]
    assert header.split()[-1] == "TOK/S"


@pytest.mark.parametrize("argv,sig,pids", [
    (["5"], 15, [5]), (["-9", "5", "6"], 9, [5, 6]), (["-KILL", "5"], 9, [5]),
    (["-s", "STOP", "5"], 19, [5]), (["-SIGCONT", "--", "8"], 18, [8]),
    (["--signal", "term", "3"], 15, [3])])
def test_kill_parse(argv, sig, pids):
    got_sig, got_pids, _ = kill.parse(argv)
    assert (got_sig, got_pids) == (sig, pids)


@pytest.mark.parametrize("argv,msg", [([], "no pid"), (["-HUP", "5"], "unknown signal"),
                                      (["abc"], "not a job pid"), (["-s"], "needs a value"),
                                      (["0"], "not a job pid")])
def test_kill_parse_errors(argv, msg):
    with pytest.raises(kill.Usage, match=msg):
        kill.parse(argv)


# -- the commands ---------------------------------------------------------------------------------


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def tool(name: str, *args: str, env: dict | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"llmasos.tools.{name}", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args", [[], ["-FOO", "1"], ["-s"], ["x"]])
def test_kill_usage_errors_exit_2(args):
    out = tool("kill", *args)
    assert out.returncode == 2 and "usage: llm-kill" in out.stderr


def test_kill_list_signals():
    out = tool("kill", "-l")
    assert out.returncode == 0 and "9) KILL" in out.stdout and "19) STOP" in out.stdout


@pytest.mark.parametrize("name,args", [("ps", ["-o", "pid,nope"]), ("ps", ["--bogus"]),
                                       ("top", ["-d", "0"]), ("top", ["-n", "x"])])
def test_bad_options_exit_2(name, args):
    out = tool(name, *args)
    assert out.returncode == 2 and "error" in out.stderr


@pytest.mark.parametrize("name,args", [("ps", []), ("kill", ["5"]), ("top", ["-b", "-n", "1"])])
def test_no_kernel_gives_advice_and_exit_1(name, args):
    out = tool(name, *args, env={"LLMASOS_ADDR": _dead_address(), "LLMASOS_TOKEN": "x"})
    assert out.returncode == 1
    assert "cannot reach llmosd" in out.stderr and "llmosd run" in out.stderr
    assert "Traceback" not in out.stderr


def _env(system: System, token: str | None = None) -> dict:
    return {"LLMASOS_ADDR": system.address, "LLMASOS_HOME": str(system.home),
            "LLMASOS_TOKEN": token or system.root_token}


def test_ps_json_and_services(bare_system):
    out = tool("ps", "--json", "-a", env=_env(bare_system))
    assert out.returncode == 0, out.stderr
    assert isinstance(json.loads(out.stdout), list)
    out = tool("ps", "--services", env=_env(bare_system))
    assert out.returncode == 0
    header, *rows = out.stdout.splitlines()
    assert header.split() == ["NAME", "PID", "ADDRESS", "STATE", "RESTARTS", "UPTIME",
                              "REPLICAS"]
    assert {r.split()[0] for r in rows} == {"security", "ipc", "scheduler", "inference"}
    services = json.loads(tool("ps", "--services", "--json", env=_env(bare_system)).stdout)
    assert {s["name"] for s in services} == {"security", "ipc", "scheduler", "inference"}


def test_kill_unknown_pid_exit_1(bare_system):
    out = tool("kill", "-9", "987654", env=_env(bare_system))
    assert out.returncode == 1 and "(987654)" in out.stderr


def test_top_batch_frame(bare_system):
    out = tool("top", "-b", "-n", "2", "-d", "0.2", env=_env(bare_system))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("llm-top - ") == 2 and "inference healthy" in out.stdout


def test_bad_token_exit_1(bare_system):
    out = tool("ps", env=_env(bare_system, token="wrong"))
    assert out.returncode == 1 and "Traceback" not in out.stderr


# -- with jobs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gen_system(model_system: System) -> System:
    with LLMClient(address=model_system.address, token=model_system.root_token) as c:
        try:
            c.spawn("x", max_tokens=1).wait()
        except errors.Unimplemented:
            pytest.skip("Spawn answers UNIMPLEMENTED: generation is not wired into llmosd yet")
    return model_system


def test_ps_shows_job_then_kill_delivers(gen_system):
    with LLMClient(address=gen_system.address, token=gen_system.root_token) as c:
        proc = c.spawn("Tell me a very long story.", max_tokens=4000, name="story", ignore_eos=True)
        out = tool("ps", "--json", env=_env(gen_system))
        assert proc.pid in [int(p["pid"]) for p in json.loads(out.stdout)]
        table = tool("ps", "-o", "pid,user,name", env=_env(gen_system)).stdout
        assert any(line.split() == [str(proc.pid), "root", "story"]
                   for line in table.splitlines())
        assert tool("kill", "-STOP", str(proc.pid), env=_env(gen_system)).returncode == 0
        deadline = time.monotonic() + 30  # STOP acts at the job's next token boundary
        while c.stat(proc.pid).state != common_pb2.PROC_STOPPED:
            assert time.monotonic() < deadline, "SIGSTOP never took effect"
            time.sleep(0.05)
        stopped_at = c.stat(proc.pid).generated_tokens
        time.sleep(0.5)
        assert c.stat(proc.pid).generated_tokens == stopped_at  # really suspended
        assert tool("kill", "-CONT", str(proc.pid), env=_env(gen_system)).returncode == 0
        out = tool("kill", str(proc.pid), "987654", env=_env(gen_system))
        assert out.returncode == 1 and "(987654)" in out.stderr  # one of two failed
        assert c.wait(proc.pid).reason == "killed"


def test_user_killing_anothers_job_gets_an_error(gen_system):
    alice = gen_system.adduser("alice-tools")
    with LLMClient(address=gen_system.address, token=gen_system.root_token) as c:
        proc = c.spawn("Tell me a very long story.", max_tokens=4000, ignore_eos=True)
        try:
            out = tool("kill", str(proc.pid), env=_env(gen_system, token=alice))
            assert out.returncode == 1
            assert f"({proc.pid})" in out.stderr and "Traceback" not in out.stderr
            mine = json.loads(tool("ps", "--json", env=_env(gen_system, token=alice)).stdout)
            assert proc.pid not in [int(p["pid"]) for p in mine]
            hers = json.loads(tool("ps", "--json", "-a", "-u", "alice-tools",
                                   env=_env(gen_system)).stdout)
            assert proc.pid not in [int(p["pid"]) for p in hers]
            roots = json.loads(tool("ps", "--json", "-a", "-u", "root",
                                    env=_env(gen_system)).stdout)
            assert proc.pid in [int(p["pid"]) for p in roots]
        finally:
            c.kill(proc.pid, "KILL")
            c.wait(proc.pid)
