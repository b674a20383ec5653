"""Serving throughput: 64 requests (prompts of 8–96 words, outputs of 16–96 tokens, greedy, fixed
seed) through the whole system over gRPC, beside (a) HF transformers in every way a user would
serve it (bench/hf_baselines.py: `generate` in static batches of arrival order or sorted by
length, and HF's own continuous batching with a paged cache) and (b) the same kernel cores
composed in one process (no gRPC, no service processes), all in one run.

    .venv/bin/python bench/serve_throughput.py [--requests 64] [--rounds 2] [--hf-rounds N]
        [--skip-hf] [--skip-int8] [--skip-read]

The gRPC system and the in-process runner serve fp32 (`--quant none`, as HF does); a second
gRPC system serves the CPU's default int8 recipe (`--quant int8`), for "int8_vs_fp32". The
client streams every request's output as a front end does, over one Poll stream (one message a
step, as the HTTP gateway reads); a third system ("system_read", fp32) is streamed as one client
per request reads, a Read stream each, for "ratio_vs_in_process_read".

Every request asks for exactly its output length (EOS ignored), so each side makes the same
useful tokens. Every configuration first runs a short warm-up workload (an HF one that fails
gets one more try); then each round (seeds 0..R-1) runs the same workload through every
configuration in turn, so machine noise hits all alike: ours in an order rotated each round
(whichever ran first after HF's runs was slowed, and it used to be the gRPC system every time),
each warmed up again after HF's runs, then HF's. An HF configuration that stalls, crashes
or drops requests gets no figure: the JSON says so (status, tokens made of expected) and it is
left out of the comparison. Ends with one JSON
line: tokens/s of each, "ratio_vs_hf_best" against the fastest HF configuration that completed
all the work (named in "hf_best", over the rounds HF ran: `--hf-rounds` runs HF in the first N
only, as its runs take most of the time), "ratio_vs_in_process" over every round with the
paired ratio of each round beside it (on a shared 2-core VM one round moved ±5–8% from the
mean in two 8-round runs, so more rounds pin it), p50/p99 time to first token and
inter-token latency of the gRPC system, the CPU seconds each process of the system spent in
the rounds ("system_cpu_s": kernel, services, this client) beside the in-process runner's, and
the bench's own wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_baselines import CONFIGS, HFWorker, Outcome  # noqa: E402
from workload import Request, boot, cpu_features, embedded_gguf, requests  # noqa: E402

from llmasos.proto import common_pb2, kernel_pb2, kernel_pb2_grpc  # noqa: E402

MODEL = "smollm2-135m"
DEFAULT_HF = ("static_b32", "static_b64", "static_sorted_b16", "static_sorted_b32", "continuous")


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
    cpu: dict[str, float] = field(default_factory=dict)   # CPU seconds by process role


def role(p: psutil.Process) -> str:
    """A process's part in the run: the module it runs (python -m NAME), else its name."""
    cmd = p.cmdline()
    name = cmd[cmd.index("-m") + 1] if "-m" in cmd[:-1] else p.name()
    return name.removeprefix("llmasos.").removesuffix(".main").removesuffix(".__main__")


def cpu_s(p: psutil.Process | None = None) -> float:
    """User + system CPU seconds of p (this process when None)."""
    return sum((p or psutil.Process()).cpu_times()[:2])


def cpu_by_role(root: psutil.Process, client: str = "client") -> dict[str, float]:
    """CPU seconds of root and its descendants, summed by role, and of this process (the
    client) under `client`."""
    out: dict[str, float] = {client: cpu_s()}
    for p in [root, *root.children(recursive=True)]:
        try:
            name = role(p)
            out[name] = out.get(name, 0.0) + cpu_s(p)
        except psutil.Error:
            continue   # ended between the listing and the reading
    return out


def cpu_spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(v - before.get(k, 0.0), 3) for k, v in after.items()}


