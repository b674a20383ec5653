"""IPC through the real daemon, each figure against its baseline in the same run:

 (a) pipe: an upstream job generates 128 tokens, a downstream job's prompt is that output plus a
     64-token instruction. Through a pipe (the downstream prefills while the upstream runs) vs
     the same two jobs one after the other (the baseline a user would write: Wait, then Spawn):
     end-to-end latency ratio (target <= 0.8).
 (b) shm: time to first token of a job attached to a 1,024-token named KV segment vs the same
     prefix sent as text to a cold cache (another user's, so the prefix cache cannot help):
     speedup (target >= 5).
 (c) shm: KV blocks held by 16 jobs attached to one segment vs 16 private copies of the prefix.

    .venv/bin/python bench/ipc.py [--rounds 3]

Greedy, ignore_eos so every run makes the same tokens; rounds alternate the two sides. Ends with
one JSON line: "pipe_latency_ratio", "shm_ttft_speedup", "shm_block_ratio" and the raw figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import boot, cpu_features  # noqa: E402

from llmasos.proto import common_pb2, kernel_pb2, kernel_pb2_grpc  # noqa: E402

MODEL = "smollm2-135m"
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while",
         "seven", "wizards", "quietly", "judge", "boxing", "matches", "near", "an", "old",
         "stone", "bridge")


def text_of(tokens: int, seed: int) -> str:
    """About `tokens` tokens of plain words (SmolLM2 spends ~1.2 tokens per word here)."""
    n = int(tokens / 1.2)
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(n))


def greedy(n: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


class Client:
    def __init__(self, address: str, token: str) -> None:
        self.stub = kernel_pb2_grpc.KernelStub(grpc.insecure_channel(address))
        self.md = [("authorization", f"Bearer {token}")]

    def __getattr__(self, name: str) -> object:
        call = getattr(self.stub, name)
        return lambda req, timeout=600: call(req, metadata=self.md, timeout=timeout)


def pipe_round(c: Client, seed: int, piped: bool) -> float:
    up_prompt = f"Write about {WORDS[seed % len(WORDS)]}:"
    instruction = "Now " + text_of(64, seed) + " {input}"
    t0 = time.perf_counter()
    up = c.Spawn(kernel_pb2.SpawnRequest(model=MODEL, prompt=up_prompt,
                                         sampling=greedy(128))).pid
    if piped:
        down = c.Spawn(kernel_pb2.SpawnRequest(model=MODEL, prompt=instruction,
                                               stdin_pid=up, sampling=greedy(16))).pid
        c.Wait(kernel_pb2.WaitRequest(pid=up))
    else:
        text = c.Wait(kernel_pb2.WaitRequest(pid=up)).text
        down = c.Spawn(kernel_pb2.SpawnRequest(model=MODEL, prompt=instruction.replace(
            "{input}", text), sampling=greedy(16))).pid
    c.Wait(kernel_pb2.WaitRequest(pid=down))
    return time.perf_counter() - t0


def ttft(c: Client, req: kernel_pb2.SpawnRequest) -> float:
    t0 = time.perf_counter()
    pid = c.Spawn(req).pid
    for chunk in c.stub.Read(kernel_pb2.ReadRequest(pid=pid), metadata=c.md, timeout=600):
        if chunk.token_ids:
            break
    elapsed = time.perf_counter() - t0
    c.Wait(kernel_pb2.WaitRequest(pid=pid))
    return elapsed


def blocks_used(c: Client) -> int:
    kv = c.Ps(kernel_pb2.PsRequest(all=True)).kv
    return kv.total_blocks - kv.free_blocks


def held_by_16(root: Client, clients: list[Client], shm: str, prefix: str) -> int:
    """KV blocks in use once 16 jobs (prefix + a short question each), one per user, are all
    resident. Without a segment each user computes its own copy: the prefix cache is per user."""
    jobs = [(c, c.Spawn(kernel_pb2.SpawnRequest(
        model=MODEL, prompt=("" if shm else prefix) + f"\nQuestion {i}:", shm=shm,
        sampling=greedy(60))).pid) for i, c in enumerate(clients)]
    pids = [pid for _, pid in jobs]
    while not all(p.generated_tokens for p in root.Ps(kernel_pb2.PsRequest(all=True)).processes
                  if p.pid in pids):
        time.sleep(0.01)
    used = blocks_used(root)
    for c, pid in jobs:
        c.Kill(kernel_pb2.KillRequest(pid=pid, signal=9))
        c.Wait(kernel_pb2.WaitRequest(pid=pid))
    return used


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="llmasos-bench-ipc-"))
    system = boot(home, "--kv-budget-mb", "1024")
    try:
        root = Client(system.address, (home / "root.token").read_text().strip())
        users = [subprocess.run([sys.executable, "-m", "llmasos.kernel.main", "adduser", f"u{i}",
                                 "--home", str(home)], capture_output=True, text=True,
                                check=True).stdout.split()[-1] for i in range(16 + args.rounds)]
        pipe_round(root, 99, True)   # warm-up, both paths
        pipe_round(root, 99, False)
        seq, piped = [], []
        for r in range(args.rounds):
            seq.append(pipe_round(root, r, False))
            piped.append(pipe_round(root, r, True))
        prefix = text_of(1024, 1)
        info = root.ShmCreate(kernel_pb2.ShmCreateRequest(
            name="bench", model=MODEL, text=prefix, mode=kernel_pb2.MBOX_MODE_ALL))
        question = "\nQuestion: what is this about?\nAnswer:"
        cold, attached = [], []
        for r in range(args.rounds):   # a fresh user each round: the prefix cache is cold
            user = Client(system.address, users[r])
            cold.append(ttft(user, kernel_pb2.SpawnRequest(
                model=MODEL, prompt=prefix + question, sampling=greedy(4))))
            attached.append(ttft(user, kernel_pb2.SpawnRequest(
                model=MODEL, prompt=question, shm="bench", sampling=greedy(4))))
        sixteen = [Client(system.address, t) for t in users[args.rounds:]]
        shared = held_by_16(root, sixteen, "bench", prefix)
        root.ShmRemove(kernel_pb2.ShmRemoveRequest(name="bench"))
        private = held_by_16(root, sixteen, "", prefix)
    finally:
        system.stop()
    out = {
        "cpu": cpu_features(),
        "pipe_sequential_s": statistics.median(seq), "pipe_piped_s": statistics.median(piped),
        "pipe_latency_ratio": statistics.median(piped) / statistics.median(seq),
        "shm_tokens": info.tokens, "shm_cold_ttft_ms": statistics.median(cold) * 1000,
        "shm_attached_ttft_ms": statistics.median(attached) * 1000,
        "shm_ttft_speedup": statistics.median(cold) / statistics.median(attached),
        "blocks_16_shared": shared, "blocks_16_private": private,
        "shm_block_ratio": shared / private,
    }
    for key, value in out.items():
        print(f"{key:>24}: {value:.3f}" if isinstance(value, float) else f"{key:>24}: {value}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
