"""Where a kernel restart's time goes: llmosd is killed (-9) under live greedy jobs with a Read
streaming, rebooted on the same home and address, and the reboot's log lines are laid on one
time line from the kill to the first token the resumed Read receives.

    .venv/bin/python bench/reboot.py [--reboots 3] [--jobs 8] [--tokens 48]

Milestones (seconds after the kill; median over the reboots):
    journal        llmosd replayed its journal (kernel_recovered)
    ipc, security, scheduler, inference
                   the supervisor has the service's address (its servicers are registered; the
                   inference service has loaded the embedded model)
    torch          the inference service has imported torch and its modules (loading_embedded)
    model          the inference service loaded the model (model_loaded; its seconds beside)
    ready          llmosd printed its ready line
    first_token    the resumed Read received its next token
The first boot converts the GGUF file into the weights cache (XDG cache) unless it is there.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import machine  # noqa: E402
from workload import Booted, boot  # noqa: E402

from llmasos.proto import common_pb2, kernel_pb2, kernel_pb2_grpc  # noqa: E402

MODEL = "smollm2-135m"
PROMPTS = ["The capital of France is", "Once upon a time,", "def fibonacci(n):",
           "The three primary colors are", "Water boils at", "My favourite book is",
           "In 1969, astronauts", "The quick brown fox"]
FLAGS = ("--no-http",)
# milestone -> (log event, the line's own test)
MILESTONES = {
    "journal": ("kernel_recovered", lambda e: True),
    "torch": ("loading_embedded", lambda e: True),
    "model": ("model_loaded", lambda e: True),
    "ipc": ("service_started", lambda e: e.get("service") == "ipc" and "incarnation" in e),
    "security": ("service_started",
                 lambda e: e.get("service") == "security" and "incarnation" in e),
    "scheduler": ("service_started",
                  lambda e: e.get("service") == "scheduler" and "incarnation" in e),
    "inference": ("service_started",
                  lambda e: e.get("service") == "inference" and "incarnation" in e),
    "ready": ("ready", lambda e: "address" in e),
}


def stub_of(system: Booted) -> tuple[grpc.Channel, kernel_pb2_grpc.KernelStub]:
    channel = grpc.insecure_channel(system.address)
    return channel, kernel_pb2_grpc.KernelStub(channel)


def start_jobs(system: Booted, jobs: int, tokens: int) -> tuple[list[int], list[int]]:
    """Spawn the jobs, read 3 tokens of the first; return (pids, tokens read)."""
    channel, stub = stub_of(system)
    md = system.metadata
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    pids = [stub.Spawn(kernel_pb2.SpawnRequest(model=MODEL, prompt=PROMPTS[i % len(PROMPTS)],
                                               sampling=sampling), metadata=md).pid
            for i in range(jobs)]
    got: list[int] = []
    for chunk in stub.Read(kernel_pb2.ReadRequest(pid=pids[0]), metadata=md, timeout=300):
        got += chunk.token_ids
        if len(got) >= 3:
            break
    channel.close()
    return pids, got


def first_token(system: Booted, pid: int, offset: int) -> float:
    """When the resumed Read's next token arrives (time.time())."""
    channel, stub = stub_of(system)
    try:
        for chunk in stub.Read(kernel_pb2.ReadRequest(pid=pid, offset=offset),
                               metadata=system.metadata, timeout=300, wait_for_ready=True):
            if chunk.token_ids:
                return time.time()
        raise RuntimeError(f"job {pid} ended without a token after offset {offset}")
    finally:
        channel.close()


def events_since(log: Path, t0: float) -> list[dict]:
    """The JSON log lines stamped after t0 (time.time())."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            e = json.loads(line)
            at = datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError):
            continue
        if at >= t0:
            out.append({**e, "at": at - t0})
    return out


def timeline(events: list[dict]) -> dict[str, float]:
    found: dict[str, float] = {}
    for name, (event, test) in MILESTONES.items():
        hits = [e["at"] for e in events if e.get("event") == event and test(e)]
        if hits:
            found[name] = min(hits)
    loads = [e.get("seconds", 0.0) for e in events if e.get("event") == "model_loaded"]
    if loads:
        found["model_load_s"] = loads[0]
    return found


def one_reboot(system: Booted, jobs: int, tokens: int) -> tuple[Booted, dict[str, float]]:
    pids, got = start_jobs(system, jobs, tokens)
    t0 = time.time()
    system.proc.send_signal(signal.SIGKILL)
    system.proc.wait()
    system = boot(system.home, *FLAGS, address=system.address)
    ready = time.time() - t0
    token = first_token(system, pids[0], len(got)) - t0
    line = timeline(events_since(system.home / "llmosd.log", t0))
    line.update(ready_wall=ready, first_token=token)
    channel, stub = stub_of(system)
    for pid in pids:   # let them end: the next round starts from a quiet table
        stub.Wait(kernel_pb2.WaitRequest(pid=pid), metadata=system.metadata, timeout=600)
    channel.close()
    return system, line


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reboots", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=8, help="live jobs at each kill")
    ap.add_argument("--tokens", type=int, default=48, help="tokens each job generates")
    args = ap.parse_args()
    print(machine(), flush=True)
    home = Path(tempfile.mkdtemp(prefix="llmasos-reboot-"))
    system = boot(home, *FLAGS)
    lines = []
    try:
        for i in range(args.reboots):
            system, line = one_reboot(system, args.jobs, args.tokens)
            lines.append(line)
            print(f"reboot {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(
                line.items(), key=lambda kv: kv[1] if kv[0] != "model_load_s" else -1)),
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        system.stop()
    keys = sorted({k for line in lines for k in line},
                  key=lambda k: statistics.median(x[k] for x in lines if k in x))
    median = {k: round(statistics.median(x[k] for x in lines if k in x), 2) for k in keys}
    print("median s after the kill:")
    for k, v in median.items():
        print(f"{k:>14}: {v:6.2f}")
    print(json.dumps({"reboots": len(lines), **{f"p50_{k}": v for k, v in median.items()},
                      "load": round(os.getloadavg()[0], 1)}))


if __name__ == "__main__":
    main()
