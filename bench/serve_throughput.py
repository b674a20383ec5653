"""Serving throughput: 64 requests (prompts of 8–96 words, outputs of 16–96 tokens, greedy, fixed
seed) through the whole system over gRPC, beside (a) HF transformers' `generate` at its best
static batch (16, 32 or 64; it pads prompts and runs each batch to its longest output) and (b)
the same kernel cores composed in one process (no gRPC, no service processes), all in one run.

    .venv/bin/python bench/serve_throughput.py [--requests 64] [--skip-hf]

Every request asks for exactly its output length (ignore_eos), so each side makes the same
useful tokens. Ends with one JSON line: tokens/s of each, "ratio_vs_hf", "ratio_vs_in_process",
p50/p99 time to first token and inter-token latency of the gRPC system.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import Request, boot, embedded_gguf, requests  # noqa: E402

from llmasos.proto import common_pb2, kernel_pb2, kernel_pb2_grpc  # noqa: E402

MODEL = "smollm2-135m"


def sampling(r: Request) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, max_tokens=r.output_tokens,
                                     ignore_eos=True)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


# --- the whole system over gRPC -----------------------------------------------------------

def run_system(reqs: list[Request], home: Path) -> dict[str, float]:
    booted = boot(home)
    stub = kernel_pb2_grpc.KernelStub(grpc.insecure_channel(booted.address))
    md = booted.metadata
    ttft, itl, tokens = [], [], []
    lock = threading.Lock()

    def one(r: Request) -> None:
        t0 = time.perf_counter()
        pid = stub.Spawn(kernel_pb2.SpawnRequest(model=MODEL, prompt=r.prompt,
                                                 sampling=sampling(r)), metadata=md).pid
        last, first, n = None, None, 0
        for chunk in stub.Read(kernel_pb2.ReadRequest(pid=pid), metadata=md, timeout=3600):
            now = time.perf_counter()
            if chunk.token_ids:
                if first is None:
                    first = now
                elif last is not None:
                    gaps = [(now - last) / len(chunk.token_ids)] * len(chunk.token_ids)
                    with lock:
                        itl.extend(gaps)
                last, n = now, n + len(chunk.token_ids)
        stub.Wait(kernel_pb2.WaitRequest(pid=pid), metadata=md, timeout=60)
        with lock:
            ttft.append(first - t0)
            tokens.append(n)

    threads = [threading.Thread(target=one, args=(r,)) for r in reqs]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    booted.stop()
    assert sum(tokens) == sum(r.output_tokens for r in reqs), "every request must finish"
    return {"tok_s": sum(tokens) / elapsed, "seconds": elapsed,
            "ttft_p50_ms": pct(ttft, 0.5) * 1000, "ttft_p99_ms": pct(ttft, 0.99) * 1000,
            "itl_p50_ms": pct(itl, 0.5) * 1000, "itl_p99_ms": pct(itl, 0.99) * 1000}


# --- the same cores in one process --------------------------------------------------------

class Local:
    """A stub that calls a servicer's methods directly: same messages, no network."""

    def __init__(self, servicer: object) -> None:
        self.servicer = servicer

    def __getattr__(self, name: str) -> object:
        method = getattr(self.servicer, name)
        return lambda request, timeout=None, metadata=None: method(request, None)


