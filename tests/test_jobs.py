"""Jobs end to end through the syscall ABI: spawn, stream, wait, signals, ownership, and the
kernel keeping its jobs across service crashes. Every test ends with no KV block held."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from llmasos.proto import common_pb2, kernel_pb2

from conftest import (
    MODEL,
    PROMPTS,
    System,
    alone,
    assert_no_kv_held,
    boot,
    booted_model_system,
    greedy,
    kv,
    shutdown,
    spawn,
    uninterrupted,
    wait,
)

STOPPED, ZOMBIE = common_pb2.PROC_STOPPED, common_pb2.PROC_ZOMBIE


# its own system, not the shared one: every test checks that no KV block of any job is left
model_system = pytest.fixture(scope="module", name="model_system")(booted_model_system)


@pytest.fixture(autouse=True)
def no_leaked_blocks(model_system: System) -> Iterator[None]:
    yield
    assert_no_kv_held(model_system)


def test_spawn_wait_returns_text_counts_and_timings(model_system: System) -> None:
    pid = spawn(model_system, "The capital of France is", max_tokens=8)
    reply = wait(model_system, pid)
    assert reply.info.pid == pid and reply.info.state == common_pb2.PROC_REAPED
    assert len(reply.token_ids) == reply.info.generated_tokens <= 8
    assert reply.text.strip(), "generated text must not be empty"
    assert reply.info.exit_reason in (common_pb2.EXIT_LENGTH, common_pb2.EXIT_STOP)
    assert reply.timings.total_ms >= reply.timings.ttft_ms > 0
    assert "Paris" in reply.text
    with pytest.raises(grpc.RpcError) as err:   # reaped: gone from the table
        model_system.call("Stat", kernel_pb2.StatRequest(pid=pid))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_read_streams_the_same_text_as_wait(model_system: System) -> None:
    pid = spawn(model_system, "Once upon a time, in a small village,", max_tokens=16)
    chunks = list(model_system.kernel.Read(kernel_pb2.ReadRequest(pid=pid),
                                           metadata=model_system.auth(), timeout=300))
    assert chunks[-1].done and chunks[-1].exit_reason != 0
    assert len(chunks) >= 2, "output must arrive in pieces as it is produced"
    streamed = "".join(c.text for c in chunks)
    ids = [i for c in chunks for i in c.token_ids]
    reply = wait(model_system, pid)
    assert streamed == reply.text and ids == list(reply.token_ids)


def test_chat_messages_use_the_chat_template(model_system: System) -> None:
    msgs = common_pb2.ChatMessages(messages=[
        common_pb2.ChatMessage(role="user", content="What is the capital of France?")])
    pid = model_system.call("Spawn", kernel_pb2.SpawnRequest(
        model=MODEL, messages=msgs, sampling=greedy(24))).pid
    reply = wait(model_system, pid)
    assert reply.info.prompt_tokens > 10   # the template's role markers were added
    assert "Paris" in reply.text


def test_stop_string_ends_the_job(model_system: System) -> None:
    full = wait(model_system, spawn(model_system, "1, 2, 3, 4,", max_tokens=24)).text
    assert " 6," in full
    pid = spawn(model_system, "1, 2, 3, 4,", max_tokens=24, stop=[" 6,"])
    reply = wait(model_system, pid)
    assert reply.info.exit_reason == common_pb2.EXIT_STOP
    assert reply.text == full[:full.index(" 6,")]


def test_other_users_jobs_are_off_limits(model_system: System) -> None:
    alice, bob = model_system.adduser("alice"), model_system.adduser("bob")
    pid = spawn(model_system, "The quick brown fox", max_tokens=64, token=alice)
    for name, req in [("Stat", kernel_pb2.StatRequest(pid=pid)),
                      ("Kill", kernel_pb2.KillRequest(pid=pid, signal=9)),
                      ("Wait", kernel_pb2.WaitRequest(pid=pid)),
                      ("Nice", kernel_pb2.NiceRequest(pid=pid, nice=5))]:
        with pytest.raises(grpc.RpcError) as err:
            model_system.call(name, req, token=bob)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
    with pytest.raises(grpc.RpcError) as err:
        list(model_system.kernel.Read(kernel_pb2.ReadRequest(pid=pid),
                                      metadata=model_system.auth(bob), timeout=30))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert [p.pid for p in model_system.call("Ps", kernel_pb2.PsRequest(), token=bob)
            .processes] == []
    assert pid in [p.pid for p in model_system.call("Ps", kernel_pb2.PsRequest(),
                                                    token=alice).processes]
    assert model_system.call("Stat", kernel_pb2.StatRequest(pid=pid)).user == "alice"  # root
    with pytest.raises(grpc.RpcError) as err:   # raising priority needs root
        model_system.call("Nice", kernel_pb2.NiceRequest(pid=pid, nice=-5), token=alice)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    model_system.call("Kill", kernel_pb2.KillRequest(pid=pid, signal=9), token=alice)
    assert wait(model_system, pid, token=alice).info.exit_reason == common_pb2.EXIT_KILLED
    # reaped: a Wait asked again (its first reply lost in flight) gets the same answer, only
    # for its owner; to anyone else the job does not exist
    again = wait(model_system, pid, token=alice)
    assert again.info.exit_reason == common_pb2.EXIT_KILLED and again.info.user == "alice"
    with pytest.raises(grpc.RpcError) as err:
        model_system.call("Wait", kernel_pb2.WaitRequest(pid=pid), token=bob)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_kill_mid_generation_frees_blocks(model_system: System) -> None:
    pid = spawn(model_system, "Once upon a time, in a small village,", max_tokens=400)
    deadline = time.monotonic() + 120
    while model_system.call("Stat", kernel_pb2.StatRequest(pid=pid)).generated_tokens < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert model_system.call("Stat", kernel_pb2.StatRequest(pid=pid)).kv_blocks > 0
    model_system.call("Kill", kernel_pb2.KillRequest(pid=pid, signal=common_pb2.SIGTERM))
    reply = wait(model_system, pid)
    assert reply.info.exit_reason == common_pb2.EXIT_KILLED and reply.info.exit_status == -15
    assert 3 <= reply.info.generated_tokens < 400
    usage = kv(model_system)
    assert usage.free_blocks == usage.total_blocks


def test_stop_and_cont_resume_with_identical_output(model_system: System) -> None:
    prompt = "The three primary colors are"
    expected = alone(model_system, prompt, 32)
    pid = spawn(model_system, prompt, max_tokens=32)
    while model_system.call("Stat", kernel_pb2.StatRequest(pid=pid)).generated_tokens < 4:
        time.sleep(0.02)
    state = model_system.call("Kill", kernel_pb2.KillRequest(pid=pid, signal=19)).state
    assert state in (STOPPED, common_pb2.PROC_RUNNING)
    deadline = time.monotonic() + 60   # it stops at a token boundary, then its KV goes to host
    while (info := model_system.call("Stat", kernel_pb2.StatRequest(pid=pid))).kv_blocks:
        assert time.monotonic() < deadline, info
        time.sleep(0.02)
    assert info.state == STOPPED
    held = info.generated_tokens
    time.sleep(0.5)
    assert model_system.call("Stat", kernel_pb2.StatRequest(pid=pid)).generated_tokens == held
    with pytest.raises(grpc.RpcError) as err:   # only a stopped job can be continued
        model_system.call("Kill", kernel_pb2.KillRequest(pid=pid + 1000, signal=18))
    model_system.call("Kill", kernel_pb2.KillRequest(pid=pid, signal=18))
    assert list(wait(model_system, pid).token_ids) == expected
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    log = model_system.log_text()
    assert "job_swapped_out" in log and "job_swapped_in" in log   # the KV went to host


def test_cont_on_a_running_job_is_a_precondition_error(model_system: System) -> None:
    pid = spawn(model_system, "My favourite book is", max_tokens=64)
    with pytest.raises(grpc.RpcError) as err:
        model_system.call("Kill", kernel_pb2.KillRequest(pid=pid, signal=18))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    model_system.call("Kill", kernel_pb2.KillRequest(pid=pid, signal=9))
    wait(model_system, pid)


def test_concurrent_spawns_match_alone(model_system: System) -> None:
    # 16 jobs spawned at once share steps; 32 rows are checked in process (test_engine)
    n = 16
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(n)]
    expected = [alone(model_system, p) for p in prompts]
    results: dict[int, list[int]] = {}

    def one(i: int) -> None:
        results[i] = list(wait(model_system, spawn(model_system, prompts[i])).token_ids)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert [results.get(i) for i in range(n)] == expected


def test_processes_survive_service_crashes(model_system: System) -> None:
    """kill -9 each service while jobs sit in the table; the table keeps them."""
    pids = [spawn(model_system, p, max_tokens=200) for p in PROMPTS[:3]]
    for pid in pids:
        model_system.call("Kill", kernel_pb2.KillRequest(pid=pid, signal=19))
    deadline = time.monotonic() + 120   # a job in a step stops at its next token boundary
    for pid in pids:
        while model_system.call("Stat", kernel_pb2.StatRequest(pid=pid)).state != STOPPED:
            assert time.monotonic() < deadline, f"job {pid} never stopped"
            time.sleep(0.02)
    for name in ("security", "ipc", "scheduler", "inference"):
        before = model_system.services()[name]
        os.kill(before.pid, signal.SIGKILL)
        model_system.wait_services(lambda s, n=name, b=before: s[n].state == "HEALTHY"
                                   and s[n].incarnation > b.incarnation)
        listed = {p.pid: p for p in
                  model_system.call("Ps", kernel_pb2.PsRequest(all=True)).processes}
        assert all(listed[pid].state == STOPPED for pid in pids), name
    for pid in pids:
        model_system.call("Kill", kernel_pb2.KillRequest(pid=pid, signal=9))
        assert wait(model_system, pid).info.exit_reason == common_pb2.EXIT_KILLED


def test_inference_crash_mid_load_loses_no_job(model_system: System) -> None:
    prompts = PROMPTS[:6]
    expected = uninterrupted(model_system, prompts, 24)
    pids = [spawn(model_system, p, max_tokens=24) for p in prompts]
    while sum(model_system.call("Stat", kernel_pb2.StatRequest(pid=p)).generated_tokens
              for p in pids) < 10:
        time.sleep(0.02)
    os.kill(model_system.services()["inference"].pid, signal.SIGKILL)
    assert [list(wait(model_system, p).token_ids) for p in pids] == expected


def test_small_kv_pool_completes_every_job_through_preemption(model_system: System,
                                                             tmp_path) -> None:
    expected = uninterrupted(model_system, list(PROMPTS), 40)   # a pool that holds them all
    system = boot(tmp_path / "home", "--kv-budget-mb", "12")
    try:
        usage = kv(system)
        assert usage.total_blocks < 24, usage
        prompts = list(PROMPTS)   # ~50 tokens each at the end: twice what the pool holds
        pids = [spawn(system, p, max_tokens=40) for p in prompts]
        replies = [wait(system, pid) for pid in pids]
        assert [list(r.token_ids) for r in replies] == expected
        assert sum(r.info.preemptions for r in replies) > 0, "the load must have preempted"
        log = system.log_text()
        assert '"mode": "swap"' in log and "job_swapped_in" in log   # decoding jobs swapped
        assert_no_kv_held(system)
    finally:
        assert shutdown(system) == 0


def test_nice_value_changes_the_order(tmp_path) -> None:
    system = boot(tmp_path / "home", "--policy", "priority", "--max-batch", "1")
    try:
        # One job per step: the scheduler's order is the order in which they finish.
        low = spawn(system, PROMPTS[0], max_tokens=30, nice=19)
        normal = spawn(system, PROMPTS[1], max_tokens=30, nice=0)
        high = spawn(system, PROMPTS[2], max_tokens=30, nice=-10)
        ends = {pid: wait(system, pid).info.ended_unix for pid in (low, normal, high)}
        assert ends[high] < ends[normal] < ends[low]
        assert_no_kv_held(system)
    finally:
        assert shutdown(system) == 0


def test_sigterm_refuses_spawns_gives_running_jobs_grace_then_kills_them(tmp_path) -> None:
    """While llmosd drains (a job runs, --grace 3), a Spawn is refused with UNAVAILABLE; until
    the signal is handled one may still get in (it ends with the rest)."""
    system = boot(tmp_path / "home", "--grace", "3")
    pid = spawn(system, PROMPTS[0], max_tokens=4000, ignore_eos=True)
    while system.call("Stat", kernel_pb2.StatRequest(pid=pid)).generated_tokens < 2:
        time.sleep(0.05)
    start = time.monotonic()
    system.proc.send_signal(signal.SIGTERM)
    while True:
        try:
            spawn(system, PROMPTS[1], max_tokens=4)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            assert "shutting down" in err.details(), err.details()
            break
        # by time, not tries: a loaded host may handle the signal late (the drain, and so the
        # window where Spawn is refused, lasts --grace from then: the job keeps it open)
        assert time.monotonic() - start < 30, "Spawn was still accepted 30 s after SIGTERM"
        time.sleep(0.02)
    assert shutdown(system) == 0          # also asserts no process and no port is left
    assert time.monotonic() - start < 30 + 3 + 20
    assert '"reason": "SHUTDOWN"' in system.log_text() or \
        '"reason": "KILLED"' in system.log_text()


def test_n_samples_share_the_prompt_through_fork(model_system: System) -> None:
    prompt = "Water boils at a temperature of"
    expected = alone(model_system, prompt, 16)
    reply = model_system.call("Spawn", kernel_pb2.SpawnRequest(
        model=MODEL, prompt=prompt, n=3, sampling=greedy(16)))
    assert len(reply.pids) == 3 and reply.pids[0] == reply.pid
    results = [wait(model_system, pid) for pid in reply.pids]
    # Greedy samples computed on forked (shared, copy-on-write) KV equal the job run alone.
    assert all(list(r.token_ids) == expected for r in results)
    assert [r.info.ppid for r in results] == [0, reply.pid, reply.pid]
    assert model_system.log_text().count('"event": "job_forked"') >= 2


def test_seeded_n_samples_are_distinct_and_reproducible(model_system: System) -> None:
    def run() -> list[list[int]]:
        reply = model_system.call("Spawn", kernel_pb2.SpawnRequest(
            model=MODEL, prompt="Once upon a time", n=3, sampling=common_pb2.SamplingParams(
                temperature=1.0, seed=1234, max_tokens=12)))
        return [list(wait(model_system, pid).token_ids) for pid in reply.pids]
    first, second = run(), run()
    assert first == second
    assert len({tuple(x) for x in first}) > 1, "each sample must draw its own stream"


def test_killing_a_stopped_job_drops_its_swapped_kv(model_system: System) -> None:
    """A stopped job's KV is copied to host memory with the next step's I/O; killed, the job
    has that copy dropped in the inference service (Release), not kept."""
    pid = spawn(model_system, PROMPTS[3], max_tokens=200)
    while model_system.call("Stat", kernel_pb2.StatRequest(pid=pid)).generated_tokens < 2:
        time.sleep(0.02)
    model_system.call("Kill", kernel_pb2.KillRequest(pid=pid, signal=19))
    while model_system.call("Stat", kernel_pb2.StatRequest(pid=pid)).state != STOPPED:
        time.sleep(0.02)
    wait(model_system, spawn(model_system, PROMPTS[4], max_tokens=2))   # a step: the copy
    events = [json.loads(line) for line in model_system.log_text().splitlines()
              if '"job_swapped_out"' in line]
    assert any(e.get("pid") == pid for e in events), "the stopped job's KV was never copied out"
    dropped_before = model_system.log_text().count('"swap_copies_dropped"')
    model_system.call("Kill", kernel_pb2.KillRequest(pid=pid, signal=9))
    assert wait(model_system, pid).info.exit_reason == common_pb2.EXIT_KILLED
    deadline = time.monotonic() + 30   # the Release goes out with the loop's next round
    while model_system.log_text().count('"swap_copies_dropped"') == dropped_before:
        assert time.monotonic() < deadline, "the killed job's host copy was never dropped"
        time.sleep(0.05)


def test_many_open_read_streams_do_not_starve_the_kernel(model_system: System) -> None:
    """Each Read holds a server thread for its job's life; 48 of them (more than a small
    pool) must leave the kernel answering and each stream must still run to its end."""
    pids = [spawn(model_system, PROMPTS[i % len(PROMPTS)], max_tokens=4) for i in range(48)]

    def signal_unless_ended(pid: int, sig: int) -> None:
        try:   # a 4-token job can end before its SIGSTOP arrives: its stream ends at once
            model_system.call("Kill", kernel_pb2.KillRequest(pid=pid, signal=sig))
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err

    for pid in pids:
        signal_unless_ended(pid, 19)
    done: dict[int, bool] = {}

    def read(pid: int) -> None:
        chunks = list(model_system.kernel.Read(kernel_pb2.ReadRequest(pid=pid),
                                               metadata=model_system.auth(), timeout=300))
        done[pid] = chunks[-1].done

    threads = [threading.Thread(target=read, args=(pid,)) for pid in pids]
    for t in threads:
        t.start()
    time.sleep(1.0)   # every stream is open and waiting on a stopped job
    assert model_system.call("Stat", kernel_pb2.StatRequest(pid=pids[0]), timeout=10).pid
    for pid in pids:
        signal_unless_ended(pid, 18)
    for t in threads:
        t.join(300)
    assert all(done.get(pid) for pid in pids)
    for pid in pids:
        wait(model_system, pid)
