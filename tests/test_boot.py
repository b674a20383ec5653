"""Boot the whole system, check every service is healthy, and shut it down cleanly."""

from __future__ import annotations

import os
import stat

import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from llmasos.proto import kernel_pb2

from conftest import System, boot, shutdown

SERVICES = {"security", "ipc", "scheduler", "inference"}


def test_boot_all_services_healthy_then_clean_shutdown(tmp_path) -> None:
    system = boot(tmp_path / "home", "--no-embedded")
    try:
        svcs = system.services()
        assert set(svcs) == SERVICES
        for s in svcs.values():
            assert s.state == "HEALTHY", s
            assert s.pid > 0 and s.address and s.incarnation == 1
        pids = [s.pid for s in svcs.values()]
    finally:
        code = shutdown(system)   # asserts no service process and no open port remain
    assert code == 0
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                   for pid in pids)


def test_root_token_file_is_private(bare_system: System) -> None:
    mode = stat.S_IMODE(os.stat(bare_system.home / "root.token").st_mode)
    assert mode == 0o600
    assert bare_system.call("WhoAmI", kernel_pb2.WhoAmIRequest()).user == "root"


def test_health_and_reflection_need_no_token(bare_system: System) -> None:
    health = health_pb2_grpc.HealthStub(bare_system.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="llmasos.v1.Kernel"), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(bare_system.channel)
    answers = list(refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    names = {s.name for s in answers[0].list_services_response.service}
    assert "llmasos.v1.Kernel" in names


def test_services_syscall_lists_supervised_services(bare_system: System) -> None:
    reply = bare_system.call("Services", kernel_pb2.ServicesRequest())
    assert {s.name for s in reply.services} == SERVICES
    assert all(s.uptime_s > 0 for s in reply.services)


def test_second_kernel_on_same_address_fails_clearly(bare_system: System, tmp_path) -> None:
    with pytest.raises(AssertionError, match="cannot listen"):
        _boot_on(bare_system.address, tmp_path)


def _boot_on(address: str, tmp_path) -> None:
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "llmasos.kernel.main", "run", "--listen",
                          address, "--home", str(tmp_path), "--no-embedded"],
                         capture_output=True, text=True, timeout=60)
    raise AssertionError(out.stderr + out.stdout)

