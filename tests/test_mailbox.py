"""Mailboxes: the core's policy and durability in-process, then through the real daemon
(syscalls 20-24, two users, kill -9 of the IPC service, Spawn's stdout_mailbox, llmsh)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from llmasos import AsyncLLMClient, LLMClient, errors
from llmasos.proto import kernel_pb2
from llmasos.services.ipc.mailboxes import (
    ALL,
    GROUP,
    BadRequest,
    Caller,
    Denied,
    Mailboxes,
    MailboxFull,
    NoSuchMailbox,
)
from llmasos.services.ipc.store import Store

from conftest import (
    MODEL,
    System,
    booted_model_system,
    greedy,
)

# its own system, not the shared one: it adds users (alice, bob, carol...) that other modules
# add too, and changes quotas and the audit log
model_system = pytest.fixture(scope="module", name="model_system")(booted_model_system)

ALICE, BOB, CAROL, ADMIN = Caller("alice"), Caller("bob"), Caller("carol"), Caller("root", True)


# -- the core in-process: policy ------------------------------------------------------------------

def test_modes_decide_who_may_use_a_mailbox():
    mb = Mailboxes()
    mb.create("mine", caller=ALICE)
    mb.create("team", mode=GROUP, members=["bob"], caller=ALICE)
    mb.create("open", mode=ALL, caller=ALICE)
    for name, allowed in [("mine", {"alice", "root"}), ("team", {"alice", "bob", "root"}),
                          ("open", {"alice", "bob", "carol", "root"})]:
        for who in (ALICE, BOB, CAROL, ADMIN):
            if who.user in allowed:
                assert mb.send(name, who.user.encode(), who.user, caller=who) > 0
                assert mb.receive(name, caller=who).payload == who.user.encode()
            else:
                with pytest.raises(Denied):
                    mb.send(name, b"x", caller=who)
                with pytest.raises(Denied):
                    mb.receive(name, caller=who)
    assert [b.name for b in mb.list_mailboxes(BOB)] == ["open", "team"]
    assert [b.name for b in mb.list_mailboxes(CAROL)] == ["open"]
    assert [b.name for b in mb.list_mailboxes(ADMIN)] == ["mine", "open", "team"]
    with pytest.raises(Denied):
        mb.remove("open", BOB)            # using is not owning
    with pytest.raises(Denied):
        mb.create("forged", owner="alice", caller=BOB)
    assert mb.create("given", owner="bob", caller=ADMIN).owner == "bob"
    assert mb.remove("open", ALICE) == 0 and mb.remove("given", ADMIN) == 0


@pytest.mark.parametrize("kw", [{"mode": 7}, {"mode": GROUP}, {"members": ["bob"]},
                                {"mode": GROUP, "members": ["Bob!"]}, {"max_bytes": -1},
                                {"max_bytes": (256 << 20) + 1}])
def test_bad_modes_and_bounds(kw):
    with pytest.raises(BadRequest):
        Mailboxes().create("x", caller=ALICE, **kw)


def test_byte_bound_per_mailbox():
    mb = Mailboxes()
    mb.create("b", max_bytes=10, caller=ALICE)
    mb.send("b", b"x" * 6, caller=ALICE)
    with pytest.raises(MailboxFull):
        mb.send("b", b"y" * 5, caller=ALICE)
    assert mb.list_mailboxes(ALICE)[0].bytes == 6
    mb.receive("b", caller=ALICE)
    assert mb.send("b", b"y" * 10, caller=ALICE) == 2


def test_remove_wakes_a_blocked_receiver():
    mb = Mailboxes()
    mb.create("q", caller=ALICE)
    errors_seen: list = []

    def recv() -> None:
        try:
            mb.receive("q", 30, caller=ALICE)
        except NoSuchMailbox as e:
            errors_seen.append(e)

    t = threading.Thread(target=recv)
    t.start()
    while mb.waiters == 0:
        time.sleep(0.001)
    assert mb.remove("q", ALICE) == 0
    t.join(timeout=10)
    assert not t.is_alive() and len(errors_seen) == 1
    with pytest.raises(NoSuchMailbox):
        mb.send("q", b"x")


# -- the core in-process: durability --------------------------------------------------------------

def test_store_reopens_with_every_mailbox_and_message(tmp_path):
    path = str(tmp_path / "m.db")
    mb = Mailboxes(store=Store(path))
    mb.create("a", caller=ALICE, mode=GROUP, members=["bob", "carol"], capacity=5, max_bytes=99)
    mb.create("b", caller=BOB)
    for i in range(4):
        mb.send("a", b"m%d" % i, "bob", pid=i, caller=BOB)
    mb.receive("a", caller=ALICE)                       # m0 is taken: gone for good
    mb.send("b", b"kept", caller=BOB)
    mb.create("gone", caller=BOB)
    mb.send("gone", b"dropped", caller=BOB)
    mb.remove("gone", BOB)
    again = Mailboxes(store=Store(path))                # a new process would do just this
    assert [(i.name, i.owner, i.mode, i.members, i.depth, i.capacity, i.max_bytes, i.bytes)
            for i in again.list_mailboxes()] == [
        ("a", "alice", GROUP, ("bob", "carol"), 3, 5, 99, 6), ("b", "bob", 0, (), 1, 1024,
                                                                16 << 20, 4)]
    got = [again.receive("a", caller=BOB) for _ in range(3)]
    assert [(m.payload, m.sender, m.sequence, m.pid) for m in got] == \
        [(b"m1", "bob", 2, 1), (b"m2", "bob", 3, 2), (b"m3", "bob", 4, 3)]
    assert again.send("a", b"next", caller=BOB) == 5    # sequences never restart
    assert again.bytes_held == 8
    with pytest.raises(Denied):
        again.receive("a", caller=Caller("dave"))


# -- through the daemon ---------------------------------------------------------------------------

def code_of(fn: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code()


@pytest.fixture(scope="module")
def users(model_system: System) -> dict[str, str]:
    return {name: model_system.adduser(name) for name in ("alice", "bob", "carol")}


def mbox(system: System, call: str, token: str, timeout: float = 30, **fields: object) -> object:
    req = getattr(kernel_pb2, f"{call}Request")(**fields)
    return system.call(call, req, token=token, timeout=timeout)


def test_round_trip_between_two_users(model_system, users):
    s, alice, bob, carol = model_system, users["alice"], users["bob"], users["carol"]
    mbox(s, "MboxCreate", alice, name="alice.private")
    info = mbox(s, "MboxCreate", alice, name="alice.inbox", mode=kernel_pb2.MBOX_MODE_ALL)
    assert (info.owner, info.mode, info.messages) == ("alice", kernel_pb2.MBOX_MODE_ALL, 0)
    mbox(s, "MboxCreate", alice, name="alice.team", mode=kernel_pb2.MBOX_MODE_GROUP,
         members=["bob"])

    # owner only: bob may neither send nor receive nor remove
    for call, extra in [("MboxSend", {"text": "hi"}), ("MboxRecv", {}), ("MboxRemove", {}),
                        ("MboxList", {})]:
        assert code_of(lambda c=call, e=extra: mbox(s, c, bob, name="alice.private", **e)) \
            == grpc.StatusCode.PERMISSION_DENIED
    # mode all: bob sends, alice receives what he sent, signed with his name
    assert mbox(s, "MboxSend", bob, name="alice.inbox", text="hello alice").sequence == 1
    got = mbox(s, "MboxRecv", alice, name="alice.inbox", timeout_ms=1000)
    assert (got.text, got.sender, got.sequence, got.pid) == ("hello alice", "bob", 1, 0)
    # group: bob is in, carol is not
    mbox(s, "MboxSend", bob, name="alice.team", text="for the team")
    assert code_of(lambda: mbox(s, "MboxRecv", carol, name="alice.team")) \
        == grpc.StatusCode.PERMISSION_DENIED
    assert mbox(s, "MboxRecv", alice, name="alice.team").text == "for the team"

    assert [b.name for b in mbox(s, "MboxList", bob).mailboxes] == ["alice.inbox", "alice.team"]
    assert [b.name for b in mbox(s, "MboxList", carol).mailboxes] == ["alice.inbox"]
    assert {"alice.private", "alice.inbox", "alice.team"} <= \
        {b.name for b in mbox(s, "MboxList", s.root_token).mailboxes}

    # the Python client, sync and async, as bob on alice's open mailbox
    with LLMClient(address=s.address, token=bob) as client:
        assert client.mailbox("alice.inbox").send("from the client") == 2
        with pytest.raises(errors.PermissionDenied):
            client.mailbox("alice.private").send("no")
    with LLMClient(address=s.address, token=alice) as client:
        msg = client.mailbox("alice.inbox").receive(timeout=5)
        assert (msg.text, msg.sender, msg.sequence) == ("from the client", "bob", 2)

    async def async_side() -> tuple[int, str]:
        async with AsyncLLMClient(address=s.address, token=bob) as client:
            box = client.mailbox("bob.async")
            await box.create(mode="group:alice")
            seq = await box.send("async hello")
            return seq, [b.name for b in await box.list()][-1]
    assert asyncio.run(async_side()) == (1, "bob.async")
    with LLMClient(address=s.address, token=alice) as client:
        assert client.mailbox("bob.async").receive(timeout=5).text == "async hello"
        with pytest.raises(errors.PermissionDenied):
            client.mailbox("bob.async").remove()

    for name in ("alice.private", "alice.inbox", "alice.team"):
        assert mbox(s, "MboxRemove", alice, name=name).discarded == 0
    assert mbox(s, "MboxRemove", s.root_token, name="bob.async").discarded == 0   # root may
    assert code_of(lambda: mbox(s, "MboxSend", alice, name="alice.inbox", text="x")) \
        == grpc.StatusCode.NOT_FOUND


def test_errors_carry_their_status(model_system, users):
    s, alice = model_system, users["alice"]
    mbox(s, "MboxCreate", alice, name="errs", max_messages=2)
    assert code_of(lambda: mbox(s, "MboxCreate", alice, name="errs")) \
        == grpc.StatusCode.ALREADY_EXISTS
    for bad in ["", "has space", "x" * 65, "-dash"]:
        assert code_of(lambda b=bad: mbox(s, "MboxCreate", alice, name=b)) \
            == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: mbox(s, "MboxCreate", alice, name="g",
                                mode=kernel_pb2.MBOX_MODE_GROUP)) == \
        grpc.StatusCode.INVALID_ARGUMENT     # a group needs members
    assert code_of(lambda: mbox(s, "MboxRecv", alice, name="errs", timeout_ms=700_000)) \
        == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: mbox(s, "MboxRecv", alice, name="nobox")) \
        == grpc.StatusCode.NOT_FOUND

    # full: by messages, then by bytes
    mbox(s, "MboxSend", alice, name="errs", text="1")
    mbox(s, "MboxSend", alice, name="errs", text="2")
    with pytest.raises(grpc.RpcError) as info:
        mbox(s, "MboxSend", alice, name="errs", text="3")
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "full" in info.value.details()
    mbox(s, "MboxCreate", alice, name="errs.bytes", max_bytes=8)
    mbox(s, "MboxSend", alice, name="errs.bytes", text="12345")
    assert code_of(lambda: mbox(s, "MboxSend", alice, name="errs.bytes", text="6789")) \
        == grpc.StatusCode.RESOURCE_EXHAUSTED

    # receive with a timeout: nothing comes → DEADLINE_EXCEEDED after about that long
    mbox(s, "MboxCreate", alice, name="errs.empty")
    with pytest.raises(grpc.RpcError) as info:
        mbox(s, "MboxRecv", alice, name="errs.empty", timeout_ms=300)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "within" in info.value.details()
    with LLMClient(address=s.address, token=alice) as client, \
            pytest.raises(errors.DeadlineExceeded):
        client.mailbox("errs.empty").receive(timeout=0.2)
    for name in ("errs", "errs.bytes", "errs.empty"):
        mbox(s, "MboxRemove", alice, name=name)


def test_blocked_receive_is_woken_by_a_send(model_system, users):
    s, alice = model_system, users["alice"]
    mbox(s, "MboxCreate", alice, name="wake", mode=kernel_pb2.MBOX_MODE_ALL)
    waiting = s.kernel.MboxRecv.future(kernel_pb2.MboxRecvRequest(name="wake", timeout_ms=60_000),
                                       metadata=s.auth(alice), timeout=90)
    time.sleep(0.3)
    assert not waiting.done()
    mbox(s, "MboxSend", users["bob"], name="wake", text="now")
    assert waiting.result(timeout=30).text == "now"

    # a receiver that goes away takes nothing: the kernel cancels its wait in the IPC service
    gone = s.kernel.MboxRecv.future(kernel_pb2.MboxRecvRequest(name="wake", timeout_ms=60_000),
                                    metadata=s.auth(alice), timeout=90)
    time.sleep(0.3)
    assert gone.cancel()
    time.sleep(0.3)
    mbox(s, "MboxSend", alice, name="wake", text="kept")
    assert mbox(s, "MboxRecv", alice, name="wake", timeout_ms=5000).text == "kept"
    mbox(s, "MboxRemove", alice, name="wake")


def test_messages_survive_kill_9_of_the_ipc_service(model_system, users):
    s, alice = model_system, users["alice"]
    mbox(s, "MboxCreate", alice, name="durable", max_messages=10)
    for i in range(3):
        mbox(s, "MboxSend", alice, name="durable", text=f"message {i}")
    mbox(s, "MboxRecv", alice, name="durable")          # taken before the crash: stays taken
    old = s.services()["ipc"]
    os.kill(old.pid, signal.SIGKILL)
    s.wait_services(lambda svcs: svcs["ipc"].state == "HEALTHY"
                    and svcs["ipc"].incarnation > old.incarnation)
    assert s.services()["ipc"].pid != old.pid
    info = mbox(s, "MboxList", alice, name="durable").mailboxes[0]
    assert (info.owner, info.messages, info.max_messages) == ("alice", 2, 10)
    got = [mbox(s, "MboxRecv", alice, name="durable") for _ in range(2)]
    assert [(m.text, m.sequence) for m in got] == [("message 1", 2), ("message 2", 3)]
    assert mbox(s, "MboxSend", alice, name="durable", text="after").sequence == 4
    assert code_of(lambda: mbox(s, "MboxSend", users["bob"], name="durable", text="x")) \
        == grpc.StatusCode.PERMISSION_DENIED           # the owner and mode survived too
    mbox(s, "MboxRemove", alice, name="durable")


def test_stdout_mailbox_delivers_a_jobs_output(model_system, users):
    s, alice, bob = model_system, users["alice"], users["bob"]
    mbox(s, "MboxCreate", alice, name="results", mode=kernel_pb2.MBOX_MODE_ALL)
    mbox(s, "MboxCreate", alice, name="alice.only")
    spawn = kernel_pb2.SpawnRequest(model=MODEL, prompt="The capital of France is",
                                    sampling=greedy(8), stdout_mailbox="results")
    pid = s.call("Spawn", spawn, token=bob).pid
    done = s.call("Wait", kernel_pb2.WaitRequest(pid=pid), token=bob, timeout=300)
    got = mbox(s, "MboxRecv", alice, name="results", timeout_ms=30_000, timeout=60)
    assert (got.text, got.sender, got.pid) == (done.text, "bob", pid)
    assert got.text

    # checked at Spawn, before any job exists
    for name, code in [("alice.only", grpc.StatusCode.PERMISSION_DENIED),
                       ("no.such.box", grpc.StatusCode.NOT_FOUND),
                       ("bad name", grpc.StatusCode.INVALID_ARGUMENT)]:
        spawn.stdout_mailbox = name
        assert code_of(lambda: s.call("Spawn", spawn, token=bob)) == code
    for name in ("results", "alice.only"):
        mbox(s, "MboxRemove", alice, name=name)


def test_mailboxes_need_the_proc_capability(model_system):
    out = subprocess.run([sys.executable, "-m", "llmasos.kernel.main", "adduser", "dave",
                          "--cap", "models", "--home", str(model_system.home)],
                         capture_output=True, text=True, check=True)
    dave = out.stdout.strip().splitlines()[-1]
    with pytest.raises(grpc.RpcError) as info:
        mbox(model_system, "MboxList", dave)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'proc' capability" in info.value.details()


def llmsh(system: System, token: str, line: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMASOS_")}
    env.update(LLMASOS_ADDR=system.address, LLMASOS_TOKEN=token)
    return subprocess.run([sys.executable, "-m", "llmasos.shell.main", "-c", line],
                          capture_output=True, text=True, timeout=120, env=env)


def test_llmsh_mailbox_commands(model_system, users):
    s, alice, bob = model_system, users["alice"], users["bob"]
    out = llmsh(s, alice, "mkmbox sh.box --mode group:bob --size 2; send sh.box hello there; "
                          "ipcs")
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()[-2:]
    assert header.split() == ["MAILBOX", "OWNER", "MODE", "MESSAGES", "BYTES", "MAX",
                              "MAXBYTES"]
    assert row.split()[:5] == ["sh.box", "alice", "group:bob", "1", "11B"]
    out = llmsh(s, bob, "send sh.box second; send sh.box third")
    assert out.returncode == 1 and "full" in out.stderr          # --size 2
    out = llmsh(s, bob, "recv sh.box; recv -v sh.box --timeout 1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["hello there", "# 2 from bob", "second"]
    out = llmsh(s, bob, "recv sh.box --timeout 0.2")
    assert out.returncode == 1 and "within" in out.stderr
    out = llmsh(s, users["carol"], "send sh.box x")
    assert out.returncode == 1 and "belongs to alice" in out.stderr
    out = llmsh(s, bob, "ipcrm sh.box")
    assert out.returncode == 1 and "only they or an admin" in out.stderr
    out = llmsh(s, alice, "mkmbox x --mode sideways")
    assert out.returncode == 2 and "mode must be" in out.stderr
    out = llmsh(s, alice, "ipcrm sh.box; ipcs")
    assert out.returncode == 0 and "sh.box" not in out.stdout
