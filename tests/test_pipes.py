"""Pipes between jobs through the real daemon: a pipeline's output equals running its stages by
hand, readers prefill while writers run, and killing a stage behaves as Unix does."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest

from llmasos.proto import common_pb2, kernel_pb2

from conftest import MODEL, System, assert_no_kv_held, greedy, spawn, wait

STAGES = [
    ("The capital of France is", 24),
    ("Summarize in one sentence: {input}\nSummary:", 20),
    ("Question: which country is this about?\nText: {input}\nAnswer:", 8),
]


@pytest.fixture(autouse=True)
def no_leaked_blocks(model_system: System) -> Iterator[None]:
    yield
    assert_no_kv_held(model_system)


def spawn_reader(system: System, writer: int, prompt: str, max_tokens: int,
                 **extra: object) -> int:
    return system.call("Spawn", kernel_pb2.SpawnRequest(
        model=MODEL, prompt=prompt, stdin_pid=writer, sampling=greedy(max_tokens),
        **extra)).pid


def stat(system: System, pid: int) -> kernel_pb2.ProcessInfo:
    return system.call("Stat", kernel_pb2.StatRequest(pid=pid))


def test_three_stage_pipeline_equals_running_the_stages_by_hand(model_system: System) -> None:
    text, by_hand = "", []
    for i, (prompt, n) in enumerate(STAGES):
        filled = prompt.replace("{input}", text) if i else prompt
        reply = wait(model_system, spawn(model_system, filled, n))
        text = reply.text
        by_hand.append(list(reply.token_ids))
    a = spawn(model_system, STAGES[0][0], STAGES[0][1])
    b = spawn_reader(model_system, a, *STAGES[1])
    c = spawn_reader(model_system, b, *STAGES[2])
    assert list(stat(model_system, a).stdout_pids) == [b]      # ps shows the neighbours
    assert stat(model_system, c).stdin_pid == b
    piped = [list(wait(model_system, pid).token_ids) for pid in (a, b, c)]
    assert piped == by_hand


def test_reader_prefills_while_its_writer_runs(model_system: System) -> None:
    writer = model_system.call("Spawn", kernel_pb2.SpawnRequest(
        model=MODEL, prompt="Once upon a time, in a small village,",
        sampling=greedy(96, ignore_eos=True))).pid
    reader = spawn_reader(model_system, writer, "Continue the story: {input}", 8)
    fed_early = False
    while True:
        w, r = stat(model_system, writer), stat(model_system, reader)
        if w.state == common_pb2.PROC_ZOMBIE:
            break
        fed_early |= r.prompt_tokens > 20 and r.kv_blocks > 0
        time.sleep(0.05)
    assert fed_early, "the reader computed none of its input before the writer ended"
    done = wait(model_system, reader)
    assert done.info.stdin_exit_reason == common_pb2.EXIT_LENGTH
    wait(model_system, writer)


def test_killing_the_middle_stage(model_system: System) -> None:
    """Its writer gets SIGPIPE; its reader sees end of input and runs on what it got."""
    a = model_system.call("Spawn", kernel_pb2.SpawnRequest(
        model=MODEL, prompt="Once upon a time,", sampling=greedy(400, ignore_eos=True))).pid
    b = spawn_reader(model_system, a, "Retell: {input}", 400)
    c = spawn_reader(model_system, b, "Title for: {input}\nTitle:", 6)
    while stat(model_system, a).generated_tokens < 10:
        time.sleep(0.05)
    model_system.call("Kill", kernel_pb2.KillRequest(pid=b, signal=9))
    ra, rb, rc = (wait(model_system, p) for p in (a, b, c))
    assert rb.info.exit_reason == common_pb2.EXIT_KILLED
    assert ra.info.exit_reason == common_pb2.EXIT_KILLED and ra.info.exit_status == -13
    assert "broken pipe" in ra.info.exit_message
    assert rc.info.stdin_exit_reason == common_pb2.EXIT_KILLED
    assert rc.info.exit_reason in (common_pb2.EXIT_LENGTH, common_pb2.EXIT_STOP)


def test_a_writer_that_ignores_sigpipe_runs_on(model_system: System) -> None:
    a = model_system.call("Spawn", kernel_pb2.SpawnRequest(
        model=MODEL, prompt="The three primary colors are", ignore_sigpipe=True,
        sampling=greedy(40, ignore_eos=True))).pid
    b = spawn_reader(model_system, a, "Repeat: {input}", 8)
    model_system.call("Kill", kernel_pb2.KillRequest(pid=b, signal=9))
    assert wait(model_system, a).info.exit_reason == common_pb2.EXIT_LENGTH
    wait(model_system, b)


def test_reading_another_users_job_is_refused(model_system: System) -> None:
    token = model_system.adduser("piper")
    a = spawn(model_system, "The quick brown fox", 4)
    with pytest.raises(grpc.RpcError) as err:
        spawn_reader_as(model_system, a, token)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    wait(model_system, a)


def spawn_reader_as(system: System, writer: int, token: str) -> int:
    return system.call("Spawn", kernel_pb2.SpawnRequest(
        model=MODEL, prompt="{input}", stdin_pid=writer, sampling=greedy(4)), token=token).pid


# --- userland: LLMClient.pipe and llmsh's `|`, `<`, `>` ----------------------------------------

def llmsh(system: System, line: str, cwd: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMASOS_")}
    env.update(LLMASOS_ADDR=system.address, LLMASOS_TOKEN=system.root_token)
    return subprocess.run([sys.executable, "-m", "llmasos.shell.main", "-c", line], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=env)


def test_client_pipe_and_llmsh_pipeline_equal_the_stages_by_hand(model_system: System,
                                                                  tmp_path) -> None:
    from llmasos import LLMClient
    client = LLMClient(model_name=MODEL, address=model_system.address,
                       token=model_system.root_token)
    first = client.generate_text(STAGES[0][0], max_tokens=STAGES[0][1], temperature=0.0)
    second = client.generate_text(STAGES[1][0].replace("{input}", first),
                                  max_tokens=STAGES[1][1], temperature=0.0)
    procs = client.pipe(STAGES[0][0], STAGES[1][0], max_tokens=STAGES[1][1], temperature=0.0)
    assert procs[0].pid and procs[1].stat().stdin_pid == procs[0].pid
    assert procs[1].wait().text == client.generate_text(
        STAGES[1][0].replace("{input}", procs[0].wait().text), max_tokens=STAGES[1][1],
        temperature=0.0)
    (tmp_path / "facts.txt").write_text(first)
    reader = "Summarize in one sentence: {input} Summary:"   # one line: typed in a shell
    second = client.generate_text(reader.replace("{input}", first), max_tokens=12,
                                  temperature=0.0)
    line = (f"run --max-tokens {STAGES[0][1]} -t 0 '{STAGES[0][0]}' | "
            f"run --max-tokens 12 -t 0 '{reader}' > out.txt; "
            f"run --max-tokens 12 -t 0 '{reader}' < facts.txt >> out.txt")
    out = llmsh(model_system, line, str(tmp_path))
    assert out.returncode == 0, out.stderr
    shown = second if second.endswith("\n") else second + "\n"
    assert (tmp_path / "out.txt").read_text() == shown * 2
