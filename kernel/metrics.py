"""The kernel's Prometheus metrics, named as vLLM names them (vllm:X -> llmasos:X) so that
existing dashboards map one to one; the HTTP gateway serves them at /metrics through the
Metrics syscall (the gateway holds no state, the kernel keeps the counters).

Two kinds:
- event metrics, moved by hooks the step loop calls (on_step, on_exit, on_preempt, on_swap,
  on_prefix); they live in REGISTRY for the life of the process;
- state metrics, computed at scrape time from the process table, the pagers and the
  supervisor (jobs by state, KV blocks, service states and restarts).

Every series carries model_name (services: service) as vLLM's carry model_name.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

P = "llmasos:"
M = ["model_name"]
REGISTRY = CollectorRegistry(auto_describe=True)

# vLLM's buckets, so that histograms line up on the same dashboards.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 512)


def _c(name: str, doc: str, labels: list[str] = M) -> Counter:  # noqa: B006
    return Counter(P + name, doc, labels, registry=REGISTRY)


def _h(name: str, doc: str, buckets: tuple) -> Histogram:
    return Histogram(P + name, doc, M, buckets=buckets, registry=REGISTRY)


#      vLLM counterpart                 what
PROMPT_TOKENS = _c("prompt_tokens", "Prefill tokens computed (prefix-cache hits excluded).")
GENERATION_TOKENS = _c("generation_tokens", "Tokens generated.")
REQUEST_SUCCESS = _c("request_success", "Jobs ended, by finish reason.",
                     M + ["finished_reason"])
PLANS_RENEWED = _c("plans_renewed", "Steps run on the scheduler's last plan, renewed without a "
                   "Plan call (kernel/plan_lease.py; llmasos only).")
PREEMPTIONS = _c("num_preemptions", "Jobs preempted (KV freed or swapped to make room).")
SWAPS = _c("num_swaps", "KV swaps between the pool and host memory (llmasos only).",
           M + ["direction"])
SWAPPED_BLOCKS = _c("swapped_blocks", "KV blocks moved by swaps (llmasos only).",
                    M + ["direction"])
PREFIX_QUERIES = _c("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
PREFIX_HITS = _c("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
TTFT = _h("time_to_first_token_seconds", "Spawn to first generated token.", TTFT_BUCKETS)
ITL = _h("inter_token_latency_seconds", "Time between a job's consecutive tokens.", ITL_BUCKETS)
TPOT = _h("time_per_output_token_seconds", "A job's decode time per output token.",
          ITL_BUCKETS)
E2E = _h("e2e_request_latency_seconds", "Spawn to exit.", REQUEST_BUCKETS)
QUEUE = _h("request_queue_time_seconds", "Spawn to first scheduled step.", REQUEST_BUCKETS)
REQ_PROMPT = _h("request_prompt_tokens", "Prompt tokens per job.", TOKEN_BUCKETS)
REQ_GEN = _h("request_generation_tokens", "Generated tokens per job.", TOKEN_BUCKETS)
ITERATION_TOKENS = _h("iteration_tokens_total", "Tokens computed per step.", TOKEN_BUCKETS)
STEP_TIME = _h("step_duration_seconds", "Wall time of one step (llmasos only).", ITL_BUCKETS)
STEP_GAP = _h("step_gap_seconds", "Time the inference service waited between one step's answer "
              "and the next step's launch: the kernel's cost on the critical path (llmasos "
              "only).", (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0))
ENGINE_TIME = _h("step_compute_seconds", "The forward and sampling of one step, as the "
                 "inference service timed it (llmasos only).", ITL_BUCKETS)
BATCH = _h("batch_size", "Jobs in one step (llmasos only).", BATCH_BUCKETS)
IN_FLIGHT = _h("steps_in_flight", "Steps of the model in flight when one is launched, it "
               "included: above 1 for replicas and for a pp model's slots (llmasos only).",
               (1, 2, 3, 4, 6, 8, 16))
STARTED = Gauge(P + "kernel_start_time_seconds", "When llmosd started.", registry=REGISTRY)
STARTED.set_to_current_time()

FINISH = {1: "stop", 2: "length", 3: "abort", 4: "error", 5: "abort"}   # ExitReason → label
_last_token: dict[int, float] = {}   # pid → when it last got a token (inter-token latency)
_last_lock = threading.Lock()
_prefix: dict[str, list[int]] = {}   # model → [queried, hit] tokens, for the hit rate


# --- hooks (the step loop calls these) -----------------------------------------------------

def on_step(model: str, seconds: float, batch: int, prompt_tokens: int,
            generation_tokens: int, pids_with_token: Iterable[int] = ()) -> None:
    """After a step's commit: its wall time, its batch, the tokens it computed, and the jobs
    that received a token (their inter-token latency)."""
    STEP_TIME.labels(model).observe(seconds)
    BATCH.labels(model).observe(batch)
    ITERATION_TOKENS.labels(model).observe(prompt_tokens + generation_tokens)
    if prompt_tokens:
        PROMPT_TOKENS.labels(model).inc(prompt_tokens)
    if generation_tokens:
        GENERATION_TOKENS.labels(model).inc(generation_tokens)
    now, itl = time.monotonic(), ITL.labels(model)
    with _last_lock:
        for pid in pids_with_token:
            last = _last_token.get(pid)
            if last is not None:
                itl.observe(now - last)
            _last_token[pid] = now


def on_exit(proc: Any) -> None:
    """When a job becomes a zombie (any reason): its latencies and sizes."""
    model = proc.model
    with _last_lock:
        _last_token.pop(proc.pid, None)
    REQUEST_SUCCESS.labels(model, FINISH.get(int(proc.exit_reason), "abort")).inc()
    end = proc.ended or time.time()
    E2E.labels(model).observe(max(0.0, end - proc.created))
    if proc.started:
        QUEUE.labels(model).observe(max(0.0, proc.started - proc.created))
    if proc.first_token:
        TTFT.labels(model).observe(max(0.0, proc.first_token - proc.created))
        if len(proc.output_ids) > 1:
            TPOT.labels(model).observe(max(0.0, end - proc.first_token)
                                       / (len(proc.output_ids) - 1))
    REQ_PROMPT.labels(model).observe(len(proc.prompt_ids))
    REQ_GEN.labels(model).observe(len(proc.output_ids))


def on_renewed(model: str) -> None:
    PLANS_RENEWED.labels(model).inc()


def on_gap(model: str, seconds: float) -> None:
    STEP_GAP.labels(model).observe(seconds)


def on_launch(model: str, in_flight: int) -> None:
    IN_FLIGHT.labels(model).observe(in_flight)


def on_compute(model: str, seconds: float) -> None:
    ENGINE_TIME.labels(model).observe(seconds)


def on_preempt(model: str) -> None:
    PREEMPTIONS.labels(model).inc()


def on_swap(model: str, direction: str, blocks: int) -> None:
    """direction is "out" (pool → host) or "in" (host → pool)."""
    SWAPS.labels(model, direction).inc()
    SWAPPED_BLOCKS.labels(model, direction).inc(blocks)


def on_prefix(model: str, queried_tokens: int, hit_tokens: int) -> None:
    """At admission: the prompt tokens looked up, and those the prefix cache already held."""
    PREFIX_QUERIES.labels(model).inc(queried_tokens)
    PREFIX_HITS.labels(model).inc(hit_tokens)
    with _last_lock:
        seen = _prefix.setdefault(model, [0, 0])
        seen[0] += queried_tokens
        seen[1] += hit_tokens


# --- state read at scrape time -------------------------------------------------------------

STATES = ("NEW", "READY", "RUNNING", "BLOCKED", "STOPPED", "ZOMBIE")
SERVICE_STATES = ("STARTING", "HEALTHY", "UNHEALTHY", "RESTARTING", "FAILED", "STOPPED")


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(P + name, doc, labels=labels)


def jobs(k: Any) -> Iterator[Metric]:
    """Jobs by state, per model; vLLM's running (READY or RUNNING) and waiting (NEW, BLOCKED)."""
    counts: dict[tuple[str, str], int] = {}
    with k.table.lock:
        for p in k.table.procs.values():
            key = (p.model, p.state.name)
            counts[key] = counts.get(key, 0) + 1
    models = sorted(set(k.models) | {m for m, _ in counts})
    by_state = _gauge("jobs", "Jobs in the process table, by state (llmasos only).",
                      ["model_name", "state"])
    running = _gauge("num_requests_running", "Jobs admitted to steps (READY or RUNNING).", M)
    waiting = _gauge("num_requests_waiting", "Jobs waiting (NEW, or BLOCKED on memory).", M)
    swapped = _gauge("num_requests_swapped", "Jobs stopped (their KV may be swapped out).", M)
    for m in models:
        n = {s: counts.get((m, s), 0) for s in STATES}
        for s in STATES:
            by_state.add_metric([m, s], n[s])
        running.add_metric([m], n["READY"] + n["RUNNING"])
        waiting.add_metric([m], n["NEW"] + n["BLOCKED"])
        swapped.add_metric([m], n["STOPPED"])
    yield from (by_state, running, waiting, swapped)


