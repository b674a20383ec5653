"""grpc.health.v1 reports the kernel and each supervised service by name."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import System

SERVING = health_pb2.HealthCheckResponse.SERVING


def status(system: System, name: str) -> int:
    stub = health_pb2_grpc.HealthStub(system.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status


def test_each_service_reports_by_name(bare_system: System) -> None:
    deadline = time.monotonic() + 30
    names = ["llmasos.v1.Kernel", "", "llmasos.security", "llmasos.ipc",
             "llmasos.scheduler", "llmasos.inference"]
    while any(status(bare_system, n) != SERVING for n in names):
        assert time.monotonic() < deadline, {n: status(bare_system, n) for n in names}
        time.sleep(0.2)


def test_unknown_health_name_is_not_found(bare_system: System) -> None:
    stub = health_pb2_grpc.HealthStub(bare_system.channel)
    try:
        stub.Check(health_pb2.HealthCheckRequest(service="llmasos.nope"), timeout=10)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND
    else:
        raise AssertionError("an unknown service name must be NOT_FOUND")


def test_draining_kernel_is_not_serving(tmp_path) -> None:
    """statuses() of a real (unstarted) Kernel: SERVING until it drains; services by state."""
    from llmasos.kernel.config import Config
    from llmasos.kernel.health import NOT_SERVING, statuses
    from llmasos.kernel.kernel import Kernel

    k = Kernel(Config(home=str(tmp_path)))
    before = statuses(k)
    assert before[""] == before["llmasos.v1.Kernel"] == SERVING
    assert before["llmasos.inference"] == NOT_SERVING   # STOPPED: not started
    k.supervisor.services["inference"].state = "HEALTHY"
    k.draining.set()
    after = statuses(k)
    assert after[""] == after["llmasos.v1.Kernel"] == NOT_SERVING
    assert after["llmasos.inference"] == SERVING
