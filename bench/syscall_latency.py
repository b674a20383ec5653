"""Syscall round-trip latency over loopback: WhoAmI, Stat and Ps against a real kernel (with its
real security, scheduler, ipc and inference services) holding 10 and then 10,000 processes,
beside a bare gRPC echo server measured in the same run (the floor).

    .venv/bin/python bench/syscall_latency.py [--calls 500]

Prints a table and ends with one JSON line: p50/p99 of each call, "p50_ratio_vs_echo" (the worst
of the three at 10 processes) and "ps_10000_ms" (p50 of Ps listing all 10,000).
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


def serve_kernel(queue: mp.Queue, home: str, fill: mp.Queue) -> None:
    """A kernel composed in this child process, so the bench can fill its table directly."""
    import logging

    from llmasos.kernel import log
    from llmasos.kernel.config import Config
    from llmasos.kernel.executor import Executor
    from llmasos.kernel.kernel import Kernel
    from llmasos.kernel.proctable import State
    from llmasos.kernel.server import build

    log.configure(logging.WARNING)   # per-call logging would measure the terminal, not us
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=500)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    home = tempfile.mkdtemp(prefix="llmasos-bench-")
    q_echo, q_kernel, fill = ctx.Queue(), ctx.Queue(), ctx.Queue()
    echo = ctx.Process(target=serve_echo, args=(q_echo,), daemon=True)
    kern = ctx.Process(target=serve_kernel, args=(q_kernel, home, fill))
    echo.start()
    kern.start()
    echo_addr, kernel_addr = q_echo.get(timeout=60), q_kernel.get(timeout=300)
    with open(os.path.join(home, "root.token")) as f:
        token = f.read().strip()
    md = [("authorization", f"Bearer {token}")]
    stub = kernel_pb2_grpc.KernelStub(grpc.insecure_channel(kernel_addr))
    echo_call = grpc.insecure_channel(echo_addr).unary_unary(ECHO)
    payload = kernel_pb2.WhoAmIRequest().SerializeToString()
    results: dict[str, object] = {}
    results["echo"] = measure(lambda: echo_call(payload, metadata=md, timeout=10), args.calls)
    for n in (10, 10_000):
        fill.put(n - (10 if n == 10_000 else 0))
        assert q_kernel.get(timeout=120) == n
        calls = {
            "whoami": lambda: stub.WhoAmI(kernel_pb2.WhoAmIRequest(), metadata=md, timeout=10),
            "stat": lambda: stub.Stat(kernel_pb2.StatRequest(pid=5), metadata=md, timeout=10),
            "ps": lambda: stub.Ps(kernel_pb2.PsRequest(all=True), metadata=md, timeout=30),
        }
        for name, fn in calls.items():
            reps = args.calls if name != "ps" or n == 10 else max(20, args.calls // 10)
            results[f"{name}_{n}"] = measure(fn, reps)
    fill.put(None)
    kern.join(60)
    echo.kill()
    floor = results["echo"]["p50_ms"]
    print(f"{'call':<14}{'p50 ms':>10}{'p99 ms':>10}{'x echo':>10}")
    for name, r in results.items():
        print(f"{name:<14}{r['p50_ms']:>10.3f}{r['p99_ms']:>10.3f}{r['p50_ms'] / floor:>10.2f}")
    worst = max(results[f"{c}_10"]["p50_ms"] for c in ("whoami", "stat", "ps")) / floor
    summary = {f"{k}_{m}": round(v, 4) for k, r in results.items() for m, v in r.items()}
    summary |= {"p50_ratio_vs_echo": round(worst, 3),
                "ps_10000_ms": round(results["ps_10000"]["p50_ms"], 3)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
