"""Syscall round-trip latency over loopback: WhoAmI, Stat and Ps against a real kernel (with its
real security, scheduler, ipc and inference services) holding 10 and then 10,000 processes,
beside a bare gRPC echo server measured in the same run (the floor).

    .venv/bin/python bench/syscall_latency.py [--calls 500]

The kernel runs as users run it: default logging (INFO, one JSON line per syscall) to a file,
as `llmosd run 2>llmosd.log` does. A second kernel with logging raised to WARNING is measured
call by call beside it, to price that line separately ("logging_cost_p50_us").

Prints a table and ends with one JSON line: p50/p99 of each call, "p50_ratio_vs_echo" (the worst
of the three at 10 processes, logging on) and "ps_10000_ms" (p50 of Ps listing all 10,000).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from concurrent import futures

import grpc

from llmasos.proto import kernel_pb2, kernel_pb2_grpc

ECHO = "/bench.Echo/Echo"


def serve_echo(queue: mp.Queue) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handler = grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    queue.put(f"127.0.0.1:{port}")
    server.wait_for_termination()


def serve_kernel(queue: mp.Queue, home: str, fill: mp.Queue, quiet: bool) -> None:
    """A kernel composed in this child process, so the bench can fill its table directly. Its
    stderr goes to a file, as `llmosd run 2>llmosd.log` would: the default INFO level writes a
    JSON line per syscall; quiet raises the level to WARNING, to price that line."""

    from llmasos.kernel import log

    fd = os.open(os.path.join(home, "llmosd.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)   # the same fd-level redirection a shell does, so buffering is the daemon's
    from llmasos.kernel.config import Config
    from llmasos.kernel.executor import Executor
    from llmasos.kernel.kernel import Kernel
    from llmasos.kernel.proctable import State
    from llmasos.kernel.server import build

    log.configure("warning" if quiet else "info")   # INFO: what main.py sets
    k = Kernel(Config(listen="127.0.0.1:0", home=home, embedded=False))
    k.executor = Executor(k)
    server, port = build(k, "127.0.0.1:0")
    k.supervisor.start()
    assert k.supervisor.wait_healthy(120), "services did not come up"
    k.executor.start()
    server.start()
    queue.put(f"127.0.0.1:{port}")
    while True:
        n = fill.get()
        if n is None:
            break
        for _ in range(n):
            proc = k.table.spawn(user="root", uid=0, ppid=0, model="bench", nice=0,
                                 prompt_ids=list(range(32)))
            k.table.set_state(proc, State.STOPPED)   # parked: the step loop leaves it alone
        queue.put(len(k.table))
    server.stop(0)
    k.executor.stop()
    k.supervisor.stop()


def measure(fn: object, calls: int) -> dict[str, float]:
    for _ in range(min(50, calls)):   # warm up connections and caches
        fn()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return {"p50_ms": statistics.median(samples), "p99_ms": samples[int(len(samples) * 0.99) - 1]}


def calls_on(stub: kernel_pb2_grpc.KernelStub, md: list) -> dict[str, object]:
    return {
        "whoami": lambda: stub.WhoAmI(kernel_pb2.WhoAmIRequest(), metadata=md, timeout=10),
        "stat": lambda: stub.Stat(kernel_pb2.StatRequest(pid=5), metadata=md, timeout=10),
        "ps": lambda: stub.Ps(kernel_pb2.PsRequest(all=True), metadata=md, timeout=30),
    }


class KernelChild:
    """A kernel in a child process, its address, a root stub, and the queue that fills it."""

    def __init__(self, ctx: mp.context.BaseContext, quiet: bool) -> None:
        self.home = tempfile.mkdtemp(prefix="llmasos-bench-")
        self.queue, self.fill = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=serve_kernel, args=(self.queue, self.home, self.fill,
                                                           quiet))
        self.proc.start()

    def connect(self) -> None:
        address = self.queue.get(timeout=300)
        with open(os.path.join(self.home, "root.token")) as f:
            self.md = [("authorization", f"Bearer {f.read().strip()}")]
        self.calls = calls_on(kernel_pb2_grpc.KernelStub(grpc.insecure_channel(address)),
                              self.md)

    def grow_to(self, n: int, now: int) -> None:
        self.fill.put(n - now)
        assert self.queue.get(timeout=120) == n

    def stop(self) -> None:
        self.fill.put(None)
        self.proc.join(60)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=500)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    q_echo = ctx.Queue()
    echo = ctx.Process(target=serve_echo, args=(q_echo,), daemon=True)
    echo.start()
    kern, quiet = KernelChild(ctx, quiet=False), KernelChild(ctx, quiet=True)
    echo_addr = q_echo.get(timeout=60)
    kern.connect()
    quiet.connect()
    echo_call = grpc.insecure_channel(echo_addr).unary_unary(ECHO)
    payload = kernel_pb2.WhoAmIRequest().SerializeToString()
    results: dict[str, dict[str, float]] = {}
    results["echo"] = measure(lambda: echo_call(payload, metadata=kern.md, timeout=10),
                              args.calls)
    kern.grow_to(10, 0)
    quiet.grow_to(10, 0)
    for name in kern.calls:   # logging on, then off, call by call: noise hits both alike
        results[f"{name}_10"] = measure(kern.calls[name], args.calls)
        results[f"{name}_10_quiet"] = measure(quiet.calls[name], args.calls)
    quiet.stop()
    kern.grow_to(10_000, 10)
    for name, fn in kern.calls.items():
        reps = args.calls if name != "ps" else max(20, args.calls // 10)
        results[f"{name}_10000"] = measure(fn, reps)
    with open(os.path.join(kern.home, "llmosd.log")) as f:
        log_lines = sum(1 for _ in f)
    kern.stop()
    echo.kill()
    floor = results["echo"]["p50_ms"]
    print(f"{'call':<18}{'p50 ms':>10}{'p99 ms':>10}{'x echo':>10}")
    for name, r in results.items():
        print(f"{name:<18}{r['p50_ms']:>10.3f}{r['p99_ms']:>10.3f}{r['p50_ms'] / floor:>10.2f}")
    worst = max(results[f"{c}_10"]["p50_ms"] for c in kern.calls) / floor
    cost = {c: results[f"{c}_10"]["p50_ms"] - results[f"{c}_10_quiet"]["p50_ms"]
            for c in kern.calls}
    print(f"logging (one JSON line per syscall, {log_lines} lines written): "
          + ", ".join(f"{c} {1000 * v:+.0f} us" for c, v in cost.items()) + " at p50")
    summary = {f"{k}_{m}": round(v, 4) for k, r in results.items() for m, v in r.items()}
    summary |= {"p50_ratio_vs_echo": round(worst, 3),
                "ps_10000_ms": round(results["ps_10000"]["p50_ms"], 3),
                "logging": "default (INFO, JSON lines to a file)",
                "logging_cost_p50_us": {c: round(1000 * v, 1) for c, v in cost.items()},
                "log_lines": log_lines}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
