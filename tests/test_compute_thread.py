"""Every forward and KV copy of a process runs on its one compute thread, whichever thread
asks (services/inference/compute_thread.py): OpenMP's per-caller thread teams would otherwise
multiply and spin against each other."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

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
    monkeypatch.setattr(Engine, "_launch", lambda self, name, entries: seen.append(
        threading.get_ident()) or [])
    engine = Engine("/nonexistent")
    threads = [threading.Thread(target=engine.step, args=("m", [])) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 4 and len(set(seen)) == 1
    assert seen[0] == on_compute_thread(threading.get_ident)


def test_a_load_runs_on_a_passing_thread_whose_openmp_team_ends_with_it(
        monkeypatch, tmp_path) -> None:
    """A second long-lived OpenMP team slows every step (compute_thread.py): the load's thread,
    and the worker threads its parallel matmuls started, are gone once load() returns."""
    import psutil
    import torch

    from llmasos.services.inference.engine import Engine

    def parallel_work() -> threading.Thread:
        a = torch.randn(512, 512)
        for _ in range(4):
            a = torch.tanh(a @ a)   # a parallel region: this thread gets its OpenMP team
        return threading.current_thread()

    ran_on: list[threading.Thread] = []

    def load(*_: object, **__: object) -> SimpleNamespace:
        ran_on.append(parallel_work())
        return SimpleNamespace(entry="m's entry", model=None)
    monkeypatch.setattr(Engine, "_load", load)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"")
    engine = Engine(str(tmp_path))
    on_compute_thread(parallel_work)   # the compute thread's own team, there for good
    before = psutil.Process().num_threads()
    assert engine.load("m", str(model)) == "m's entry"
    (loader,) = ran_on
    assert loader is not threading.current_thread() and not loader.is_alive()
    assert loader.ident != on_compute_thread(threading.get_ident)
    # the OS threads end just after join() returns: libgomp's workers wind down on their own
    deadline = time.monotonic() + 10
    while psutil.Process().num_threads() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert psutil.Process().num_threads() == before
    if torch.get_num_threads() > 1:   # the same work on a thread that stays keeps its team
        keeper = ThreadPoolExecutor(1)
        keeper.submit(parallel_work).result()
        assert psutil.Process().num_threads() > before + 1
        keeper.shutdown()


def test_a_failed_load_raises_in_the_caller(monkeypatch, tmp_path) -> None:
    from llmasos.services.inference.engine import Engine

    def fail(*_: object, **__: object) -> None:
        raise ValueError("unsupported architecture 'x'")
    monkeypatch.setattr(Engine, "_load", fail)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"")
    engine = Engine(str(tmp_path))
    with pytest.raises(ValueError, match="unsupported architecture"):
        engine.load("m", str(model))
    assert engine.models() == [] and not engine._loading
