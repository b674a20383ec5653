"""Load and faults: N concurrent clients (default 200) run loops of Spawn -> Read or Wait with
mixed lengths (some jobs killed by their owner, some stopped and continued) against a real
llmosd on loopback, while a fault injector kill -9s a random service every few seconds (phase
1) and then llmosd itself (phase 2, rebooted on the same address and home). Every accepted job
is checked: it completed with the output of a fault-free run (greedy), or its owner killed it.

    .venv/bin/python bench/soak.py [--clients 200] [--jobs 2] [--every 5] [--kernel-every 15]

Bounded: each client runs --jobs jobs per phase; a job that does not end within --deadline s
counts as lost. Loopback only. Ends with one JSON line: "jobs", "lost", "wrong_output",
"kernel_restarts", "service_restarts", "p99_recovery_s" (targets: 0, 0, recovery < 5 s).

Recovery, per fault: a killed service, from its kill -9 until the supervisor has its next
incarnation HEALTHY (answering); llmosd, from its kill -9 until a client's stream makes progress
again (the first token a Read receives, or a Wait's answer, after the rebooted llmosd said
ready). The reboot alone (kill to ready) is reported beside it as "kernel_ready_s". Clients
reconnect as LLMClient does (userland/connect.py's backoff: 0.1 s growing to 1 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import Booted, boot  # noqa: E402

from llmasos.connect import CHANNEL_OPTIONS, RECONNECT_OPTIONS  # noqa: E402
from llmasos.proto import common_pb2, kernel_pb2, kernel_pb2_grpc  # noqa: E402

MODEL = "smollm2-135m"
PROMPTS = ["The capital of France is", "Once upon a time,", "def fibonacci(n):",
           "The three primary colors are", "Water boils at", "My favourite book is",
           "In 1969, astronauts", "The quick brown fox", "A good night's sleep",
           "The ocean covers"]
LENGTHS = (8, 16, 32)
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)


@dataclass
class Tally:
    jobs: int = 0
    ok: int = 0
    killed: int = 0
    lost: int = 0
    wrong: int = 0
    refused: int = 0                    # Spawns never accepted (the kernel was down): not jobs
    recovery: list[float] = field(default_factory=list)
    kernel_restarts: int = 0
    kernel_ready: list[float] = field(default_factory=list)   # kill -> "llmosd ready"
    services_killed: int = 0
    lost_pids: list[int] = field(default_factory=list)
    progress_at: float = 0.0   # when a client last got tokens (a Read chunk, a Wait answer)

    def progress(self) -> None:
        self.progress_at = time.monotonic()


def greedy(n: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


class Client:
    """One user's loop. Calls wait for the kernel (wait_for_ready) and are sent again when a
    restart breaks them; Read resumes from the offset it reached."""

    def __init__(self, address: str, md: list, deadline: float, tally: Tally) -> None:
        self.channel = grpc.aio.insecure_channel(address,
                                                 options=CHANNEL_OPTIONS + RECONNECT_OPTIONS)
        self.stub = kernel_pb2_grpc.KernelStub(self.channel)
        self.md, self.deadline, self.tally = md, deadline, tally

    async def call(self, name: str, req: object, until: float) -> object:
        while True:
            try:
                return await getattr(self.stub, name)(req, metadata=self.md, timeout=30,
                                                      wait_for_ready=True)
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRYABLE or time.monotonic() > until:
                    raise
                await asyncio.sleep(0.2)

    async def read(self, pid: int, until: float) -> list[int]:
        got: list[int] = []
        while True:
            try:
                async for chunk in self.stub.Read(kernel_pb2.ReadRequest(pid=pid, offset=len(got)),
                                                  metadata=self.md, timeout=120,
                                                  wait_for_ready=True):
                    got += chunk.token_ids
                    self.tally.progress()
                return got
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRYABLE or time.monotonic() > until:
                    raise
                await asyncio.sleep(0.2)

    async def job(self, rng: random.Random, expected: dict, tally: Tally) -> None:
        prompt, n = rng.choice(PROMPTS), rng.choice(LENGTHS)
        until = time.monotonic() + self.deadline
        try:
            pid = (await self.call("Spawn", kernel_pb2.SpawnRequest(
                model=MODEL, prompt=prompt, sampling=greedy(n)), until)).pid
        except grpc.aio.AioRpcError:
            tally.refused += 1
            return
        tally.jobs += 1
        action = rng.random()
        try:
            if action < 0.05:
                await self.call("Kill", kernel_pb2.KillRequest(pid=pid, signal=9), until)
            elif action < 0.10:
                await self.call("Kill", kernel_pb2.KillRequest(pid=pid, signal=19), until)
                await asyncio.sleep(0.5)
                await self.call("Kill", kernel_pb2.KillRequest(pid=pid, signal=18), until)
            streamed = await self.read(pid, until) if 0.10 <= action < 0.40 else None
            reply = await self.call("Wait", kernel_pb2.WaitRequest(pid=pid), until)
            tally.progress()
        except grpc.aio.AioRpcError as e:
            if action < 0.10 and e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                reply = await self.call("Wait", kernel_pb2.WaitRequest(pid=pid), until)
                streamed = None
            else:
                tally.lost += 1
                tally.lost_pids.append(pid)
                return
        if reply.info.exit_reason == common_pb2.EXIT_KILLED and action < 0.05:
            tally.killed += 1
        elif list(reply.token_ids) == expected[(prompt, n)] and (
                streamed is None or streamed == expected[(prompt, n)]):
            tally.ok += 1
        else:
            tally.wrong += 1

    async def run(self, seed: int, jobs: int, expected: dict, tally: Tally) -> None:
        rng = random.Random(seed)
        for _ in range(jobs):
            await self.job(rng, expected, tally)
        await self.channel.close()


async def reference(address: str, md: list) -> dict:
    """The fault-free run: every (prompt, length) once, alone."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = kernel_pb2_grpc.KernelStub(ch)
        out = {}
        for p in PROMPTS:
            for n in LENGTHS:
                pid = (await stub.Spawn(kernel_pb2.SpawnRequest(model=MODEL, prompt=p,
                                                                sampling=greedy(n)),
                                        metadata=md)).pid
                out[(p, n)] = list((await stub.Wait(kernel_pb2.WaitRequest(pid=pid),
                                                    metadata=md)).token_ids)
        return out


