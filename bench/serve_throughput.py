"""Serving throughput: 64 requests (prompts of 8–96 words, outputs of 16–96 tokens, greedy, fixed
seed) through the whole system over gRPC, beside (a) HF transformers' `generate` at its best
static batch (16, 32 or 64; it pads prompts and runs each batch to its longest output) and (b)
the same kernel cores composed in one process (no gRPC, no service processes), all in one run.

    .venv/bin/python bench/serve_throughput.py [--requests 64] [--skip-hf]

Every request asks for exactly its output length (ignore_eos), so each side makes the same
useful tokens. Ours run --rounds workloads (seeds 0..R-1) interleaved, system then in-process,
so machine noise hits both alike; HF runs the seed-0 workload, compared with the system's
seed-0 round. Ends with one JSON line: tokens/s of each, "ratio_vs_hf", "ratio_vs_in_process",
p50/p99 time to first token and inter-token latency of the gRPC system.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
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

@dataclass
class Round:
    tokens: int
    seconds: float
    ttft: list[float]
    itl: list[float] = field(default_factory=list)


class SystemRunner:
    """A booted llmosd; each round sends every request at once and streams each with Read.
    The client is one asyncio loop (grpc.aio), so it takes as little of the 2 cores as it can."""

    def __init__(self, home: Path) -> None:
        self.booted = boot(home)

    def run(self, reqs: list[Request]) -> Round:
        return asyncio.run(self._run(reqs))

    async def _run(self, reqs: list[Request]) -> Round:
        md = self.booted.metadata
        out = Round(0, 0.0, [])
        async with grpc.aio.insecure_channel(self.booted.address) as channel:
            stub = kernel_pb2_grpc.KernelStub(channel)

            async def one(r: Request) -> None:
                t0 = time.perf_counter()
                pid = (await stub.Spawn(kernel_pb2.SpawnRequest(
                    model=MODEL, prompt=r.prompt, sampling=sampling(r)), metadata=md)).pid
                last, first, n = None, None, 0
                async for chunk in stub.Read(kernel_pb2.ReadRequest(pid=pid), metadata=md,
                                             timeout=3600):
                    now = time.perf_counter()
                    if chunk.token_ids:
                        if first is None:
                            first = now
                        elif last is not None:
                            k = len(chunk.token_ids)
                            out.itl.extend([(now - last) / k] * k)
                        last, n = now, n + len(chunk.token_ids)
                await stub.Wait(kernel_pb2.WaitRequest(pid=pid), metadata=md, timeout=60)
                out.ttft.append(first - t0)
                out.tokens += n

            start = time.perf_counter()
            await asyncio.gather(*(one(r) for r in reqs))
            out.seconds = time.perf_counter() - start
        assert out.tokens == sum(r.output_tokens for r in reqs), "every request must finish"
        return out

    def stop(self) -> None:
        self.booted.stop()


# --- the same cores in one process --------------------------------------------------------

class Local:
    """A stub that calls a servicer's methods directly: same messages, no network."""

    def __init__(self, servicer: object) -> None:
        self.servicer = servicer

    def __getattr__(self, name: str) -> object:
        method = getattr(self.servicer, name)
        return lambda request, timeout=None, metadata=None: method(request, None)