def step_costs(text: str) -> dict[str, float]:
    """Per step, from the kernel's metrics (Prometheus text): the forward (as the engine timed
    it), the rest of the Step round trip, and the gap the engine waited between steps (the
    kernel's work on the critical path; with the overlapped step, planning is off it); and the
    steps made, all rounds and the warm-up included."""
    from prometheus_client.parser import text_string_to_metric_families
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith(("_sum", "_count")) and "step_" in s.name:
                sums[s.name] = sums.get(s.name, 0.0) + s.value

    def mean(name: str) -> float:
        n = sums.get(f"llmasos:{name}_count", 0.0)
        return sums.get(f"llmasos:{name}_sum", 0.0) / n * 1000 if n else 0.0
    step, compute, gap = (mean("step_duration_seconds"), mean("step_compute_seconds"),
                          mean("step_gap_seconds"))
    return {"step_ms": round(step, 2), "forward_ms": round(compute, 2),
            "step_rpc_overhead_ms": round(step - compute, 2),
            "gap_between_steps_ms": round(gap, 3),
            "outside_forward_fraction": round((step - compute + gap) / (step + gap), 4)
            if step else 0.0, "steps": int(sums.get("llmasos:step_duration_seconds_count", 0))}


class SystemRunner:
    """A booted llmosd; each round sends every request at once and streams its output, either
    as a front end does (`poll`: one Poll stream follows every request, one message a step, as
    the HTTP gateway reads) or as one client per request does (`read`: a Read stream each).
    The client is one asyncio loop (grpc.aio), so it takes as little of the 2 cores as it can."""

    def __init__(self, home: Path, *flags: str, reader: str = "poll") -> None:
        self.booted = boot(home, *flags)
        self.reader = reader

    def run(self, reqs: list[Request]) -> Round:
        root = psutil.Process(self.booted.proc.pid)
        before = cpu_by_role(root)
        rounds = {"poll": self._polled, "read": self._read}
        out = asyncio.run(rounds[self.reader](reqs))
        out.cpu = cpu_spent(before, cpu_by_role(root))
        assert out.tokens == sum(r.output_tokens for r in reqs), "every request must finish"
        return out

    def step_costs(self) -> dict[str, float]:
        stub = kernel_pb2_grpc.KernelStub(grpc.insecure_channel(self.booted.address))
        return step_costs(stub.Metrics(kernel_pb2.MetricsRequest(),
                                       metadata=self.booted.metadata).text)

    async def _spawn(self, stub: kernel_pb2_grpc.KernelStub, r: Request) -> int:
        return (await stub.Spawn(kernel_pb2.SpawnRequest(
            model=MODEL, prompt=r.prompt, sampling=sampling(r)),
            metadata=self.booted.metadata)).pid

    async def _read(self, reqs: list[Request]) -> Round:
        md = self.booted.metadata
        out = Round(0, 0.0, [])
        async with grpc.aio.insecure_channel(self.booted.address) as channel:
            stub = kernel_pb2_grpc.KernelStub(channel)

            async def one(r: Request) -> None:
                t0 = time.perf_counter()
                pid = await self._spawn(stub, r)
                heard = Heard(t0)
                async for chunk in stub.Read(kernel_pb2.ReadRequest(pid=pid), metadata=md,
                                             timeout=3600):
                    heard.chunk(chunk, out)
                await stub.Wait(kernel_pb2.WaitRequest(pid=pid), metadata=md, timeout=60)
                out.ttft.append(heard.first - t0)

            start = time.perf_counter()
            await asyncio.gather(*(one(r) for r in reqs))
            out.seconds = time.perf_counter() - start
        return out

    async def _polled(self, reqs: list[Request]) -> Round:
        md = self.booted.metadata
        out = Round(0, 0.0, [])
        async with grpc.aio.insecure_channel(self.booted.address) as channel:
            stub = kernel_pb2_grpc.KernelStub(channel)
            poll = stub.Poll(metadata=md, timeout=3600)
            writing = asyncio.Lock()   # one write at a time on a stream
            heard: dict[int, Heard] = {}

            async def one(r: Request) -> None:
                t0 = time.perf_counter()
                pid = await self._spawn(stub, r)
                heard[pid] = Heard(t0)
                async with writing:
                    await poll.write(kernel_pb2.PollRequest(
                        follow=[kernel_pb2.ReadRequest(pid=pid)]))

            async def spawn_all() -> None:
                await asyncio.gather(*(one(r) for r in reqs))
                await poll.done_writing()

            start = time.perf_counter()
            spawning = asyncio.create_task(spawn_all())
            async for chunk in poll:
                for e in chunk.entries:
                    assert not e.error_code, e.error
                    heard[e.pid].chunk(e.chunk, out)
            await spawning
            await asyncio.gather(*(stub.Wait(kernel_pb2.WaitRequest(pid=pid), metadata=md,
                                             timeout=60) for pid in heard))
            out.seconds = time.perf_counter() - start
            out.ttft += [h.first - h.spawned for h in heard.values()]
        return out

    def stop(self) -> None:
        self.booted.stop()


