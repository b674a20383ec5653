"""The process table: monotonic pids, legal transitions only, reaping, fast listing."""

from __future__ import annotations

import threading
import time

import pytest

from llmasos.kernel.proctable import TRANSITIONS, Exit, IllegalTransition, ProcessTable, State


def spawn(table: ProcessTable, user: str = "alice") -> object:
    return table.spawn(user=user, uid=1000, ppid=0, model="m", nice=0)


def test_pids_are_monotonic_and_never_reused() -> None:
    table = ProcessTable()
    a, b = spawn(table), spawn(table)
    assert (a.pid, b.pid) == (1, 2)
    table.exit(a, Exit.STOP)
    table.reap(a)
    assert spawn(table).pid == 3
    assert table.get(1) is None


@pytest.mark.parametrize("src", list(State))
@pytest.mark.parametrize("dst", list(State))
def test_only_listed_transitions_are_legal(src: State, dst: State) -> None:
    table = ProcessTable()
    proc = spawn(table)
    proc.state = src
    if dst in TRANSITIONS[src]:
        table.set_state(proc, dst)
        assert proc.state == dst
    else:
        with pytest.raises(IllegalTransition):
            table.set_state(proc, dst)
        assert proc.state == src


def test_exit_records_status_and_reap_removes() -> None:
    table = ProcessTable()
    proc = spawn(table)
    table.set_state(proc, State.READY)
    table.set_state(proc, State.RUNNING)
    assert proc.started > 0
    table.exit(proc, Exit.KILLED, -9, "killed")
    assert (proc.state, proc.exit_reason, proc.exit_status) == (State.ZOMBIE, Exit.KILLED, -9)
    table.reap(proc)
    assert proc.state == State.REAPED and len(table) == 0


def test_a_status_handed_out_is_kept_for_a_wait_asked_again(monkeypatch) -> None:
    from llmasos.kernel import proctable
    table = ProcessTable()
    waited, expired, unanswered = spawn(table), spawn(table), spawn(table)
    for proc in (waited, expired, unanswered):
        table.exit(proc, Exit.STOP)
    table.reap(expired, answered=True)
    real = time.monotonic   # from now on the clock reads ANSWERED_KEEP_S + 1 s later
    monkeypatch.setattr(proctable.time, "monotonic",
                        lambda: real() + proctable.ANSWERED_KEEP_S + 1)
    table.reap(waited, answered=True)
    table.reap(unanswered)   # the zombie timeout: nobody was told
    assert table.answered_wait(waited.pid) is waited and table.get(waited.pid) is None
    assert table.answered_wait(expired.pid) is None       # kept past ANSWERED_KEEP_S
    assert table.answered_wait(unanswered.pid) is None


def test_zombies_are_reaped_after_ttl() -> None:
    table = ProcessTable(zombie_ttl=5)
    old, young, live = spawn(table), spawn(table), spawn(table)
    table.exit(old, Exit.STOP)
    table.exit(young, Exit.STOP)
    old.ended -= 10
    assert table.reap_expired() == [old.pid]
    assert table.get(young.pid) is young and table.get(live.pid) is live


def test_listing_filters_by_user_in_pid_order() -> None:
    table = ProcessTable()
    for i in range(10):
        spawn(table, "alice" if i % 2 else "bob")
    assert [p.pid for p in table.listing("alice")] == [2, 4, 6, 8, 10]
    assert [p.pid for p in table.listing()] == list(range(1, 11))


def test_ten_thousand_entries() -> None:
    """(Their listing speed is bench/syscall_latency.py's ps_10000_ms.)"""
    table = ProcessTable()
    for _ in range(10_000):
        spawn(table)
    procs = table.listing()
    assert [p.pid for p in procs] == list(range(1, 10_001))
    assert table.get(5_000).pid == 5_000 and len(table) == 10_000


def test_a_jobs_watchers_wake_for_that_job_only_and_go_with_it() -> None:
    """Read and Wait sleep on their job's own condition: another job's output or exit wakes
    none of them, their own job's does, and the condition is dropped once the job is reaped."""
    table = ProcessTable()
    mine, other = spawn(table), spawn(table)
    woken: list[str] = []
    watcher = table.watch(mine)
    started = threading.Event()

    def wait() -> None:
        with watcher:
            started.set()
            while mine.state != State.ZOMBIE:
                woken.append("wake" if watcher.wait(5.0) else "timeout")

    t = threading.Thread(target=wait)
    t.start()
    started.wait(5)
    with table.lock:   # the waiter holds the lock until it sleeps
        table.touch(other)
        table.exit(other, Exit.STOP)
    time.sleep(0.2)
    assert woken == []   # nothing of mine happened
    with table.lock:
        table.touch(mine)
    time.sleep(0.2)
    assert woken == ["wake"]
    table.exit(mine, Exit.STOP)
    t.join(5)
    assert woken == ["wake", "wake"] and not t.is_alive()
    assert table.watch(mine) is watcher   # kept while it is a zombie (a Wait may still come)
    table.reap(mine)
    assert mine.pid not in table.watchers