class InProcessRunner:
    """The kernel's executor, pager and process table with the scheduler and inference
    servicers called directly: the same cores as the system, without gRPC or processes."""

    def __init__(self, home: Path) -> None:
        import logging

        from llmasos.kernel import log
        from llmasos.kernel.config import Config
        from llmasos.kernel.executor import Executor
        from llmasos.kernel.kernel import Deployed, Kernel
        from llmasos.proto import inference_pb2
        from llmasos.services.inference.engine import Engine
        from llmasos.services.inference.servicer import InferenceServicer
        from llmasos.services.scheduler.servicer import SchedulerServicer

        inference = Local(InferenceServicer(Engine(str(home), kv_budget_bytes=256 << 20)))
        scheduler = Local(SchedulerServicer("fcfs"))

        class InProcessKernel(Kernel):
            def inference(self) -> Local:
                return inference

            def scheduler(self) -> Local:
                return scheduler

        log.configure(logging.WARNING)   # it would log every job to our terminal
        self.inference = inference
        self.k = InProcessKernel(Config(home=str(home)))
        info = inference.LoadModel(inference_pb2.LoadModelRequest(name=MODEL,
                                                                  path=embedded_gguf()))
        self.k.models[MODEL] = Deployed(info.source, "")
        self.k.attach_pager(MODEL, inference)
        self.k.executor = Executor(self.k)
        self.k.executor.start()

    def run(self, reqs: list[Request]) -> Round:
        from llmasos.kernel.proctable import State
        from llmasos.proto import inference_pb2

        start, wall = time.perf_counter(), time.time()
        procs = []
        for r in reqs:
            ids = self.inference.Tokenize(inference_pb2.TokenizeRequest(model=MODEL,
                                                                        text=r.prompt))
            procs.append(self.k.table.spawn(
                user="root", uid=0, ppid=0, model=MODEL, nice=0, prompt_ids=list(ids.token_ids),
                sampling=sampling(r), max_tokens=r.output_tokens,
                context_length=ids.context_length))
            self.k.executor.wake()
        with self.k.table.changed:
            while any(p.state != State.ZOMBIE for p in procs):
                self.k.table.changed.wait(1.0)
        seconds = time.perf_counter() - start
        tokens = sum(len(p.output_ids) for p in procs)
        assert tokens == sum(r.output_tokens for r in reqs)
        return Round(tokens, seconds, [p.first_token - wall for p in procs])   # all arrive at 0

    def stop(self) -> None:
        self.k.executor.stop()


def summary(rounds: list[Round]) -> dict[str, float]:
    ttft = [t for r in rounds for t in r.ttft]
    itl = [t for r in rounds for t in r.itl]
    out = {"tok_s": sum(r.tokens for r in rounds) / sum(r.seconds for r in rounds),
           "seconds": sum(r.seconds for r in rounds),
           "ttft_p50_ms": pct(ttft, 0.5) * 1000, "ttft_p99_ms": pct(ttft, 0.99) * 1000}
    if itl:
        out |= {"itl_p50_ms": pct(itl, 0.5) * 1000, "itl_p99_ms": pct(itl, 0.99) * 1000}
    return out


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
    ap.add_argument("--rounds", type=int, default=3,
                    help="workloads (seeds 0..R-1) run on both of ours, interleaved")
    ap.add_argument("--skip-hf", action="store_true", help="only our two configurations")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="llmasos-serve-"))
    system = SystemRunner(home / "system")
    (home / "inproc").mkdir()
    os.symlink(home / "system" / "cache", home / "inproc" / "cache")
    inproc = InProcessRunner(home / "inproc")
    rounds: dict[str, list[Round]] = {"system": [], "in_process": []}
    for seed in range(args.rounds):
        reqs = requests(args.requests, seed=seed)
        for name, runner in (("system", system), ("in_process", inproc)):
            rounds[name].append(runner.run(reqs))
            r = rounds[name][-1]
            print(f"seed {seed} {name:<11} {r.tokens} tokens in {r.seconds:.2f} s: "
                  f"{r.tokens / r.seconds:.1f} tok/s", flush=True)
    system.stop()
    inproc.stop()
    result: dict[str, object] = {"requests": args.requests, "rounds": args.rounds}
    for name, rs in rounds.items():
        result |= {f"{name}_{k}": round(v, 3) for k, v in summary(rs).items()}
    result["ratio_vs_in_process"] = round(result["system_tok_s"] / result["in_process_tok_s"], 3)
    if not args.skip_hf:
        reqs = requests(args.requests, seed=0)
        sys0 = rounds["system"][0]
        hf = {b: run_hf(reqs, b) for b in (16, 32, 64) if b <= len(reqs)}
        for b, r in hf.items():
            print(f"HF batch {b:>2} (seed 0): {r['tok_s']:.1f} tok/s", flush=True)
            result[f"hf_b{b}_tok_s"] = round(r["tok_s"], 3)
        best = max(hf, key=lambda b: hf[b]["tok_s"])
        result |= {"hf_best_batch": best, "hf_tok_s": round(hf[best]["tok_s"], 3),
                   "system_seed0_tok_s": round(sys0.tokens / sys0.seconds, 3),
                   "ratio_vs_hf": round(sys0.tokens / sys0.seconds / hf[best]["tok_s"], 3)}
    result["peak_rss_mb"] = round(psutil.Process().memory_info().rss / 2**20, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
