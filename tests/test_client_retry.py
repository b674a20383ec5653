"""Clients ride over restarts: gRPC's retry policy on UNAVAILABLE for the idempotent calls
only, a client that waits for a restarted llmosd, and a Read or Poll that resumes where it
broke.
Against a tiny fake Kernel: a real grpc.server on loopback, in this process or (to be killed
with SIGKILL, as a crashed llmosd is) in a child process running this file."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from llmasos import AsyncLLMClient, LLMClient, calls, connect, errors
from llmasos.aio import AsyncProcess
from llmasos.proto import kernel_pb2, kernel_pb2_grpc

from conftest import System, boot, shutdown

# The fake job's output: one chunk per token, with a multi-byte character to count.
PIECES = [f"w{i}é " for i in range(12)]
FULL = "".join(PIECES)


class FakeKernel(kernel_pb2_grpc.KernelServicer):
    """WhoAmI and Spawn fail UNAVAILABLE `fail` times first; Read streams PIECES from the
    request's offset and (break_at) aborts once mid-stream; Wait answers after a while."""

    def __init__(self, fail: int = 0, break_at: int = -1, delay: float = 0.0) -> None:
        self.fail, self.break_at, self.delay = fail, break_at, delay
        self.calls: dict[str, int] = {}
        self.reads: list[int] = []  # the offset of each Read
        self.polls: list[dict[int, int]] = []   # each Poll's jobs and offsets
        self.lock = threading.Lock()

    def _count(self, name: str, ctx: grpc.ServicerContext) -> None:
        with self.lock:
            n = self.calls[name] = self.calls.get(name, 0) + 1
        if n <= self.fail:
            ctx.abort(grpc.StatusCode.UNAVAILABLE, f"{name} attempt {n}: not yet")

    def WhoAmI(self, req: kernel_pb2.WhoAmIRequest,  # noqa: N802
               ctx: grpc.ServicerContext) -> kernel_pb2.WhoAmIResponse:
        self._count("WhoAmI", ctx)
        return kernel_pb2.WhoAmIResponse(user="root", root=True)

    def Spawn(self, req: kernel_pb2.SpawnRequest,  # noqa: N802
              ctx: grpc.ServicerContext) -> kernel_pb2.SpawnResponse:
        if req.model == "gone":
            ctx.abort(grpc.StatusCode.NOT_FOUND, "model 'gone' is not deployed")
        self._count("Spawn", ctx)
        return kernel_pb2.SpawnResponse(pid=7)

    def Models(self, req: kernel_pb2.ModelsRequest,  # noqa: N802
               ctx: grpc.ServicerContext) -> kernel_pb2.ModelsResponse:
        ctx.abort(grpc.StatusCode.INTERNAL, "listing models failed")

    def Wait(self, req: kernel_pb2.WaitRequest,  # noqa: N802
             ctx: grpc.ServicerContext) -> kernel_pb2.WaitResponse:
        time.sleep(self.delay * len(PIECES))  # the job runs a while
        info = kernel_pb2.ProcessInfo(pid=req.pid, exit_message=f"answered by {os.getpid()}")
        return kernel_pb2.WaitResponse(info=info, text=FULL)

    def Read(self, req: kernel_pb2.ReadRequest,  # noqa: N802
             ctx: grpc.ServicerContext) -> Iterator[kernel_pb2.ReadChunk]:
        self.reads.append(req.offset)
        for i in range(req.offset, len(PIECES)):
            if i == self.break_at and len(self.reads) == 1:
                ctx.abort(grpc.StatusCode.UNAVAILABLE, "the kernel went away")
            time.sleep(self.delay)
            done = i == len(PIECES) - 1
            yield kernel_pb2.ReadChunk(text=PIECES[i], token_ids=[i], done=done)

    def Poll(self, requests: Iterator[kernel_pb2.PollRequest],  # noqa: N802
             ctx: grpc.ServicerContext) -> Iterator[kernel_pb2.PollChunk]:
        """Every job named streams PIECES from its offset, one piece each a message; the first
        Poll aborts at message break_at."""
        at = {f.pid: f.offset for r in requests for f in r.follow}
        self.polls.append(dict(at))
        for n in range(len(PIECES)):
            if n == self.break_at and len(self.polls) == 1:
                ctx.abort(grpc.StatusCode.UNAVAILABLE, "the kernel went away")
            entries = []
            for pid, i in list(at.items()):
                entries.append(kernel_pb2.PollEntry(pid=pid, chunk=kernel_pb2.ReadChunk(
                    text=PIECES[i], token_ids=[i], done=i == len(PIECES) - 1)))
                at[pid] = i + 1
                if at[pid] == len(PIECES):
                    del at[pid]
            if not entries:
                return
            yield kernel_pb2.PollChunk(entries=entries)


