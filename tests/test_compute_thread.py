"""Every forward and KV copy of a process runs on its one compute thread, whichever thread
asks (services/inference/compute_thread.py): OpenMP's per-caller thread teams would otherwise
multiply and spin against each other."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from llmasos.services.inference.compute_thread import on_compute_thread


def test_calls_from_many_threads_run_on_one_other_thread() -> None:
    with ThreadPoolExecutor(8) as pool:
        seen = set(pool.map(lambda _: (on_compute_thread(threading.get_ident),
                                       threading.get_ident()), range(64)))
    ran_on = {compute for compute, _ in seen}
    callers = {caller for _, caller in seen}
    assert len(ran_on) == 1 and not ran_on & callers


def test_a_call_from_the_compute_thread_runs_inline_and_errors_reach_the_caller() -> None:
    outer = on_compute_thread(lambda: (threading.get_ident(),
                                       on_compute_thread(threading.get_ident)))
    assert outer[0] == outer[1]   # no deadlock: the nested call did not queue behind itself

    def fail() -> None:
        raise KeyError("no model 'x'")
    with pytest.raises(KeyError, match="no model"):
        on_compute_thread(fail)


def test_engine_steps_run_on_the_compute_thread(monkeypatch) -> None:
    from llmasos.services.inference.engine import Engine
    seen: list[int] = []
    monkeypatch.setattr(Engine, "_step", lambda self, name, entries: seen.append(
        threading.get_ident()) or [])
    engine = Engine("/nonexistent")
    threads = [threading.Thread(target=engine.step, args=("m", [])) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 4 and len(set(seen)) == 1
    assert seen[0] == on_compute_thread(threading.get_ident)
