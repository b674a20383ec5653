"""What durable mailboxes cost: a send + receive pair through the Mailboxes core with its sqlite
store in WAL mode (synchronous NORMAL, the default: survives kill -9), with FULL (also survives
power loss: an fsync per change), and sqlite in memory (no durability, the floor), side by
side; then the same pair over gRPC to a real IPC service process (durable store) beside a gRPC
health check on the same channel (the RPC floor).

    .venv/bin/python bench/mailbox.py [--pairs 2000]

Ends with one JSON line: pairs/s of each store, "durable_vs_memory" (WAL NORMAL / memory),
"full_vs_normal", and the gRPC pair's p50 against two health-check round trips.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmasos.kernel.supervisor import secret_channel
from llmasos.proto import ipc_pb2, ipc_pb2_grpc
from llmasos.services.ipc.mailboxes import Caller, Mailboxes
from llmasos.services.ipc.store import MEMORY, Store

PAYLOAD = b"x" * 200          # a short agent message
ALICE = Caller("alice")


def core_pairs_per_s(store: Store, pairs: int) -> float:
    mb = Mailboxes(store=store)
    mb.create("q", caller=ALICE)
    start = time.perf_counter()
    for _ in range(pairs):
        mb.send("q", PAYLOAD, "alice", caller=ALICE)
        mb.receive("q", caller=ALICE)
    return pairs / (time.perf_counter() - start)


def start_ipc(state_dir: str) -> tuple[subprocess.Popen, str, str]:
    """The IPC service as llmosd starts it: the per-boot secret on a pipe (a service answers
    only its kernel); (process, address, secret)."""
    secret = secrets.token_hex(32)
    read_fd, write_fd = os.pipe()
    os.write(write_fd, secret.encode() + b"\n")
    os.close(write_fd)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "llmasos.services.ipc", "--listen",
                                 "127.0.0.1:0", "--state-dir", state_dir,
                                 "--secret-fd", str(read_fd)], pass_fds=(read_fd,),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    finally:
        os.close(read_fd)
    address = proc.stdout.readline().strip()
    if not address:
        proc.wait(timeout=20)
        raise SystemExit(f"the IPC service exited ({proc.returncode}) before it listened")
    return proc, address, secret


def grpc_p50_ms(address: str, secret: str, pairs: int) -> tuple[float, float]:
    """p50 of (send + receive) and of (two health checks), interleaved, in ms."""
    with secret_channel(address, secret) as ch:
        ipc, health = ipc_pb2_grpc.IpcStub(ch), health_pb2_grpc.HealthStub(ch)
        caller = ipc_pb2.Caller(user="alice")
        ipc.CreateMailbox(ipc_pb2.CreateMailboxRequest(name="q", caller=caller), timeout=10)
        send = ipc_pb2.SendRequest(name="q", payload=PAYLOAD, sender="alice", caller=caller)
        recv = ipc_pb2.ReceiveRequest(name="q", caller=caller)
        check = health_pb2.HealthCheckRequest()
        pair, floor = [], []
        for _ in range(pairs):
            t0 = time.perf_counter()
            ipc.Send(send, timeout=10)
            ipc.Receive(recv, timeout=10)
            t1 = time.perf_counter()
            health.Check(check, timeout=10)
            health.Check(check, timeout=10)
            t2 = time.perf_counter()
            pair.append(t1 - t0)
            floor.append(t2 - t1)
    return statistics.median(pair) * 1000, statistics.median(floor) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        memory = core_pairs_per_s(Store(MEMORY), args.pairs)
        normal = core_pairs_per_s(Store(str(Path(tmp) / "normal.db")), args.pairs)
        full = core_pairs_per_s(Store(str(Path(tmp) / "full.db"), sync="full"),
                                max(50, args.pairs // 20))
        proc, address, secret = start_ipc(tmp)
        try:
            pair_ms, floor_ms = grpc_p50_ms(address, secret, min(args.pairs, 1000))
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    print(f"{'store':<24}{'send+recv/s':>12}")
    for name, rate in [("sqlite :memory: (floor)", memory), ("sqlite WAL NORMAL", normal),
                       ("sqlite WAL FULL", full)]:
        print(f"{name:<24}{rate:>12.0f}")
    print(f"over gRPC to the IPC service: send+recv p50 {pair_ms:.3f} ms, "
          f"two health checks p50 {floor_ms:.3f} ms")
    print(json.dumps({"memory_pairs_per_s": round(memory), "normal_pairs_per_s": round(normal),
                      "full_pairs_per_s": round(full),
                      "durable_vs_memory": round(normal / memory, 3),
                      "full_vs_normal": round(full / normal, 4),
                      "grpc_pair_p50_ms": round(pair_ms, 3),
                      "grpc_floor_p50_ms": round(floor_ms, 3),
                      "grpc_pair_vs_floor": round(pair_ms / floor_ms, 3)}))


if __name__ == "__main__":
    main()
