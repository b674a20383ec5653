"""The control plane runs SCHED_BATCH and the forward SCHED_OTHER (kernel/cpu_policy.py): on
every thread of llmosd and its deciding services, and every thread of the inference service,
its compute and OpenMP threads included; off with LLMASOS_CONTROL_POLICY=other; and the switch
back needs no privilege."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from conftest import System, boot, shutdown, spawn, wait

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"),
                                reason="scheduling policies are Linux's")


def policies(pid: int) -> dict[int, int]:
    """Each thread of pid: its scheduling policy."""
    return {t.id: os.sched_getscheduler(t.id) for t in psutil.Process(pid).threads()}


def test_llmosd_and_deciding_services_batch_the_inference_service_not(
        model_system: System) -> None:
    wait(model_system, spawn(model_system, "Count to five.", max_tokens=4))  # threads started
    kernel = policies(model_system.proc.pid)
    assert set(kernel.values()) == {os.SCHED_BATCH}, kernel
    services = model_system.services()
    assert {"inference", "scheduler", "security", "ipc"} <= set(services)
    for name, svc in services.items():
        want = os.SCHED_OTHER if name.startswith("inference") else os.SCHED_BATCH
        threads = policies(svc.pid)
        assert set(threads.values()) == {want}, (name, threads)
    assert len(policies(services["inference"].pid)) > 2   # gRPC, compute and OpenMP threads


def test_the_control_policy_can_be_left_alone(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LLMASOS_CONTROL_POLICY", "other")
    system = boot(tmp_path / "home", "--no-embedded")
    try:
        pids = [system.proc.pid] + [s.pid for s in system.services().values()]
        for pid in pids:
            assert set(policies(pid).values()) == {os.SCHED_OTHER}, pid
    finally:
        assert shutdown(system) == 0


PREMISE = """
import os
os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
batch = os.sched_getscheduler(0)
os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
print(os.getuid(), batch, os.sched_getscheduler(0))
"""


def test_leaving_batch_needs_no_privilege() -> None:
    """What data_plane() relies on, as an unprivileged user: nobody, with the system's Python,
    when the tests run as root (nobody cannot reach the test interpreter under /root)."""
    python = "/usr/bin/python3" if os.getuid() == 0 else sys.executable
    if not os.path.exists(python):
        pytest.skip("no system Python to run as nobody")
    drop = (lambda: os.setuid(65534)) if os.getuid() == 0 else None
    out = subprocess.run([python, "-c", PREMISE], capture_output=True, text=True, timeout=60,
                         preexec_fn=drop, cwd="/")
    assert out.returncode == 0, out.stderr
    uid, batch, after = map(int, out.stdout.split())
    assert uid != 0 and batch == os.SCHED_BATCH and after == os.SCHED_OTHER


def test_data_plane_switches_threads_started_before_it() -> None:
    """A thread started while the process ran SCHED_BATCH is switched too."""
    code = """
import os, threading
from llmasos.kernel import cpu_policy
assert cpu_policy.control_plane()
stop = threading.Event()
t = threading.Thread(target=stop.wait)
t.start()
assert os.sched_getscheduler(t.native_id) == os.SCHED_BATCH
assert cpu_policy.data_plane()
print(os.sched_getscheduler(t.native_id), os.sched_getscheduler(0))
stop.set()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert list(map(int, out.stdout.split())) == [os.SCHED_OTHER, os.SCHED_OTHER]