@dataclass
class Heard:
    """One request's stream as the client hears it: first token and inter-token gaps."""

    spawned: float
    first: float = 0.0
    last: float = 0.0

    def chunk(self, chunk: kernel_pb2.ReadChunk, out: Round) -> None:
        if not chunk.token_ids:
            return
        now, k = time.perf_counter(), len(chunk.token_ids)
        if not self.first:
            self.first = now
        else:
            out.itl.extend([(now - self.last) / k] * k)
        self.last = now
        out.tokens += k


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

        log.configure("warning")   # it would log every job to our terminal
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
        before = cpu_s()
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
        cpu = {"in_process": round(cpu_s() - before, 3)}
        return Round(tokens, seconds, [p.first_token - wall for p in procs], cpu=cpu)  # t=0

    def step_costs(self) -> dict[str, float]:
        """The same figures from this process's metrics (the executor runs here)."""
        from prometheus_client import generate_latest

        from llmasos.kernel import metrics
        return step_costs(generate_latest(metrics.REGISTRY).decode())

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
    cpu: dict[str, float] = {}
    for r in rounds:
        for k, v in r.cpu.items():
            cpu[k] = cpu.get(k, 0.0) + v
    out["cpu_s"] = {k: round(v, 2) for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])}
    return out


# --- the run ------------------------------------------------------------------------------

WARMUP = dict(n=8, seed=1000, outputs=(4, 12))   # a short workload every configuration runs first


