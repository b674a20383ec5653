"""Protection, tried as a hostile client would: from a process that is not the kernel, the
internal services answer nothing; a default user cannot learn where they listen, see or touch
other users' jobs, raise its privileges or change quotas; privileged calls and refusals land in
the audit log; off loopback the Kernel speaks TLS only."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from llmasos.proto import (
    inference_pb2,
    ipc_pb2,
    kernel_pb2,
    scheduler_pb2,
    security_pb2,
)

from conftest import (
    System,
    boot,
    booted_model_system,
    free_port,
    shutdown,
    spawn,
    start_service,
)

# its own system, not the shared one: it adds users (alice, bob, carol...) that other modules
# add too, and changes quotas and the audit log
model_system = pytest.fixture(scope="module", name="model_system")(booted_model_system)

INTERNAL = {"security": security_pb2.DESCRIPTOR.services_by_name["Security"],
            "ipc": ipc_pb2.DESCRIPTOR.services_by_name["Ipc"],
            "scheduler": scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"],
            "inference": inference_pb2.DESCRIPTOR.services_by_name["Inference"]}
# What every service also serves: health, and (refused) reflection.
EXTRA = [(health_pb2.DESCRIPTOR.services_by_name["Health"], ("Check", "Watch")),
         (reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
          ("ServerReflectionInfo",))]
SECRET_KEY = "x-llmasos-secret"


def methods(service: str) -> list[tuple[str, bool, bool]]:
    """(full method path, client streaming, server streaming) of every method a service has."""
    out = []
    for desc, names in [(INTERNAL[service], tuple(INTERNAL[service].methods_by_name)), *EXTRA]:
        for name in names:
            m = desc.methods_by_name[name]
            out.append((f"/{desc.full_name}/{name}", m.client_streaming, m.server_streaming))
    return out


def raw_call(channel: grpc.Channel, path: str, client_stream: bool, server_stream: bool,
             metadata: list[tuple[str, str]]) -> grpc.StatusCode:
    """Call any method with an empty message; return the status it ends with."""
    kinds: dict[tuple[bool, bool], Callable] = {
        (False, False): channel.unary_unary, (False, True): channel.unary_stream,
        (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    call = kinds[(client_stream, server_stream)](path)
    request = iter([b""]) if client_stream else b""
    try:
        reply = call(request, metadata=metadata, timeout=10)
        if server_stream:
            list(reply)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def token_for(system: System, name: str) -> str:
    """A default user's token (made once per system)."""
    tokens = system.__dict__.setdefault("_tokens", {})
    if name not in tokens:
        tokens[name] = system.adduser(name)
    return tokens[name]


def code_of(system: System, name: str, request: object, token: str | None = None,
            metadata: list | None = None) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        if metadata is not None:
            getattr(system.kernel, name)(request, metadata=metadata, timeout=60)
        else:
            system.call(name, request, token=token)
    return err.value.code()


def end(system: System, pid: int, token: str) -> None:
    """Kill a job (it may have ended already) and reap it."""
    with contextlib.suppress(grpc.RpcError):
        system.call("Kill", kernel_pb2.KillRequest(pid=pid, signal=9), token=token)
    system.call("Wait", kernel_pb2.WaitRequest(pid=pid), token=token)


# --- internal services answer only the kernel ------------------------------------------------

def test_protection_internal_services_refuse_every_method_without_the_secret(
        model_system: System) -> None:
    run = model_system.home / "run"
    st = os.stat(run)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    for name in INTERNAL:
        path = run / f"{name}.sock"
        assert stat.S_ISSOCK(os.stat(path).st_mode), path
        with grpc.insecure_channel(f"unix:{path}") as ch:
            for method, cs, ss in methods(name):
                for md in ([], [(SECRET_KEY, "0" * 64)], [(SECRET_KEY, "")]):
                    code = raw_call(ch, method, cs, ss, md)
                    assert code == grpc.StatusCode.UNAUTHENTICATED, (name, method, md, code)
    # ... while the kernel, which holds the secret, still reaches every one of them
    assert model_system.call("WhoAmI", kernel_pb2.WhoAmIRequest()).root
    assert model_system.call("Models", kernel_pb2.ModelsRequest()).models
    assert all(s.state == "HEALTHY" for s in model_system.services().values())


