"""kernel/audit.py: JSON lines, mode 0600, size rotation, tail with filters, no secrets."""

from __future__ import annotations

import json
import os
import stat

from llmasos.kernel.audit import AuditLog, scalar_args
from llmasos.proto import common_pb2, kernel_pb2


def test_lines_are_json_private_and_tail_filters(tmp_path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    log.record(call="Deploy", user="root", uid=0, args={"name": "m"}, code="OK")
    log.record(call="Kill", user="alice", uid=1000, args={"pid": 3}, code="PERMISSION_DENIED",
               message="process 3 belongs to bob")
    log.record(call="WhoAmI", code="UNAUTHENTICATED", peer="ipv4:127.0.0.1:5")
    assert stat.S_IMODE(os.stat(tmp_path / "audit.log").st_mode) == 0o600
    lines = [json.loads(x) for x in (tmp_path / "audit.log").read_text().splitlines()]
    assert [x["call"] for x in lines] == ["Deploy", "Kill", "WhoAmI"]
    assert lines[1]["code"] == "PERMISSION_DENIED" and lines[1]["uid"] == 1000
    assert [e["call"] for e in log.tail(2)] == ["Kill", "WhoAmI"]
    assert [e["call"] for e in log.tail(10, user="alice")] == ["Kill"]
    assert [e["call"] for e in log.tail(10, call="Deploy")] == ["Deploy"]


def test_rotation_keeps_bounded_files_and_tail_reads_across_them(tmp_path) -> None:
    log = AuditLog(tmp_path / "audit.log", max_bytes=400, backups=2)
    for i in range(40):
        log.record(call="Nice", user="root", uid=0, args={"pid": i})
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.log", "audit.log.1", "audit.log.2"]
    assert all(p.stat().st_size <= 400 for p in tmp_path.iterdir())
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in tmp_path.iterdir())
    pids = [e["args"]["pid"] for e in log.tail(1000)]
    assert pids == sorted(pids) and pids[-1] == 39 and len(pids) < 40   # oldest rotated away


def test_torn_line_is_skipped(tmp_path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    log.record(call="Deploy")
    with open(tmp_path / "audit.log", "a") as f:
        f.write('{"call": "Dep')
    log.record(call="Undeploy")
    assert [e["call"] for e in log.tail(5)] == ["Deploy", "Undeploy"]


def test_scalar_args_leave_out_prompts_and_messages() -> None:
    req = kernel_pb2.SpawnRequest(model="m", prompt="secret plans", nice=3,
                                  sampling=common_pb2.SamplingParams(max_tokens=4))
    assert scalar_args(req) == {"model": "m", "nice": 3}
    q = kernel_pb2.SetQuotaRequest(user="carol", kv_share=0.5)
    assert scalar_args(q) == {"user": "carol", "kv_share": 0.5}
    assert scalar_args(kernel_pb2.DeployRequest(path="p" * 1000, name="x"))["path"] == "p" * 256