def hf_entry(name: str, outcomes: list[Outcome]) -> dict[str, object]:
    """tok/s over every round, or why there is no figure."""
    if all(o.ok for o in outcomes):
        seconds = sum(o.seconds for o in outcomes)
        return {"tok_s": round(sum(o.tokens for o in outcomes) / seconds, 3),
                "seconds": round(seconds, 2)}
    bad = next(o for o in outcomes if not o.ok)
    return {"status": bad.status, "tokens": bad.tokens, "expected": bad.expected,
            "round": len(outcomes) - 1, "after_s": round(bad.seconds, 1), "detail": bad.detail}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2,
                    help="workloads (seeds 0..R-1), each run by every configuration in turn")
    ap.add_argument("--hf-rounds", type=int, default=None,
                    help="run HF in the first N rounds only (default: every round)")
    ap.add_argument("--hf", default=",".join(DEFAULT_HF),
                    help=f"HF configurations, comma-separated, of: {', '.join(CONFIGS)}")
    ap.add_argument("--skip-hf", action="store_true", help="only our configurations")
    ap.add_argument("--skip-int8", action="store_true", help="no int8 system")
    ap.add_argument("--skip-read", action="store_true",
                    help="no fp32 system streamed with a Read per request")
    ap.add_argument("--hf-slack", type=float, default=10.0,
                    help="an HF run may take this many times the system's time for the round")
    args = ap.parse_args()
    t_start = time.perf_counter()
    hf_names = [] if args.skip_hf else [n for n in args.hf.split(",") if n]
    unknown = [n for n in hf_names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown HF configuration(s) {unknown}; pick from {list(CONFIGS)}")
    hf_names = [n for n in hf_names if CONFIGS[n].distinct(args.requests)]
    hf_rounds = args.rounds if args.hf_rounds is None else min(args.hf_rounds, args.rounds)
    home = Path(tempfile.mkdtemp(prefix="llmasos-serve-"))
    system = SystemRunner(home / "system", "--quant", "none")   # fp32, as HF and in_process
    (home / "inproc").mkdir()   # both read the converted weights from the XDG cache
    inproc = InProcessRunner(home / "inproc")
    hf = HFWorker()
    ours: dict[str, SystemRunner | InProcessRunner] = {"system": system, "in_process": inproc}
    if not args.skip_read:   # its own system: the same prompts again would hit the prefix cache
        ours["system_read"] = SystemRunner(home / "read", "--quant", "none", reader="read")
    if not args.skip_int8:
        ours["system_int8"] = SystemRunner(home / "int8", "--quant", "int8")
    rounds: dict[str, list[Round]] = {name: [] for name in ours}
    hf_out: dict[str, list[Outcome]] = {name: [] for name in hf_names}

    warm = requests(WARMUP["n"], seed=WARMUP["seed"], outputs=WARMUP["outputs"])
    for runner in ours.values():
        runner.run(warm)
    for name in hf_names:   # a warm-up that fails twice counts as the configuration's result
        for _ in range(2):   # once may be a fluke (HF's continuous batching crashed once so)
            o = hf.run(name, WARMUP["n"], -WARMUP["seed"], 300)
            print(f"warm-up HF {name:<18} {o.status} ({o.tokens}/{o.expected} tokens) "
                  f"{o.detail}", flush=True)
            if o.ok:
                break
        if not o.ok:
            hf_out[name].append(o)

    names = list(ours)
    for seed in range(args.rounds):
        reqs = requests(args.requests, seed=seed)
        if hf_names and 0 < seed <= hf_rounds:   # after HF's runs (memory, caches): warm again
            for runner in ours.values():
                runner.run(warm)
        for name in names[seed % len(names):] + names[:seed % len(names)]:   # none always first
            runner = ours[name]
            rounds[name].append(runner.run(reqs))
            r = rounds[name][-1]
            print(f"seed {seed} {name:<22} {r.tokens} tokens in {r.seconds:6.2f} s: "
                  f"{r.tokens / r.seconds:6.1f} tok/s; CPU s {r.cpu}", flush=True)
        allowed = max(300.0, args.hf_slack * rounds["system"][-1].seconds)
        for name in hf_names if seed < hf_rounds else []:
            if any(not o.ok for o in hf_out[name]):
                continue   # it already failed: no figure, no more time spent on it
            o = hf.run(name, args.requests, seed, allowed)
            hf_out[name].append(o)
            rate = f"{o.tokens / o.seconds:6.1f} tok/s" if o.ok else f"{o.status.upper()}"
            print(f"seed {seed} HF {name:<19} {o.tokens} of {o.expected} tokens in "
                  f"{o.seconds:6.2f} s: {rate} {o.detail}", flush=True)
    costs = system.step_costs()
    in_process_costs = inproc.step_costs()
    for runner in ours.values():
        runner.stop()
    hf.stop()

    result: dict[str, object] = {"requests": args.requests, "rounds": args.rounds,
                                 "cpu": cpu_features(), "cores": psutil.cpu_count()}
    for name, rs in rounds.items():
        result |= {f"{name}_{k}": v if isinstance(v, dict) else round(v, 3)
                   for k, v in summary(rs).items()}
    result["ratio_vs_in_process"] = round(result["system_tok_s"] / result["in_process_tok_s"], 3)
    result["ratio_vs_in_process_by_round"] = [
        round((s.tokens / s.seconds) / (i.tokens / i.seconds), 3)
        for s, i in zip(rounds["system"], rounds["in_process"], strict=True)]
    if "system_read" in rounds:
        result["ratio_vs_in_process_read"] = round(
            result["system_read_tok_s"] / result["in_process_tok_s"], 3)
    if "system_int8" in rounds:
        result["int8_vs_fp32"] = round(result["system_int8_tok_s"] / result["system_tok_s"], 3)
    result |= costs
    result |= {f"in_process_{k}": v for k, v in in_process_costs.items()}
    entries = {name: hf_entry(name, outs) for name, outs in hf_out.items()}
    result |= {f"hf_{name}": e for name, e in entries.items()}
    done = {name: e["tok_s"] for name, e in entries.items() if "tok_s" in e}
    if done:   # against the system's tok/s over the same rounds (the same work)
        best = max(done, key=done.get)
        same = summary(rounds["system"][:hf_rounds])["tok_s"]
        result |= {"hf_best": best, "hf_best_tok_s": done[best], "hf_rounds": hf_rounds,
                   "system_tok_s_in_hf_rounds": round(same, 3),
                   "ratio_vs_hf_best": round(same / done[best], 3)}
    result["hf_without_figure"] = sorted(set(entries) - set(done))
    result["peak_rss_mb"] = round(psutil.Process().memory_info().rss / 2**20, 1)
    result["bench_seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