class Faults:
    """kill -9 a random service (phase 1) or llmosd itself (phase 2), and time the recovery."""

    def __init__(self, system: Booted, flags: list[str], tally: Tally) -> None:
        self.system, self.flags, self.tally = system, flags, tally
        self.services_killed = 0

    async def services(self, md: list, every: float, stop: asyncio.Event) -> None:
        async with grpc.aio.insecure_channel(self.system.address) as ch:
            stub = kernel_pb2_grpc.KernelStub(ch)
            rng = random.Random(7)
            while not stop.is_set():
                await asyncio.sleep(every)
                svcs = {s.name: s for s in (await stub.Services(kernel_pb2.ServicesRequest(),
                                                                metadata=md)).services}
                victim = svcs[rng.choice(sorted(svcs))]
                if not victim.pid:
                    continue
                t0 = time.monotonic()
                os.kill(victim.pid, signal.SIGKILL)
                self.services_killed += 1
                while True:
                    await asyncio.sleep(0.1)
                    now = {s.name: s for s in (await stub.Services(
                        kernel_pb2.ServicesRequest(), metadata=md)).services}[victim.name]
                    if now.state == "HEALTHY" and now.incarnation > victim.incarnation:
                        break
                self.tally.recovery.append(time.monotonic() - t0)

    async def kernel(self, every: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(every)
            if stop.is_set():
                break
            t0 = time.monotonic()
            self.system.proc.send_signal(signal.SIGKILL)
            self.system.proc.wait()
            address = self.system.address
            self.system = await asyncio.to_thread(boot, self.system.home, *self.flags,
                                                  address=address)
            ready = time.monotonic()
            self.tally.kernel_restarts += 1
            self.tally.kernel_ready.append(ready - t0)
            while self.tally.progress_at <= ready and not stop.is_set():
                await asyncio.sleep(0.02)   # until a client's stream moves again
            if self.tally.progress_at > ready:
                self.tally.recovery.append(self.tally.progress_at - t0)
            else:   # every client had ended: no stream to resume, the reboot is the recovery
                self.tally.recovery.append(ready - t0)
            print(f"  llmosd killed: ready after {ready - t0:.1f} s, streams moving after "
                  f"{self.tally.recovery[-1]:.1f} s", flush=True)


async def phase(name: str, system_ref: list, args: argparse.Namespace, expected: dict,
                md: list, tally: Tally, flags: list[str]) -> None:
    faults = Faults(system_ref[0], flags, tally)
    stop = asyncio.Event()
    injector = asyncio.create_task(faults.services(md, args.every, stop) if name == "services"
                                   else faults.kernel(args.kernel_every, stop))
    clients = [Client(system_ref[0].address, md, args.deadline, tally)
               for _ in range(args.clients)]
    t0 = time.monotonic()
    await asyncio.gather(*(c.run(i + (1000 if name == "kernel" else 0), args.jobs, expected,
                                 tally) for i, c in enumerate(clients)))
    stop.set()
    await injector
    system_ref[0] = faults.system
    print(f"phase {name}: {time.monotonic() - t0:.0f} s, services killed "
          f"{faults.services_killed}, kernel restarts {tally.kernel_restarts}", flush=True)
    tally.services_killed += faults.services_killed


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def machine() -> str:
    """CPU features and load, printed beside the figures (they depend on both)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f
                          if line.startswith("flags")), set())
    except OSError:
        pass
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_tile", "avx2") if f in flags]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"cpus {os.cpu_count()}, {' '.join(isa) or 'no avx2'}; load {load}"


async def main_async(args: argparse.Namespace) -> dict:
    print(machine(), flush=True)
    home = Path(tempfile.mkdtemp(prefix="llmasos-soak-"))
    flags = ["--restart-max", "1000", "--kv-budget-mb", "512", "--no-http"]   # gRPC only
    system = boot(home, *flags)
    md = system.metadata
    try:
        expected = await reference(system.address, md)
        tally = Tally()
        ref = [system]
        await phase("services", ref, args, expected, md, tally, flags)
        await phase("kernel", ref, args, expected, md, tally, flags)
    finally:
        ref[0].stop()
    return {
        "clients": args.clients, "jobs": tally.jobs, "completed": tally.ok,
        "killed_by_owner": tally.killed, "lost": tally.lost, "wrong_output": tally.wrong,
        "spawns_refused": tally.refused, "kernel_restarts": tally.kernel_restarts,
        "service_restarts": tally.services_killed,
        "p50_recovery_s": pct(tally.recovery, 0.5), "p99_recovery_s": pct(tally.recovery, 0.99),
        "recovery_s": [round(r, 2) for r in tally.recovery],
        "kernel_ready_s": [round(r, 2) for r in tally.kernel_ready],
        "lost_pids": tally.lost_pids[:20], "load_after": round(os.getloadavg()[0], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=2, help="jobs per client per phase")
    ap.add_argument("--every", type=float, default=5.0, help="seconds between service kills")
    ap.add_argument("--kernel-every", type=float, default=15.0,
                    help="seconds between kills of llmosd")
    ap.add_argument("--deadline", type=float, default=600.0, help="seconds a job may take")
    args = ap.parse_args()
    out = asyncio.run(main_async(args))
    for key, value in out.items():
        print(f"{key:>18}: {value}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
