"""A renewable plan: while only time changes, the scheduler's last plan stands.

In steady decoding every step asks the scheduler the same question (the same jobs, one token
each, all fitting) and gets the same answer. A plan the scheduler marks renewable
(StepPlan.renewable: every job with all its pending tokens, no preemption, a stateless policy)
is run again by the kernel without the Plan RPC for as long as the rules below hold; anything
else (a new job, a prompt chunk, blocks short, quotas) asks the scheduler again. A job that
left the plan (ended, stopped, preempted) leaves the rest of it standing: fewer jobs only free
budget and blocks.
"""

from __future__ import annotations

from llmasos.proto import scheduler_pb2


def granted(plan: scheduler_pb2.StepPlan) -> tuple[int, ...] | None:
    """The lease a plan gives: its jobs in the scheduler's order, or None."""
    return tuple(s.pid for s in plan.slots) if plan.renewable else None


def renew(lease: tuple[int, ...] | None,
          request: scheduler_pb2.PlanRequest) -> scheduler_pb2.StepPlan | None:
    """The leased plan for this request, one token for each of its jobs in the lease's order;
    None when the scheduler must be asked."""
    if lease is None or request.user_block_limit or len(request.jobs) > request.max_batch or \
            len(request.jobs) > request.token_budget:
        return None
    leased, need = set(lease), 0
    for job in request.jobs:
        if job.pid not in leased or job.pending_tokens != 1 or not job.resident or \
                not job.HasField("need_blocks"):
            return None
        need += job.need_blocks
    if need > request.free_blocks:
        return None
    running = {job.pid for job in request.jobs}
    return scheduler_pb2.StepPlan(slots=[scheduler_pb2.PlanSlot(pid=pid, num_tokens=1)
                                         for pid in lease if pid in running])