def run_in_process(reqs: list[Request], home: Path) -> dict[str, float]:
    import logging

    from llmasos.kernel import log
    from llmasos.kernel.config import Config
    from llmasos.kernel.executor import Executor
    from llmasos.kernel.kernel import Deployed, Kernel
    from llmasos.kernel.proctable import State
    from llmasos.proto import inference_pb2, scheduler_pb2
    from llmasos.services.inference.engine import Engine
    from llmasos.services.inference.servicer import InferenceServicer
    from llmasos.services.scheduler.servicer import SchedulerServicer

    class InProcessKernel(Kernel):
        def inference(self) -> Local:
            return inference

        def scheduler(self) -> Local:
            return scheduler

    log.configure(logging.WARNING)   # the in-process kernel would log every job to our terminal
    inference = Local(InferenceServicer(Engine(str(home), kv_budget_bytes=256 << 20)))
    scheduler = Local(SchedulerServicer("fcfs"))
    assert scheduler.Policy(scheduler_pb2.PolicyRequest()).policy == "fcfs"
    k = InProcessKernel(Config(home=str(home)))
    info = inference.LoadModel(inference_pb2.LoadModelRequest(name=MODEL, path=embedded_gguf()))
    k.models[MODEL] = Deployed(info, info.source, "")
    k.attach_pager(MODEL, inference)
    k.executor = Executor(k)
    k.executor.start()
    start = time.perf_counter()
    procs = []
    for r in reqs:
        ids = inference.Tokenize(inference_pb2.TokenizeRequest(model=MODEL, text=r.prompt))
        procs.append(k.table.spawn(user="root", uid=0, ppid=0, model=MODEL, nice=0,
                                   prompt_ids=list(ids.token_ids), sampling=sampling(r),
                                   max_tokens=r.output_tokens,
                                   context_length=ids.context_length))
    k.executor.wake()
    with k.table.changed:
        while any(p.state != State.ZOMBIE for p in procs):
            k.table.changed.wait(1.0)
    elapsed = time.perf_counter() - start
    k.executor.stop()
    tokens = sum(len(p.output_ids) for p in procs)
    assert tokens == sum(r.output_tokens for r in reqs)
    ttft = [p.first_token - p.created for p in procs]
    return {"tok_s": tokens / elapsed, "seconds": elapsed,
            "ttft_p50_ms": pct(ttft, 0.5) * 1000, "ttft_p99_ms": pct(ttft, 0.99) * 1000}


# --- HF transformers' generate with static batches ----------------------------------------

def run_hf(reqs: list[Request], batch: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_gguf()
    folder, name = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                 dtype=torch.float32).eval()
    useful = sum(r.output_tokens for r in reqs)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(reqs), batch):
            group = reqs[i:i + batch]
            longest = max(r.output_tokens for r in group)
            enc = tok([r.prompt for r in group], return_tensors="pt", padding=True)
            model.generate(**enc, max_new_tokens=longest, min_new_tokens=longest,
                           do_sample=False, pad_token_id=tok.pad_token_id)
    elapsed = time.perf_counter() - start
    return {"tok_s": useful / elapsed, "seconds": elapsed}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--skip-hf", action="store_true", help="only our two configurations")
    args = ap.parse_args()
    reqs = requests(args.requests, seed=0)
    home = Path(tempfile.mkdtemp(prefix="llmasos-serve-"))
    print(f"{len(reqs)} requests, {sum(r.output_tokens for r in reqs)} output tokens", flush=True)
    system = run_system(reqs, home / "system")
    print(f"gRPC system:  {system['tok_s']:.1f} tok/s", flush=True)
    (home / "inproc" / "cache").parent.mkdir(parents=True, exist_ok=True)
    os.symlink(home / "system" / "cache", home / "inproc" / "cache")
    inproc = run_in_process(reqs, home / "inproc")
    print(f"in-process:   {inproc['tok_s']:.1f} tok/s", flush=True)
    result = {f"system_{k}": round(v, 3) for k, v in system.items()}
    result |= {f"in_process_{k}": round(v, 3) for k, v in inproc.items()}
    result["ratio_vs_in_process"] = round(system["tok_s"] / inproc["tok_s"], 3)
    if not args.skip_hf:
        hf = {b: run_hf(reqs, b) for b in (16, 32, 64) if b <= len(reqs)}
        for b, r in hf.items():
            print(f"HF batch {b:>2}:  {r['tok_s']:.1f} tok/s", flush=True)
            result[f"hf_b{b}_tok_s"] = round(r["tok_s"], 3)
        best = max(hf, key=lambda b: hf[b]["tok_s"])
        result |= {"hf_best_batch": best, "hf_tok_s": round(hf[best]["tok_s"], 3),
                   "ratio_vs_hf": round(system["tok_s"] / hf[best]["tok_s"], 3)}
    result["peak_rss_mb"] = round(psutil.Process().memory_info().rss / 2**20, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
