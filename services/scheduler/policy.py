"""Scheduling policies: which jobs run how many tokens in the next step.

One token budget per step (vLLM's), handed out in policy order; a prompt longer than what is
left of the budget is chunked. Under FCFS the jobs already holding KV are the oldest, so they
decode first. The policy only orders the jobs and decides preemption; the kernel executes it.

  fcfs      arrival order
  priority  nice value, then arrival; a waiting job may preempt a resident one of lower priority
  fair      the user with the least decayed service goes first, counting tokens given to
            finished jobs too (usage.py: CFS-like, with a half-life)

Every block count is the pager's exact need (SchedJob.need_blocks: admission net of prefix
hits, swap-in, growth plus copy-on-write); this is the only place preemption is decided. When a
resident job cannot grow, the resident jobs ranked below it are preempted, lowest first (vLLM's
preemption); if there are none, the job itself yields its blocks. A user's resident KV stays
within its quota (PlanRequest.user_block_limit): a job that would pass it waits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llmasos.proto import scheduler_pb2


@dataclass
class Plan:
    slots: list[tuple[int, int]]     # (pid, tokens)
    preempt: list[int]


Job = scheduler_pb2.SchedJob


def fcfs_key(job: Job, served: dict[str, int]) -> tuple:
    return (job.arrival, job.pid)


def priority_key(job: Job, served: dict[str, int]) -> tuple:
    return (job.nice, job.arrival, job.pid)


def fair_key(job: Job, served: dict[str, int]) -> tuple:
    return (served.get(job.user, 0), job.arrival, job.pid)


POLICIES: dict[str, Callable[[Job, dict[str, int]], tuple]] = {
    "fcfs": fcfs_key,
    "priority": priority_key,
    "fair": fair_key,
}


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


QUOTA_HEADROOM = 1   # a job admitted under a KV quota has a block to grow into (less thrash)


def need_blocks(job: Job, n: int, bs: int) -> int:
    """The pager's exact count when the kernel gave one, else an estimate from the job's sizes."""
    if job.HasField("need_blocks"):
        return job.need_blocks
    if job.resident:   # grows by the blocks its next tokens need
        return max(blocks_for(job.context_tokens + n, bs) - job.blocks_held, 0)
    return blocks_for(job.pending_tokens + job.context_tokens, bs)


def plan(policy: str, req: scheduler_pb2.PlanRequest,
         history: dict[str, float] | None = None) -> Plan:
    """history: decayed past service per user (fair policy); live jobs' tokens are added."""
    key = POLICIES[policy]
    served: dict[str, float] = dict(history or {})
    held: dict[str, int] = {}
    for job in req.jobs:
        live = 0 if history is not None else job.served_tokens   # history counts them already
        served[job.user] = served.get(job.user, 0) + live
        if job.resident:
            held[job.user] = held.get(job.user, 0) + job.blocks_held
    limits = req.user_block_limit
    order = sorted(req.jobs, key=lambda j: key(j, served))
    resident = [j for j in order if j.resident]
    budget, free, bs = req.token_budget, req.free_blocks, req.block_size
    slots: list[tuple[int, int]] = []
    preempt: list[int] = []
    for job in order:
        if budget <= 0 or len(slots) >= req.max_batch:
            break
        if job.pid in preempt:
            continue
        n = min(job.pending_tokens, budget)
        need = need_blocks(job, n, bs)
        over = job.user in limits and held.get(job.user, 0) + need > limits[job.user]
        if job.user in limits and not job.resident and \
                held.get(job.user, 0) + need + QUOTA_HEADROOM > limits[job.user]:
            continue       # waits: its owner's KV quota is full (with room to grow a little)
        if over:           # grows past its owner's quota: the owner's lowest job yields
            mine = [j for j in resident if j.user == job.user and j.pid != job.pid]
            short = held.get(job.user, 0) + need - limits[job.user]
            freed = _preempt_for(job, mine, short, preempt, slots, key, served)
            held[job.user] -= freed
            free += freed
            if held.get(job.user, 0) + need > limits[job.user] and mine:
                preempt.append(job.pid)   # it ranks lowest of its owner's jobs: it yields
                held[job.user] -= job.blocks_held
                free += job.blocks_held
                continue
        if need > free and (job.resident or policy == "priority"):
            free += _preempt_for(job, resident, need - free, preempt, slots, key, served)
        if need > free and job.resident:
            preempt.append(job.pid)   # nothing ranks below it: it yields its own blocks
            free += job.blocks_held
            continue
        if need > free:
            continue       # waits for blocks
        free -= need
        budget -= n
        held[job.user] = held.get(job.user, 0) + need
        slots.append((job.pid, n))
    return Plan(slots, preempt)


def _preempt_for(job: Job, resident: list[Job], short: int, preempt: list[int],
                 slots: list[tuple[int, int]], key: Callable, served: dict[str, int]) -> int:
    """Evict resident jobs that rank below `job`, lowest first, until `short` blocks are free."""
    freed = 0
    for victim in reversed(resident):
        if freed >= short or key(victim, served) <= key(job, served):
            break
        if victim.pid in preempt:
            continue
        preempt.append(victim.pid)
        slots[:] = [s for s in slots if s[0] != victim.pid]
        freed += victim.blocks_held
    return freed
