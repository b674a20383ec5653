"""The security service: the on-disk store, token hashing, the cache, the adduser CLI, and the
service as a real process over gRPC."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmasos.proto import security_pb2, security_pb2_grpc
from llmasos.services.security.identity import (
    DEFAULT_CAPABILITIES,
    ROOT_CAPABILITIES,
    UserExistsError,
)
from llmasos.services.security.security import Security, default_state_dir
from llmasos.services.security.store import new_token

from conftest import start_service, stop_service

REPO = Path(__file__).resolve().parent.parent


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def root_token(state: Path) -> str:
    return (state / "root.token").read_text().strip()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def sec(state: Path) -> Security:
    return Security(state)


# -- the store and the core -------------------------------------------------------------------

def test_first_boot_creates_private_files_and_root(sec, state):
    assert mode(state) == 0o700
    assert mode(state / "root.token") == 0o600
    assert mode(state / "users.json") == 0o600
    tok = root_token(state)
    assert tok.startswith("llmos_") and len(tok) == len("llmos_") + 43
    ident = sec.authenticate(tok)
    assert ident is not None
    assert (ident.user, ident.uid, ident.root) == ("root", 0, True)
    assert ident.capabilities == ROOT_CAPABILITIES


def test_store_holds_no_plaintext_token(sec, state):
    _, tok = sec.add_user("alice")
    text = (state / "users.json").read_text()
    assert root_token(state) not in text
    assert tok not in text
    assert tok.removeprefix("llmos_") not in text
    users = json.loads(text)["users"]
    assert {u["name"] for u in users} == {"root", "alice"}
    assert len({u["salt"] for u in users}) == 2  # a salt per user


def test_second_boot_keeps_root_token(sec, state):
    tok = root_token(state)
    again = Security(state)
    assert root_token(state) == tok
    assert again.authenticate(tok).user == "root"


def test_add_user_defaults_and_uids(sec):
    alice, tok_a = sec.add_user("alice")
    bob, tok_b = sec.add_user("bob", ["proc", "admin", "proc"])
    assert (alice.uid, bob.uid) == (1000, 1001)
    assert alice.capabilities == DEFAULT_CAPABILITIES and not alice.root
    assert bob.capabilities == ("proc", "admin")
    assert tok_a != tok_b
    assert sec.authenticate(tok_a) == alice
    assert sec.authenticate(tok_b) == bob
    assert [i.user for i in sec.list_users()] == ["root", "alice", "bob"]


@pytest.mark.parametrize("name", ["", "1abc", "Alice", "a" * 33, "a b", "-x", "_x", "ä", "a/b",
                                  "a.b", "alice\n"])
def test_bad_names_rejected(sec, name):
    with pytest.raises(ValueError):
        sec.add_user(name)


@pytest.mark.parametrize("name", ["a", "a" * 32, "x-1_y", "z9"])
def test_good_names_accepted(sec, name):
    assert sec.add_user(name)[0].user == name


def test_taken_and_unknown_capability(sec):
    sec.add_user("alice")
    with pytest.raises(UserExistsError):
        sec.add_user("alice")
    with pytest.raises(UserExistsError):
        sec.add_user("root")
    with pytest.raises(ValueError):
        sec.add_user("bob", ["proc", "superpowers"])
    assert [i.user for i in sec.list_users()] == ["root", "alice"]


def test_bad_tokens_rejected(sec, state):
    tok = root_token(state)
    for bad in ["", "llmos_", tok[:-1], tok + "x", tok.upper(), "Bearer " + tok, new_token(),
                "llmos_" + "a" * 10_000, tok.removeprefix("llmos_")]:
        assert sec.authenticate(bad) is None, bad


def test_tampered_hash_fails_verification(sec, state):
    tok = root_token(state)
    path = state / "users.json"
    raw = json.loads(path.read_text())
    raw["users"][0]["hash"] = "00" * 32  # key_id still matches: only scrypt can say no
    path.write_text(json.dumps(raw))
    assert sec.authenticate(tok) is None


def test_cache_and_reload_on_store_change(sec, state):
    tok = root_token(state)
    first = sec.authenticate(tok)
    assert sec.authenticate(tok) is first  # served from the cache
    other = Security(state)  # another process's view of the same store
    _, carol_tok = other.add_user("carol")
    assert sec.authenticate(carol_tok).user == "carol"  # picked up without a restart
    again = sec.authenticate(tok)
    assert again == first and again is not first  # the reload dropped the cache


def test_concurrent_writers_get_distinct_uids(state):
    Security(state)
    names = [f"user{i}" for i in range(6)]
    errors: list[BaseException] = []

    def add(name: str) -> None:
        try:
            Security(state).add_user(name)  # own instance: own lock fd, like another process
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=add, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    users = Security(state).list_users()
    assert sorted(u.user for u in users) == sorted(["root", *names])
    assert sorted(u.uid for u in users) == [0, *range(1000, 1006)]


def test_default_state_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "h"))
    assert default_state_dir() == str(tmp_path / "h")
    monkeypatch.delenv("LLMASOS_HOME")
    assert default_state_dir() == os.path.expanduser("~/.local/state/llmasos")


# -- the adduser CLI --------------------------------------------------------------------------

def adduser(state: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmasos.services.security", "adduser", *args,
                           "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_cli_adduser_prints_a_working_token(state):
    res = adduser(state, "dave", "--cap", "proc")
    assert res.returncode == 0, res.stderr
    tok = res.stdout.strip()
    assert res.stdout == tok + "\n" and tok.startswith("llmos_")
    ident = Security(state).authenticate(tok)
    assert (ident.user, ident.uid, ident.capabilities) == ("dave", 1000, ("proc",))
    assert mode(state / "root.token") == 0o600  # the CLI booted the store


def test_cli_adduser_bad_and_taken_names(state):
    Security(state).add_user("erin")
    for args, words in [(["erin"], "already exists"), (["9lives"], "bad user name"),
                        (["UPPER"], "bad user name"),
                        (["fred", "--cap", "wizard"], "unknown capabilities")]:
        res = adduser(state, *args)
        assert res.returncode == 1
        assert res.stdout == ""
        assert words in res.stderr


def test_cli_adduser_in_parallel(state):
    Security(state)
    procs = [subprocess.Popen([sys.executable, "-m", "llmasos.services.security", "adduser",
                               f"par{i}", "--state-dir", str(state)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              cwd=REPO) for i in range(3)]
    tokens = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    sec = Security(state)
    idents = [sec.authenticate(t) for t in tokens]
    assert sorted(i.user for i in idents) == ["par0", "par1", "par2"]
    assert sorted(i.uid for i in idents) == [1000, 1001, 1002]


# -- the service as a process -----------------------------------------------------------------

@pytest.fixture
def service(state):
    svc = start_service("llmasos.services.security", "--state-dir", str(state))
    try:
        yield svc
    finally:
        if svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait()


def code_of(fn, *args) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, timeout=10)
    return info.value.code()


def test_service_over_grpc(service, state):
    proc, address = service.proc, service.address
    with service.channel() as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ["", "llmasos.v1.Security"]:
            res = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert res.status == health_pb2.HealthCheckResponse.SERVING

        stub = security_pb2_grpc.SecurityStub(ch)
        root = stub.Authenticate(security_pb2.AuthenticateRequest(token=root_token(state)),
                                 timeout=10)
        assert (root.user, root.uid, root.root) == ("root", 0, True)
        assert list(root.capabilities) == list(ROOT_CAPABILITIES)

        for bad in ["", "nope", new_token()]:
            assert code_of(stub.Authenticate, security_pb2.AuthenticateRequest(token=bad)) \
                == grpc.StatusCode.UNAUTHENTICATED

        added = stub.AddUser(security_pb2.AddUserRequest(name="frank"), timeout=10)
        assert (added.identity.user, added.identity.uid, added.identity.root) == \
            ("frank", 1000, False)
        assert list(added.identity.capabilities) == list(DEFAULT_CAPABILITIES)
        who = stub.Authenticate(security_pb2.AuthenticateRequest(token=added.token), timeout=10)
        assert who.user == "frank"

        assert code_of(stub.AddUser, security_pb2.AddUserRequest(name="frank")) \
            == grpc.StatusCode.ALREADY_EXISTS
        for bad_name in ["", "Frank", "9x", "a" * 33]:
            assert code_of(stub.AddUser, security_pb2.AddUserRequest(name=bad_name)) \
                == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(stub.AddUser, security_pb2.AddUserRequest(
            name="gina", capabilities=["root"])) == grpc.StatusCode.INVALID_ARGUMENT

        # a user added by the CLI while the service runs authenticates without a restart
        res = adduser(state, "hank")
        assert res.returncode == 0, res.stderr
        who = stub.Authenticate(security_pb2.AuthenticateRequest(token=res.stdout.strip()),
                                timeout=10)
        assert (who.user, who.uid) == ("hank", 1001)

        users = stub.ListUsers(security_pb2.ListUsersRequest(), timeout=10).users
        assert [(u.user, u.uid) for u in users] == [("root", 0), ("frank", 1000), ("hank", 1001)]

        # quotas: the defaults in Authenticate's reply, SetQuota changes them, bad input refused
        assert (who.quota.max_jobs, who.quota.max_tokens, who.quota.kv_share) == (64, 65536, 0.5)
        assert (root.quota.max_jobs, root.quota.max_tokens) == (0, 0)
        got = stub.SetQuota(security_pb2.SetUserQuotaRequest(user="hank", max_jobs=2), timeout=10)
        assert (got.user, got.quota.max_jobs, got.quota.max_tokens) == ("hank", 2, 65536)
        assert code_of(stub.SetQuota, security_pb2.SetUserQuotaRequest(user="nope", max_jobs=1)) \
            == grpc.StatusCode.NOT_FOUND
        assert code_of(stub.SetQuota, security_pb2.SetUserQuotaRequest(user="hank", kv_share=2)) \
            == grpc.StatusCode.INVALID_ARGUMENT

    # without the secret, or with another, every call is refused
    for secret in ("", "0" * 64):
        with service.channel(secret=secret) as ch:
            stub = security_pb2_grpc.SecurityStub(ch)
            assert code_of(stub.AddUser, security_pb2.AddUserRequest(name="mallory")) \
                == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(health_pb2_grpc.HealthStub(ch).Check,
                           health_pb2.HealthCheckRequest()) == grpc.StatusCode.UNAUTHENTICATED
    assert "mallory" not in {i.user for i in Security(state).list_users()}
    stop_service(proc, address)