def kv(k: Any) -> Iterator[Metric]:
    """KV blocks used/free/cached and the fraction used, per model's pool."""
    blocks = _gauge("kv_blocks", "KV blocks of the pool, by kind: used, free (cached "
                    "included), cached (free but holding a reusable prefix) (llmasos only).",
                    ["model_name", "kind"])
    usage = _gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (0 to 1).", M)
    rate = _gauge("prefix_cache_hit_rate", "Prefix-cache hits over queries, in tokens, since "
                  "boot (vLLM v0's gpu_prefix_cache_hit_rate).", M)
    with k.table.lock:
        pools = {name: pager.usage() for name, pager in list(k.pagers.items())}
    for name, u in sorted(pools.items()):
        used = u.total_blocks - u.free_blocks
        blocks.add_metric([name, "used"], used)
        blocks.add_metric([name, "free"], u.free_blocks)
        blocks.add_metric([name, "cached"], u.cached_blocks)
        usage.add_metric([name], used / u.total_blocks if u.total_blocks else 0.0)
        queried, hit = _prefix.get(name, (0, 0))
        rate.add_metric([name], hit / queried if queried else 0.0)
    yield from (blocks, usage, rate)


def services(k: Any) -> Iterator[Metric]:
    """Each supervised service's state (1 for the current one) and its restarts."""
    state = _gauge("service_state", "1 for the service's current state.", ["service", "state"])
    restarts = CounterMetricFamily(P + "service_restarts", "Restarts of the service.",
                                   labels=["service"])
    for svc in list(k.supervisor.services.values()):
        for s in SERVICE_STATES:
            state.add_metric([svc.spec.name, s], 1.0 if svc.state == s else 0.0)
        restarts.add_metric([svc.spec.name], svc.restarts)
    yield from (state, restarts)


class _Scrape:
    """REGISTRY's event metrics plus the kernel's state, as one registry for generate_latest."""

    def __init__(self, k: Any) -> None:
        self.k = k

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()
        yield from jobs(self.k)
        yield from kv(self.k)
        yield from services(self.k)


def exposition(k: Any) -> str:
    """The Prometheus text format of everything above."""
    return generate_latest(_Scrape(k)).decode()