def test_protection_secret_is_in_no_command_line_or_environment(model_system: System) -> None:
    pids = [s.pid for s in model_system.services().values()]
    assert all(pids)
    hexes = re.compile(rb"[0-9a-f]{64}")
    for pid in [*pids, model_system.proc.pid]:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert not hexes.search(cmdline) and not hexes.search(environ), pid
        if pid != model_system.proc.pid:
            assert b"--secret-fd" in cmdline and b"unix:" in cmdline


def test_protection_service_has_no_reflection_and_needs_a_secret(tmp_path: Path) -> None:
    svc = start_service("llmasos.services.ipc")
    try:
        with svc.channel() as ch:   # even the kernel, with the secret, finds no reflection
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
                    list_services="")]), timeout=10))
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with svc.channel(secret="f" * 64) as ch:
            assert raw_call(ch, "/grpc.health.v1.Health/Check", False, False, []) == \
                grpc.StatusCode.UNAUTHENTICATED
    finally:
        svc.proc.kill()
        svc.proc.wait()
    # a service started without a secret refuses to serve at all
    out = subprocess.run([sys.executable, "-m", "llmasos.services.ipc", "--listen",
                          "127.0.0.1:0"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--secret-fd" in out.stderr


def test_protection_second_kernel_on_same_home_refused(model_system: System) -> None:
    out = subprocess.run([sys.executable, "-m", "llmasos.kernel.main", "run", "--listen",
                          f"127.0.0.1:{free_port()}", "--home", str(model_system.home),
                          "--no-embedded"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "another llmosd" in out.stderr, out.stderr[-2000:]
    assert all(s.state == "HEALTHY" for s in model_system.services().values())
    assert model_system.call("WhoAmI", kernel_pb2.WhoAmIRequest()).root


# --- what a default user may see and do ------------------------------------------------------

def test_protection_services_hide_internal_endpoints_from_users(model_system: System) -> None:
    alice = token_for(model_system, "alice")
    mine = model_system.call("Services", kernel_pb2.ServicesRequest(), token=alice).services
    assert {s.name for s in mine} == set(INTERNAL)
    assert all(s.address == "" and s.pid > 0 and s.state == "HEALTHY" and s.uptime_s > 0
               for s in mine)
    admin = model_system.services()
    assert all(s.address == f"unix:{model_system.home}/run/{n}.sock" for n, s in admin.items())


def test_protection_users_cannot_see_or_touch_others_jobs(model_system: System) -> None:
    alice, bob = token_for(model_system, "alice"), token_for(model_system, "bob")
    theirs = spawn(model_system, "The capital of France is", max_tokens=200, token=bob)
    mine = spawn(model_system, "The quick brown fox", max_tokens=200, token=alice)
    try:
        for name, req in [("Stat", kernel_pb2.StatRequest(pid=theirs)),
                          ("Wait", kernel_pb2.WaitRequest(pid=theirs)),
                          ("Kill", kernel_pb2.KillRequest(pid=theirs, signal=9)),
                          ("Nice", kernel_pb2.NiceRequest(pid=theirs, nice=5)),
                          ("Ps", kernel_pb2.PsRequest(user="bob"))]:
            assert code_of(model_system, name, req, token=alice) == \
                grpc.StatusCode.PERMISSION_DENIED, name
        with pytest.raises(grpc.RpcError) as err:
            list(model_system.kernel.Read(kernel_pb2.ReadRequest(pid=theirs),
                                          metadata=model_system.auth(alice), timeout=60))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        ps = model_system.call("Ps", kernel_pb2.PsRequest(all=True), token=alice)
        assert {p.pid for p in ps.processes} == {mine}
        assert set(ps.kv.blocks_by_user) <= {"alice"}
        # the admin sees both users' jobs and KV
        every = model_system.call("Ps", kernel_pb2.PsRequest(all=True))
        assert {mine, theirs} <= {p.pid for p in every.processes}
    finally:
        end(model_system, theirs, bob)
        end(model_system, mine, alice)


def test_protection_users_cannot_raise_privileges(model_system: System) -> None:
    alice = token_for(model_system, "alice")
    refused = [
        ("Deploy", kernel_pb2.DeployRequest(path="/etc/passwd", name="evil")),
        ("Undeploy", kernel_pb2.UndeployRequest(name="smollm2-135m")),
        ("SetQuota", kernel_pb2.SetQuotaRequest(user="alice", max_jobs=0)),
        ("Audit", kernel_pb2.AuditRequest(limit=5)),
        ("Spawn", kernel_pb2.SpawnRequest(model="smollm2-135m", prompt="hi", nice=-5)),
    ]
    for name, req in refused:
        assert code_of(model_system, name, req, token=alice) == \
            grpc.StatusCode.PERMISSION_DENIED, name
    pid = spawn(model_system, "My favourite book is", max_tokens=200, token=alice, nice=5)
    try:
        assert code_of(model_system, "Nice", kernel_pb2.NiceRequest(pid=pid, nice=0),
                       token=alice) == grpc.StatusCode.PERMISSION_DENIED
    finally:
        end(model_system, pid, alice)
    me = model_system.call("WhoAmI", kernel_pb2.WhoAmIRequest(), token=alice)
    assert not me.root and "admin" not in me.capabilities


def test_protection_bearer_scheme_is_case_insensitive(model_system: System) -> None:
    token = model_system.root_token
    for scheme in ("Bearer", "bearer", "BEARER", "BeArEr"):
        reply = model_system.kernel.WhoAmI(kernel_pb2.WhoAmIRequest(), timeout=30,
                                           metadata=[("authorization", f"{scheme} {token}")])
        assert reply.root
    for bad in (f"Basic {token}", f"Bearer{token}", "Bearer ", token):
        assert code_of(model_system, "WhoAmI", kernel_pb2.WhoAmIRequest(),
                       metadata=[("authorization", bad)]) == grpc.StatusCode.UNAUTHENTICATED


# --- quotas ----------------------------------------------------------------------------------

def llmosd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmasos.kernel.main", *args],
                          capture_output=True, text=True, timeout=120)


def quota_of(system: System, token: str) -> tuple[int, int, float]:
    q = system.call("WhoAmI", kernel_pb2.WhoAmIRequest(), token=token).quota
    return q.max_jobs, q.max_tokens, round(q.kv_share, 6)


def test_protection_quota_cli_and_setquota_round_trip(model_system: System) -> None:
    carol = token_for(model_system, "carol")
    assert quota_of(model_system, carol) == (64, 65536, 0.5)        # the defaults
    assert quota_of(model_system, model_system.root_token) == (0, 0, 0.0)   # root: no limit
    out = llmosd("quota", "carol", "--max-jobs", "3", "--kv-share", "0.25",
                 "--home", str(model_system.home))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"user": "carol", "max_jobs": 3, "max_tokens": 65536,
                                      "kv_share": 0.25}
    # the CLI wrote the store; SetQuota through the kernel applies at the user's next call
    q = model_system.call("SetQuota", kernel_pb2.SetQuotaRequest(user="carol", max_tokens=1000))
    assert (q.max_jobs, q.max_tokens, q.kv_share) == (3, 1000, 0.25)
    assert quota_of(model_system, carol) == (3, 1000, 0.25)
    q = model_system.call("SetQuota", kernel_pb2.SetQuotaRequest(user="carol", reset=True))
    assert (q.max_jobs, q.max_tokens, q.kv_share) == (64, 65536, 0.5)
    assert quota_of(model_system, carol) == (64, 65536, 0.5)
    bad = [(kernel_pb2.SetQuotaRequest(user="nobody", max_jobs=1), grpc.StatusCode.NOT_FOUND),
           (kernel_pb2.SetQuotaRequest(user="carol", kv_share=1.5),
            grpc.StatusCode.INVALID_ARGUMENT),
           (kernel_pb2.SetQuotaRequest(user="carol"), grpc.StatusCode.INVALID_ARGUMENT),
           (kernel_pb2.SetQuotaRequest(user="Bad Name", max_jobs=1),
            grpc.StatusCode.INVALID_ARGUMENT)]
    for req, code in bad:
        assert code_of(model_system, "SetQuota", req) == code, req
    out = llmosd("quota", "nobody", "--max-jobs", "1", "--home", str(model_system.home))
    assert out.returncode != 0 and "nobody" in out.stderr


def test_protection_quotas_are_enforced_at_spawn_and_in_the_pool(model_system: System) -> None:
    from conftest import MODEL, greedy
    dave = token_for(model_system, "dave")

    def spawn_as(max_tokens: int, prompt: str = "Once upon a time") -> int:
        return model_system.call("Spawn", kernel_pb2.SpawnRequest(
            model=MODEL, prompt=prompt, sampling=greedy(max_tokens, ignore_eos=True)),
            token=dave).pid

    model_system.call("SetQuota", kernel_pb2.SetQuotaRequest(user="dave", max_jobs=2))
    pids = [spawn_as(400), spawn_as(400)]
    with pytest.raises(grpc.RpcError) as err:
        spawn_as(8)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at most 2 live jobs" in err.value.details() and "--max-jobs" in err.value.details()
    for pid in pids:
        end(model_system, pid, dave)
    model_system.call("SetQuota", kernel_pb2.SetQuotaRequest(user="dave", reset=True,
                                                             max_tokens=100))
    with pytest.raises(grpc.RpcError) as err:
        spawn_as(200)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tokens in flight" in err.value.details()
    # KV share: a job too big for it is refused; several that fit one by one stay under it
    model_system.call("SetQuota", kernel_pb2.SetQuotaRequest(user="dave", reset=True,
                                                             kv_share=0.01))
    pool = model_system.call("Ps", kernel_pb2.PsRequest(all=True)).kv.total_blocks
    limit = int(pool * 0.01)   # 3 blocks of the default 256 MB pool (364)
    assert limit >= 2
    with pytest.raises(grpc.RpcError) as err:
        spawn_as(limit * 16 + 64)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "kv_share" in \
        err.value.details()
    per_job = limit * 16 * 2 // 3      # two of these cannot hold their KV at once
    pids = [spawn_as(per_job, p) for p in ("The quick brown fox", "In 1969, astronauts",
                                           "My favourite book is")]
    most = 0
    while True:
        ps = model_system.call("Ps", kernel_pb2.PsRequest(), token=dave)
        most = max(most, ps.kv.blocks_by_user.get("dave", 0))
        if all(p.state == 6 for p in ps.processes if p.pid in pids):
            break
        time.sleep(0.05)
    assert most <= limit, f"dave held {most} blocks; the quota is {limit}"
    for pid in pids:
        reply = model_system.call("Wait", kernel_pb2.WaitRequest(pid=pid), token=dave)
        assert len(reply.token_ids) == per_job   # every job completed, in turns
    model_system.call("SetQuota", kernel_pb2.SetQuotaRequest(user="dave", reset=True))


# --- audit -----------------------------------------------------------------------------------

def test_protection_audit_log_records_privileged_calls_and_refusals(
        model_system: System) -> None:
    alice = token_for(model_system, "alice")
    bogus = "llmos_" + "x" * 43
    model_system.call("SetQuota", kernel_pb2.SetQuotaRequest(user="alice", max_jobs=32))
    code_of(model_system, "Deploy", kernel_pb2.DeployRequest(path="/nope", name="m"), token=alice)
    code_of(model_system, "WhoAmI", kernel_pb2.WhoAmIRequest(), token=bogus)
    pid = spawn(model_system, "In 1969, astronauts", max_tokens=200, token=alice)
    model_system.call("Kill", kernel_pb2.KillRequest(pid=pid, signal=9))   # root, alice's job
    model_system.call("Wait", kernel_pb2.WaitRequest(pid=pid), token=alice)
    entries = model_system.call("Audit", kernel_pb2.AuditRequest(limit=200)).entries
    seen = {(e.user, e.call, e.code) for e in entries}
    assert ("root", "SetQuota", "OK") in seen
    assert ("alice", "Deploy", "PERMISSION_DENIED") in seen
    assert ("", "WhoAmI", "UNAUTHENTICATED") in seen
    kill = [e for e in entries if e.call == "Kill" and e.user == "root"]
    assert kill and json.loads(kill[-1].args_json) == {"pid": pid, "signal": 9}
    quota = [e for e in entries if e.call == "SetQuota"][-1]
    assert json.loads(quota.args_json) == {"user": "alice", "max_jobs": 32}
    assert any(e.call == "cli:adduser" and json.loads(e.args_json)["name"] == "alice"
               for e in entries)
    only = model_system.call("Audit", kernel_pb2.AuditRequest(user="alice", call="Deploy"))
    assert only.entries and all((e.user, e.call) == ("alice", "Deploy") for e in only.entries)
    log = model_system.home / "audit.log"
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600
    text = log.read_text()
    assert bogus not in text and alice not in text and model_system.root_token not in text
    assert "astronauts" not in text   # prompts are not arguments that matter
    for line in text.splitlines():
        assert {"time", "user", "uid", "call", "args", "code", "message"} <= set(json.loads(line))
    shell = subprocess.run([sys.executable, "-m", "llmasos.shell.main", "-c", "audit 5"],
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "LLMASOS_ADDR": model_system.address,
                                "LLMASOS_TOKEN": model_system.root_token})
    assert shell.returncode == 0 and "CALL" in shell.stdout, shell.stderr
    assert "Audit" in shell.stdout


# --- TLS -------------------------------------------------------------------------------------

def self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def tls_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[System, Path]]:
    """A bare system serving over TLS, its home in a directory every OS user may traverse (so
    that only the run dir's own mode keeps others out)."""
    base = Path(tempfile.mkdtemp(prefix="llmasos-prot-"))
    os.chmod(base, 0o711)
    cert, key = self_signed(tmp_path_factory.mktemp("tls"))
    system = boot(base / "home", "--no-embedded", "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        yield system, cert
    finally:
        assert shutdown(system) == 0
        shutil.rmtree(base, ignore_errors=True)


def test_protection_tls_boot_and_call_with_llmasos_ca(tls_system: tuple[System, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from llmasos import LLMClient
    system, cert = tls_system
    monkeypatch.setenv("LLMASOS_CA", str(cert))
    with LLMClient(address=system.address, token=system.root_token, timeout=30) as c:
        assert c.whoami().root
    # clear text finds no kernel there
    with grpc.insecure_channel(system.address) as plain, pytest.raises(grpc.RpcError) as err:
        plain.unary_unary("/llmasos.v1.Kernel/WhoAmI")(b"", metadata=system.auth(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"),
                    reason="needs root to act as another OS user, and a system python")
def test_protection_run_dir_shuts_out_other_os_users(tls_system: tuple[System, Path]) -> None:
    system, _ = tls_system
    probe = ("import os,socket,sys\nprint(sorted(os.listdir(sys.argv[1]))[:1] != [])\n"
             "try:\n os.stat(sys.argv[2])\n print('VISIBLE')\nexcept PermissionError:\n"
             " print('EACCES')\n"
             "s=socket.socket(socket.AF_UNIX)\ntry:\n s.connect(sys.argv[2])\n"
             " print('CONNECTED')\nexcept PermissionError:\n print('EACCES')\n")
    out = subprocess.run(["/usr/bin/python3", "-c", probe, str(system.home),
                          str(system.home / "run" / "security.sock")],
                         user=65534, group=65534, capture_output=True, text=True, timeout=60)
    # another user can list the state dir, but cannot even see into the run dir (0700), let
    # alone connect to a socket there
    assert out.stdout.split() == ["True", "EACCES", "EACCES"], out


def test_protection_non_loopback_listen_needs_tls_or_insecure(tmp_path: Path) -> None:
    address = f"0.0.0.0:{free_port()}"
    out = llmosd("run", "--listen", address, "--home", str(tmp_path / "h"), "--no-embedded")
    assert out.returncode != 0
    assert "without TLS" in out.stderr and "--tls-cert" in out.stderr \
        and "--insecure" in out.stderr, out.stderr[-2000:]
    out = llmosd("run", "--listen", address, "--home", str(tmp_path / "h"), "--no-embedded",
                 "--tls-cert", str(tmp_path / "c.pem"))
    assert out.returncode != 0 and "--tls-key" in out.stderr, out.stderr[-2000:]
    with socket.socket() as s:   # nothing was left listening
        assert s.connect_ex(("127.0.0.1", int(address.rsplit(":", 1)[1]))) != 0
