"""The IPC service: mailboxes in-process, and the service as a real process over gRPC."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmasos.proto import ipc_pb2, ipc_pb2_grpc
from llmasos.services.ipc.mailboxes import (
    DEFAULT_CAPACITY,
    MAX_CAPACITY,
    MAX_PAYLOAD,
    BadRequest,
    Mailboxes,
    MailboxExists,
    MailboxFull,
    NoSuchMailbox,
    ReceiveTimeout,
)

from conftest import start_service, stop_service


@pytest.fixture
def mb() -> Mailboxes:
    return Mailboxes()


# -- Mailboxes in-process ---------------------------------------------------------------------

def test_fifo_with_sequences_and_senders(mb):
    info = mb.create("jobs", owner="alice")
    assert (info.capacity, info.depth) == (DEFAULT_CAPACITY, 0)
    seqs = [mb.send("jobs", f"m{i}".encode(), sender=f"s{i}") for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    got = [mb.receive("jobs") for _ in range(5)]
    assert [(m.payload, m.sender, m.sequence) for m in got] == \
        [(f"m{i}".encode(), f"s{i}", i + 1) for i in range(5)]
    assert mb.send("jobs", b"again") == 6  # sequences never restart
    assert mb.bytes_held == 5


def test_capacity_and_full(mb):
    mb.create("small", capacity=2)
    mb.send("small", b"a")
    mb.send("small", b"b")
    with pytest.raises(MailboxFull):
        mb.send("small", b"c")
    assert mb.receive("small").payload == b"a"
    assert mb.send("small", b"c") == 3
    assert [(m.name, m.depth, m.capacity) for m in mb.list_mailboxes()] == [("small", 2, 2)]


def test_byte_budget_and_mailbox_count():
    mb = Mailboxes(max_bytes=10, max_mailboxes=2)
    mb.create("a")
    mb.create("b")
    with pytest.raises(MailboxFull):
        mb.create("c")
    mb.send("a", b"x" * 6)
    with pytest.raises(MailboxFull):
        mb.send("b", b"y" * 5)  # 11 bytes across mailboxes
    mb.receive("a")
    assert mb.send("b", b"y" * 10) == 1


def test_payload_limit(mb):
    mb.create("big")
    assert mb.send("big", b"\0" * MAX_PAYLOAD) == 1
    with pytest.raises(BadRequest):
        mb.send("big", b"\0" * (MAX_PAYLOAD + 1))
    assert len(mb.receive("big").payload) == MAX_PAYLOAD


@pytest.mark.parametrize("name", ["", "a" * 65, "-x", "a b", "a\n", "ä", "x*"])
def test_bad_names(mb, name):
    with pytest.raises(BadRequest):
        mb.create(name)


def test_bad_create_arguments(mb):
    assert mb.create("a" * 64).capacity == DEFAULT_CAPACITY
    assert mb.create("pid:42/out@alice", capacity=MAX_CAPACITY).capacity == MAX_CAPACITY
    with pytest.raises(BadRequest):
        mb.create("x", capacity=MAX_CAPACITY + 1)
    with pytest.raises(BadRequest):
        mb.create("y", owner="o" * 65)
    with pytest.raises(MailboxExists):
        mb.create("a" * 64)
    mb.create("z")
    with pytest.raises(BadRequest):
        mb.send("z", b"", sender="s" * 65)


def test_unknown_mailbox(mb):
    for fn in (lambda: mb.send("nope", b""), lambda: mb.receive("nope"),
               lambda: mb.receive("nope", 1.0)):
        with pytest.raises(NoSuchMailbox):
            fn()


def test_receive_timeout_and_no_wait(mb):
    mb.create("q")
    with pytest.raises(ReceiveTimeout):
        mb.receive("q")
    with pytest.raises(ReceiveTimeout):
        mb.receive("q", 0.05)


def test_blocked_receiver_woken_by_send(mb):
    mb.create("q")
    got: list = []
    t = threading.Thread(target=lambda: got.append(mb.receive("q", 30)))
    t.start()
    while mb.waiters == 0:  # wait until it is really blocked
        time.sleep(0.001)
    assert mb.send("q", b"hello", "me") == 1
    t.join(timeout=10)
    assert not t.is_alive()
    assert [(m.payload, m.sender) for m in got] == [(b"hello", "me")]


def test_cancelled_receiver_leaves_message(mb):
    mb.create("q")
    alive = threading.Event()
    alive.set()
    errors: list = []

    def recv() -> None:
        try:
            mb.receive("q", 30, alive.is_set)
        except ReceiveTimeout as e:
            errors.append(e)

    t = threading.Thread(target=recv)
    t.start()
    while mb.waiters == 0:
        time.sleep(0.001)
    alive.clear()
    mb.wake("q")  # what the RPC's termination callback does
    t.join(timeout=10)
    assert not t.is_alive() and len(errors) == 1
    mb.send("q", b"kept")
    assert mb.receive("q").payload == b"kept"


def test_waiter_limit():
    mb = Mailboxes(max_waiters=1)
    mb.create("q")
    t = threading.Thread(target=lambda: mb.receive("q", 30))
    t.start()
    while mb.waiters == 0:
        time.sleep(0.001)
    with pytest.raises(MailboxFull):
        mb.receive("q", 5)
    mb.send("q", b"x")
    t.join(timeout=10)
    assert not t.is_alive()


def test_many_producers_one_consumer_in_order(mb):
    mb.create("q", capacity=MAX_CAPACITY)
    n, producers = 300, 4

    def produce(p: int) -> None:
        for i in range(n):
            mb.send("q", f"{p}:{i}".encode(), sender=str(p))

    got = []
    with ThreadPoolExecutor(producers + 1) as pool:
        consumer = pool.submit(lambda: [mb.receive("q", 10) for _ in range(n * producers)])
        for p in range(producers):
            pool.submit(produce, p)
        got = consumer.result(timeout=60)
    assert [m.sequence for m in got] == list(range(1, n * producers + 1))
    for p in range(producers):  # each producer's messages arrive in the order sent
        mine = [int(m.payload.split(b":")[1]) for m in got if m.sender == str(p)]
        assert mine == list(range(n))
    assert mb.bytes_held == 0


# -- the service as a process -----------------------------------------------------------------

@pytest.fixture
def service(tmp_path):
    svc = start_service("llmasos.services.ipc", "--state-dir", str(tmp_path))
    try:
        yield svc
    finally:
        if svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait()


def code_of(fn, req, timeout: float = 10) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn(req, timeout=timeout)
    return info.value.code()


def test_service_over_grpc(service):
    proc, address = service.proc, service.address
    with service.channel() as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ["", "llmasos.v1.Ipc"]:
            res = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert res.status == health_pb2.HealthCheckResponse.SERVING

        ipc = ipc_pb2_grpc.IpcStub(ch)
        ipc.CreateMailbox(ipc_pb2.CreateMailboxRequest(name="box", owner="alice", capacity=2),
                          timeout=10)
        assert code_of(ipc.CreateMailbox, ipc_pb2.CreateMailboxRequest(name="box")) \
            == grpc.StatusCode.ALREADY_EXISTS
        for bad in ["", "a" * 65, "has space"]:
            assert code_of(ipc.CreateMailbox, ipc_pb2.CreateMailboxRequest(name=bad)) \
                == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(ipc.CreateMailbox, ipc_pb2.CreateMailboxRequest(
            name="huge", capacity=MAX_CAPACITY + 1)) == grpc.StatusCode.INVALID_ARGUMENT

        assert ipc.Send(ipc_pb2.SendRequest(name="box", payload=b"one", sender="bob"),
                        timeout=10).sequence == 1
        assert ipc.Send(ipc_pb2.SendRequest(name="box", payload=b"two"), timeout=10).sequence == 2
        assert code_of(ipc.Send, ipc_pb2.SendRequest(name="box", payload=b"three")) \
            == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert code_of(ipc.Send, ipc_pb2.SendRequest(name="nobox", payload=b"x")) \
            == grpc.StatusCode.NOT_FOUND
        assert code_of(ipc.Send, ipc_pb2.SendRequest(name="box", payload=b"\0" * (MAX_PAYLOAD + 1))
                       ) == grpc.StatusCode.INVALID_ARGUMENT

        boxes = ipc.ListMailboxes(ipc_pb2.ListMailboxesRequest(), timeout=10).mailboxes
        assert [(b.name, b.owner, b.depth, b.capacity) for b in boxes] == [("box", "alice", 2, 2)]

        r1 = ipc.Receive(ipc_pb2.ReceiveRequest(name="box"), timeout=10)
        r2 = ipc.Receive(ipc_pb2.ReceiveRequest(name="box", timeout_ms=100), timeout=10)
        assert [(r.payload, r.sender, r.sequence) for r in (r1, r2)] == \
            [(b"one", "bob", 1), (b"two", "", 2)]
        assert code_of(ipc.Receive, ipc_pb2.ReceiveRequest(name="box")) \
            == grpc.StatusCode.DEADLINE_EXCEEDED
        assert code_of(ipc.Receive, ipc_pb2.ReceiveRequest(name="box", timeout_ms=50)) \
            == grpc.StatusCode.DEADLINE_EXCEEDED
        assert code_of(ipc.Receive, ipc_pb2.ReceiveRequest(name="nobox", timeout_ms=50)) \
            == grpc.StatusCode.NOT_FOUND

        # a Receive blocked in the server is woken by a Send on another call
        waiting = ipc.Receive.future(ipc_pb2.ReceiveRequest(name="box", timeout_ms=30_000),
                                     timeout=60)
        time.sleep(0.2)
        assert not waiting.done()
        ipc.Send(ipc_pb2.SendRequest(name="box", payload=b"late", sender="carol"), timeout=10)
        got = waiting.result(timeout=10)
        assert (got.payload, got.sender, got.sequence) == (b"late", "carol", 3)

        # the caller's own deadline ends a long wait; the message sent later is not lost
        assert code_of(ipc.Receive, ipc_pb2.ReceiveRequest(name="box", timeout_ms=60_000),
                       timeout=0.3) == grpc.StatusCode.DEADLINE_EXCEEDED
        ipc.Send(ipc_pb2.SendRequest(name="box", payload=b"kept"), timeout=10)
        assert ipc.Receive(ipc_pb2.ReceiveRequest(name="box"), timeout=10).payload == b"kept"

        # a receiver that cancels takes nothing: the next message goes to the next receiver
        gone = ipc.Receive.future(ipc_pb2.ReceiveRequest(name="box", timeout_ms=60_000))
        time.sleep(0.2)
        assert gone.cancel()
        time.sleep(0.1)
        ipc.Send(ipc_pb2.SendRequest(name="box", payload=b"after-cancel"), timeout=10)
        assert ipc.Receive(ipc_pb2.ReceiveRequest(name="box", timeout_ms=1000),
                           timeout=10).payload == b"after-cancel"

        # shutdown while a receiver still waits: the service exits 0 without waiting it out
        stuck = ipc.Receive.future(ipc_pb2.ReceiveRequest(name="box", timeout_ms=600_000))
        time.sleep(0.2)
        stop_service(proc, address)
        with pytest.raises(grpc.RpcError):
            stuck.result(timeout=10)


def test_blocked_receivers_cannot_starve_senders(tmp_path):
    svc = start_service("llmasos.services.ipc", "--workers", "6",  # 2 may block
                        "--state-dir", str(tmp_path))
    proc, address = svc.proc, svc.address
    try:
        with svc.channel() as ch:
            ipc = ipc_pb2_grpc.IpcStub(ch)
            ipc.CreateMailbox(ipc_pb2.CreateMailboxRequest(name="q"), timeout=10)
            waiting = [ipc.Receive.future(ipc_pb2.ReceiveRequest(name="q", timeout_ms=30_000),
                                          timeout=60) for _ in range(2)]
            time.sleep(0.3)
            assert code_of(ipc.Receive, ipc_pb2.ReceiveRequest(name="q", timeout_ms=30_000)) \
                == grpc.StatusCode.RESOURCE_EXHAUSTED
            for i in range(2):
                ipc.Send(ipc_pb2.SendRequest(name="q", payload=b"%d" % i), timeout=10)
            assert sorted(f.result(timeout=10).payload for f in waiting) == [b"0", b"1"]
        stop_service(proc, address)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