RETRY = float(os.environ.get("TEST_RETRY_S", "30"))  # 0: see the tests fail without retry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(kernel: FakeKernel, port: int = 0) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(8))
    kernel_pb2_grpc.add_KernelServicer_to_server(kernel, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def fake() -> Iterator[tuple[FakeKernel, str]]:
    kernel = FakeKernel(fail=2, break_at=4)
    server, addr = serve(kernel)
    yield kernel, addr
    server.stop(None)


# -- the retry policy -----------------------------------------------------------------------------


def test_only_idempotent_calls_are_retried():
    assert "Spawn" not in calls.RETRIED and "Deploy" not in calls.RETRIED
    assert {"Wait", "Read", "Ps", "Stat", "Models", "WhoAmI", "Services", "Kill",
            "Nice"} <= set(calls.RETRIED)


def test_unavailable_twice_then_ok_is_retried_by_the_channel(fake):
    kernel, addr = fake
    with LLMClient(address=addr, token="t") as c:
        assert c.whoami().user == "root"
    assert kernel.calls["WhoAmI"] == 3


def test_retry_off_gives_the_first_unavailable(fake):
    kernel, addr = fake
    with LLMClient(address=addr, token="t", retry_s=0) as c, \
            pytest.raises(errors.Unavailable, match="attempt 1"):
        c.whoami()
    assert kernel.calls["WhoAmI"] == 1


def test_spawn_that_reached_the_kernel_is_not_sent_again(fake):
    kernel, addr = fake
    with LLMClient("m", address=addr, token="t") as c, \
            pytest.raises(errors.Unavailable, match="Spawn attempt 1"):
        c.spawn("hi")
    assert kernel.calls["Spawn"] == 1


def test_unknown_model_with_unlistable_models_is_the_same_error_in_both_clients(fake):
    """The clients used to differ here: one suppressed the failed Models call, one raised it."""
    _, addr = fake

    async def go() -> None:
        async with AsyncLLMClient(address=addr, token="t") as c:
            await c.spawn("hi", model="gone")
    with LLMClient(address=addr, token="t") as c, \
            pytest.raises(errors.NotFound, match="'gone' is not deployed") as sync_err:
        c.spawn("hi", model="gone")
    with pytest.raises(errors.NotFound, match="'gone' is not deployed") as async_err:
        asyncio.run(go())
    assert type(sync_err.value) is type(async_err.value) is errors.NotFound


def test_model_not_found_names_the_deployed_models():
    err = errors.NotFound("unknown model 'x'")
    named = calls.model_not_found(err, "x", ["a", "b"])
    assert isinstance(named, errors.ModelNotFound) and named.deployed == ["a", "b"]
    assert str(named).endswith("deployed models: a, b")
    assert calls.model_not_found(err, "x", None) is err  # listing failed: the kernel's word
    assert calls.model_not_found(err, "a", ["a"]) is err  # deployed: NOT_FOUND is about else


def test_retry_seconds_from_argument_or_environment(monkeypatch):
    monkeypatch.delenv("LLMASOS_RETRY_S", raising=False)
    assert connect.retry_seconds() == connect.DEFAULT_RETRY_S
    monkeypatch.setenv("LLMASOS_RETRY_S", "4.5")
    assert connect.retry_seconds() == 4.5
    assert connect.retry_seconds(0) == 0.0
    monkeypatch.setenv("LLMASOS_RETRY_S", "soon")
    with pytest.raises(errors.InvalidArgument, match="not a number of seconds"):
        LLMClient(address="127.0.0.1:1")


def test_async_client_is_retried_the_same(fake):
    kernel, addr = fake

    async def go() -> str:
        async with AsyncLLMClient(address=addr, token="t") as c:
            return (await c.whoami()).user
    assert asyncio.run(go()) == "root" and kernel.calls["WhoAmI"] == 3


# -- Read resumes where it broke ------------------------------------------------------------------


def test_broken_read_resumes_without_gap_or_repeat(fake):
    kernel, addr = fake
    with LLMClient(address=addr, token="t") as c:
        chunks = list(c.read(7))
    assert "".join(ch.text for ch in chunks) == FULL
    assert [t for ch in chunks for t in ch.token_ids] == list(range(len(PIECES)))
    assert kernel.reads == [0, 4]


def test_async_broken_read_resumes_without_gap_or_repeat(fake):
    kernel, addr = fake

    async def go() -> list[str]:
        async with AsyncLLMClient(address=addr, token="t") as c:
            return [p async for p in AsyncProcess(c, 7).read()]
    assert "".join(asyncio.run(go())) == FULL
    assert kernel.reads == [0, 4]


def test_broken_poll_resumes_each_job_where_it_broke(fake):
    kernel, addr = fake
    with LLMClient(address=addr, token="t") as c:
        got: dict[int, list[int]] = {7: [], 8: []}
        text = {7: "", 8: ""}
        for pid, chunk in c.poll([7, 8]):
            got[pid] += chunk.token_ids
            text[pid] += chunk.text
    assert got == {7: list(range(len(PIECES))), 8: list(range(len(PIECES)))}
    assert text == {7: FULL, 8: FULL}
    assert kernel.polls == [{7: 0, 8: 0}, {7: 4, 8: 4}]


def test_async_broken_poll_resumes_each_job_where_it_broke(fake):
    kernel, addr = fake

    async def go() -> dict[int, str]:
        async with AsyncLLMClient(address=addr, token="t") as c:
            text = {7: "", 8: ""}
            async for pid, chunk in c.poll([7, 8]):
                text[pid] += chunk.text
            return text
    assert asyncio.run(go()) == {7: FULL, 8: FULL}
    assert kernel.polls == [{7: 0, 8: 0}, {7: 4, 8: 4}]


def test_read_without_retry_stops_at_the_break(fake):
    kernel, addr = fake
    with LLMClient(address=addr, token="t", retry_s=0) as c:
        got = []
        with pytest.raises(errors.Unavailable, match="went away"):
            got.extend(ch.text for ch in c.read(7))
    assert "".join(got) == "".join(PIECES[:4]) and len(kernel.reads) == 1


# -- a kernel killed with SIGKILL and started again on the same address ---------------------------


class Kernels:
    """Fake kernels in child processes (this file run as a script), one at a time on one port,
    killed with SIGKILL as a crashed llmosd is, and started again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        child = subprocess.Popen([sys.executable, str(Path(__file__)), str(self.port)],
                                 stdout=subprocess.PIPE, text=True)
        self.procs.append(child)
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"

    def kill(self) -> None:
        self.procs[-1].kill()
        self.procs[-1].wait()

    def restart(self, after: float = 1.0, delay: float = 0.0) -> None:
        """In the background: `delay` s from now SIGKILL the kernel, `after` s later start a
        fresh one (clients must wait meanwhile: llmosd is rebooting)."""
        def crash() -> None:
            time.sleep(delay)
            self.kill()
            time.sleep(after)
            self.start()
        self.threads.append(threading.Thread(target=crash))
        self.threads[-1].start()

    def settle(self) -> None:
        for t in self.threads:
            t.join()


@pytest.fixture
def kernels() -> Iterator[Kernels]:
    k = Kernels()
    k.start()
    yield k
    k.settle()
    for p in k.procs:
        p.kill()
        p.wait()


def test_client_waits_for_a_restarted_kernel(kernels):
    with LLMClient(address=kernels.address, token="t", retry_s=RETRY) as c:
        assert c.whoami().root
        kernels.kill()
        kernels.restart()
        assert c.whoami().root  # waited for the new kernel instead of failing


def test_async_client_waits_for_a_restarted_kernel(kernels):
    async def go() -> None:
        async with AsyncLLMClient(address=kernels.address, token="t", retry_s=RETRY) as c:
            assert (await c.whoami()).root
            kernels.kill()
            kernels.restart()
            assert (await c.whoami()).root
    asyncio.run(go())


def test_wait_in_flight_when_the_kernel_dies_returns_the_full_output(kernels):
    with LLMClient(address=kernels.address, token="t", retry_s=RETRY) as c:
        assert c.whoami().root
        kernels.restart(delay=0.5)  # while the Wait below is in flight
        done = c.wait(7)  # resent by the retry policy to the rebooted kernel
    kernels.settle()
    assert done.text == FULL and done.pid == 7
    assert done.info.exit_message == f"answered by {kernels.procs[-1].pid}"  # the second one


def test_kernel_that_does_not_come_back_is_named(kernels):
    with LLMClient(address=kernels.address, token="t", retry_s=1, timeout=1) as c:
        assert c.whoami().root
        kernels.kill()
        with pytest.raises(errors.DeadlineExceeded, match="is it down"):
            c.whoami()


def test_read_rides_over_a_killed_kernel(kernels):
    with LLMClient(address=kernels.address, token="t", retry_s=RETRY) as c:
        text = ""
        for chunk in c.read(7):
            text += chunk.text
            if chunk.token_ids[0] == 3:
                kernels.restart()
    kernels.settle()
    assert text == FULL and len(kernels.procs) == 2


def boot_on(system: System) -> subprocess.Popen:
    """llmosd again, on the address and home of a system that was shut down."""
    proc = subprocess.Popen([sys.executable, "-m", "llmasos.kernel.main", "run", "--no-embedded",
                             "--listen", system.address, "--home", str(system.home)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "LLMASOS_HOME": str(system.home)})
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("llmosd ready"):
            return proc
    raise AssertionError(f"llmosd did not boot again: exit {proc.wait()}")


def test_client_rides_over_a_real_llmosd_restart(tmp_path):
    system = boot(tmp_path / "home", "--no-embedded")
    pool, again = futures.ThreadPoolExecutor(1), None
    try:
        with LLMClient(address=system.address, token=system.root_token, retry_s=RETRY) as c:
            assert c.whoami().root
            assert shutdown(system) == 0
            again = pool.submit(boot_on, system)
            assert c.whoami().root  # waited for the second llmosd; the same token still works
            assert {s.name for s in c.services()} >= {"security", "scheduler", "inference",
                                                        "ipc"}
    finally:
        if again is not None:
            system.proc = again.result()
        pool.shutdown()
        assert shutdown(system) == 0


def test_fresh_client_still_fails_at_once_when_no_kernel_runs():
    with LLMClient(address=f"127.0.0.1:{free_port()}", token="t", retry_s=30, timeout=60) as c, \
            pytest.raises(errors.Unavailable, match="is it running"):
        c.whoami()


if __name__ == "__main__":  # the child kernel: streams slowly so a test can kill it mid-Read
    server, _ = serve(FakeKernel(delay=0.2), int(sys.argv[1]))
    print("ready", flush=True)
    server.wait_for_termination()
