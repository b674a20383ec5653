"""Crash-only services: kill -9 each one, it comes back; past the budget it is FAILED."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from llmasos.kernel.supervisor import MISSED_CHECKS_TO_KILL
from llmasos.proto import kernel_pb2
from llmasos.services.runtime import STACKS_SIGNAL

from conftest import System, boot, shutdown, start_service, stop_service


@pytest.mark.parametrize("name", ["security", "ipc", "scheduler", "inference"])
def test_killed_service_is_restarted(bare_system: System, name: str) -> None:
    before = bare_system.services()[name]
    os.kill(before.pid, signal.SIGKILL)
    after = bare_system.wait_services(
        lambda s: s[name].state == "HEALTHY" and s[name].incarnation > before.incarnation)
    s = after[name]
    assert s.pid != before.pid and s.restarts == before.restarts + 1
    assert "status -9" in s.last_exit
    assert "service_restarting" in bare_system.log_text()
    # The restarted service really serves: WhoAmI goes through security, Models through inference.
    assert bare_system.call("WhoAmI", kernel_pb2.WhoAmIRequest()).user == "root"
    bare_system.call("Models", kernel_pb2.ModelsRequest())


def test_a_service_that_stops_answering_is_killed_as_hung_and_restarted(
        bare_system: System) -> None:
    """SIGSTOP: alive, answering nothing; three missed health periods and it is replaced."""
    before = bare_system.services()["ipc"]
    os.kill(before.pid, signal.SIGSTOP)
    after = bare_system.wait_services(lambda s: s["ipc"].state == "HEALTHY"
                                      and s["ipc"].incarnation > before.incarnation)["ipc"]
    assert after.pid != before.pid
    assert f"no health answer in {MISSED_CHECKS_TO_KILL} periods; killed" in after.last_exit
    assert "service_unresponsive" in bare_system.log_text()


def test_silent_and_idle_is_hung_silent_and_busy_gets_more_time() -> None:
    """The kill rule as a table: (missed periods, CPU seconds over the last one) -> hung."""
    from llmasos.kernel.supervisor import BUSY_CHECKS_TO_KILL, BUSY_CPU_S, cpu_seconds, hung
    idle, busy = 0.0, 0.8
    assert [hung(m, idle) for m in (1, 2, 3, 4)] == [False, False, True, True]
    assert [hung(m, busy) for m in (3, BUSY_CHECKS_TO_KILL - 1)] == [False, False]
    assert hung(BUSY_CHECKS_TO_KILL, busy) and hung(3, BUSY_CPU_S / 2)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:   # what the rule reads: a spinning process's CPU time grows, a stopped one's does not
        time.sleep(0.5)
        first = cpu_seconds(spinner.pid)
        time.sleep(0.5)
        assert cpu_seconds(spinner.pid) - first > BUSY_CPU_S
        spinner.send_signal(signal.SIGSTOP)
        time.sleep(0.1)
        stopped = cpu_seconds(spinner.pid)
        time.sleep(0.3)
        assert cpu_seconds(spinner.pid) - stopped < BUSY_CPU_S
    finally:
        spinner.kill()
        spinner.wait()
    assert cpu_seconds(spinner.pid) == 0.0   # gone


def test_a_service_writes_every_threads_stack_when_asked(tmp_path: Path) -> None:
    """What the kernel asks of a service before killing it as hung: where each thread is."""
    err = tmp_path / "stderr"
    with err.open("w") as sink:
        svc = start_service("llmasos.services.ipc", stderr=sink)
    try:
        svc.proc.send_signal(STACKS_SIGNAL)
        deadline = time.monotonic() + 10
        while "in serve" not in err.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        text = err.read_text()
        assert "Current thread" in text and "in serve" in text, text   # the main thread's
        assert "Thread 0x" in text and "in _serve" in text, text   # and gRPC's server's
        assert svc.proc.poll() is None, "a stack dump must not end the service"
    finally:
        stop_service(svc.proc, svc.address)


def test_exhausted_restart_budget_marks_failed_and_kernel_keeps_working(tmp_path) -> None:
    system = boot(tmp_path / "home", "--no-embedded", "--restart-max", "1")
    try:
        first = system.services()["inference"]
        os.kill(first.pid, signal.SIGKILL)
        second = system.wait_services(lambda s: s["inference"].state == "HEALTHY"
                                      and s["inference"].incarnation == 2)["inference"]
        os.kill(second.pid, signal.SIGKILL)
        svcs = system.wait_services(lambda s: s["inference"].state == "FAILED")
        assert svcs["inference"].pid == 0
        assert all(s.state == "HEALTHY" for n, s in svcs.items() if n != "inference")
        # Syscalls that need it say so; everything else still answers.
        with pytest.raises(grpc.RpcError) as err:
            system.call("Models", kernel_pb2.ModelsRequest())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "FAILED" in err.value.details()
        assert system.call("Ps", kernel_pb2.PsRequest(all=True)).processes is not None
        assert system.call("WhoAmI", kernel_pb2.WhoAmIRequest()).root
        assert "service_failed" in system.log_text()
    finally:
        assert shutdown(system) == 0


def test_backoff_grows_over_a_crash_loop_and_resets_after_a_stable_run(tmp_path) -> None:
    """A service that dies while starting restarts at once, then backs off 0.5, 1 s...; one
    killed after serving as long as its start took (or STABLE_S) restarts at once, however
    often it was killed before (the soak's case)."""
    import time

    from llmasos.kernel.supervisor import (
        BACKOFF_START,
        STABLE_MIN_S,
        STABLE_S,
        ServiceSpec,
        Supervisor,
    )

    sup = Supervisor([ServiceSpec("ipc")], str(tmp_path), max_restarts=100)
    svc = sup.services["ipc"]

    def die(healthy_for: float | None, startup: float = 5.0) -> float:
        now = time.monotonic()
        svc.healthy_at = 0.0 if healthy_for is None else now - healthy_for
        svc.spawned_at = (svc.healthy_at or now) - startup
        sup._died(svc, "test")
        return round(svc.next_start - now, 1)

    assert [die(None) for _ in range(3)] == [0.0, BACKOFF_START, 2 * BACKOFF_START]
    assert die(STABLE_S + 1, startup=60) == 0.0   # a stable run resets the loop
    assert die(4.0) == BACKOFF_START      # served 4 s after a 5 s start: still a crash loop
    assert die(4.0) == 2 * BACKOFF_START
    assert die(6.0) == 0.0                # served longer than its start took: a fault
    assert die(STABLE_MIN_S / 2, startup=0.1) == BACKOFF_START   # a fast start needs 1 s
    assert die(STABLE_MIN_S / 2, startup=0.1) == 2 * BACKOFF_START
    assert svc.restarts == 9 and svc.state == "RESTARTING"
