"""Authentication and ownership: exactly UNAUTHENTICATED / PERMISSION_DENIED where due."""

from __future__ import annotations

import grpc
import pytest

from llmasos.kernel.auth import bearer
from llmasos.proto import kernel_pb2
from llmasos.syscalls import BY_NAME, SYSCALLS

from conftest import System

REQUESTS = {
    "Spawn": kernel_pb2.SpawnRequest(model="m", prompt="hi"),
    "Wait": kernel_pb2.WaitRequest(pid=1),
    "Read": kernel_pb2.ReadRequest(pid=1),
    "Poll": kernel_pb2.PollRequest(follow=[kernel_pb2.ReadRequest(pid=1)]),
    "Kill": kernel_pb2.KillRequest(pid=1, signal=15),
    "Nice": kernel_pb2.NiceRequest(pid=1, nice=1),
    "Ps": kernel_pb2.PsRequest(),
    "Stat": kernel_pb2.StatRequest(pid=1),
    "Models": kernel_pb2.ModelsRequest(),
    "Deploy": kernel_pb2.DeployRequest(path="/nonexistent", name="x"),
    "DeployStream": kernel_pb2.DeployRequest(path="/nonexistent", name="x"),
    "Undeploy": kernel_pb2.UndeployRequest(name="x"),
    "WhoAmI": kernel_pb2.WhoAmIRequest(),
    "Services": kernel_pb2.ServicesRequest(),
    "SetQuota": kernel_pb2.SetQuotaRequest(user="root", max_jobs=1),
    "Audit": kernel_pb2.AuditRequest(),
    "MboxCreate": kernel_pb2.MboxCreateRequest(name="m"),
    "MboxSend": kernel_pb2.MboxSendRequest(name="m", text="x"),
    "MboxRecv": kernel_pb2.MboxRecvRequest(name="m"),
    "MboxList": kernel_pb2.MboxListRequest(),
    "MboxRemove": kernel_pb2.MboxRemoveRequest(name="m"),
    "Alias": kernel_pb2.AliasRequest(name="x", target="y"),
    "ShmCreate": kernel_pb2.ShmCreateRequest(name="s", model="x", text="hi"),
    "ShmRemove": kernel_pb2.ShmRemoveRequest(name="s"),
    "ShmList": kernel_pb2.ShmListRequest(),
    "Metrics": kernel_pb2.MetricsRequest(),
}


def code_of(system: System, name: str, request: object, metadata: list) -> grpc.StatusCode:
    if BY_NAME[name].bidi:   # its requests stream: one, then the caller's side closes
        request = iter([request])
    try:
        reply = getattr(system.kernel, name)(request, metadata=metadata, timeout=30)
        if BY_NAME[name].stream:
            list(reply)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_bearer_scheme_is_case_insensitive_per_rfc_6750() -> None:
    for value in ("Bearer t0k", "bearer t0k", "BEARER t0k", "  Bearer   t0k  "):
        assert bearer((("authorization", value),)) == "t0k", value
    for value in ("Basic t0k", "Bearert0k", "Bearer ", "t0k", ""):
        assert bearer((("authorization", value),)) == "", value
    assert bearer((("x-other", "Bearer t0k"),)) == ""
    assert bearer(None) == ""


def test_table_covers_every_rpc() -> None:
    assert set(REQUESTS) == {s.name for s in SYSCALLS}


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_no_token_is_unauthenticated(bare_system: System, name: str) -> None:
    assert code_of(bare_system, name, REQUESTS[name], []) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_wrong_token_is_unauthenticated(bare_system: System, name: str) -> None:
    md = [("authorization", "Bearer llmos_not-a-real-token")]
    assert code_of(bare_system, name, REQUESTS[name], md) == grpc.StatusCode.UNAUTHENTICATED


def test_malformed_authorization_header(bare_system: System) -> None:
    md = [("authorization", bare_system.root_token)]   # no "Bearer "
    assert code_of(bare_system, "WhoAmI", REQUESTS["WhoAmI"], md) == \
        grpc.StatusCode.UNAUTHENTICATED


def test_new_user_identity_and_limits(bare_system: System) -> None:
    token = bare_system.adduser("alice")
    me = bare_system.call("WhoAmI", kernel_pb2.WhoAmIRequest(), token=token)
    assert (me.user, me.root) == ("alice", False) and me.uid >= 1000
    assert "admin" not in me.capabilities
    md = bare_system.auth(token)
    for name in ("Deploy", "DeployStream"):
        assert code_of(bare_system, name, REQUESTS[name], md) == \
            grpc.StatusCode.PERMISSION_DENIED, name
    assert code_of(bare_system, "Ps", kernel_pb2.PsRequest(user="root"), md) == \
        grpc.StatusCode.PERMISSION_DENIED
    assert code_of(bare_system, "Ps", kernel_pb2.PsRequest(all=True), md) == grpc.StatusCode.OK
    for name in ("SetQuota", "Audit"):
        assert code_of(bare_system, name, REQUESTS[name], md) == \
            grpc.StatusCode.PERMISSION_DENIED, name


def test_adduser_rejects_taken_and_bad_names(bare_system: System) -> None:
    import subprocess
    import sys
    bare_system.adduser("carol")
    for name in ("carol", "Bad Name!", ""):
        out = subprocess.run([sys.executable, "-m", "llmasos.kernel.main", "adduser", name,
                              "--home", str(bare_system.home)], capture_output=True, text=True)
        assert out.returncode != 0 and out.stderr.strip(), name
