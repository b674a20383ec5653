"""Which plane a process's threads belong to, told to the Linux scheduler.

llmosd and the services that only decide (scheduler, security, IPC, the HTTP gateway, a node's
agent) run SCHED_BATCH: a wakeup of theirs does not preempt a running thread, they wait for
the next tick or a free core. The inference service (and its tensor/pipeline ranks) switches
back to SCHED_OTHER. So a syscall, a streamed token or a Plan arriving mid-step no longer
deschedules one of the forward's OpenMP threads, which would stall the other at the next
barrier. `bench/serve_throughput.py --policy-ab` measures it ("control_batch_vs_other").

The policy is per thread and inherited by the threads and processes a thread starts: each main
sets it on all of its threads (imports may have started some) before it starts its own. Leaving
SCHED_BATCH for SCHED_OTHER needs no privilege (the nice value stays as it was).
LLMASOS_CONTROL_POLICY=other keeps every process SCHED_OTHER. Elsewhere than Linux both calls
do nothing."""

from __future__ import annotations

import os

import structlog

POLICY_ENV = "LLMASOS_CONTROL_POLICY"   # "batch" (default) or "other"


def threads() -> list[int]:
    """This process's threads (Linux: /proc/self/task), or [0], the calling thread."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def _set(policy_name: str) -> bool:
    """Every thread of this process (imports may have started some) and, by inheritance, the
    threads and processes they start from now on."""
    policy = getattr(os, policy_name, None)
    if policy is None or not hasattr(os, "sched_setscheduler"):
        return False
    try:
        for tid in threads():
            try:
                os.sched_setscheduler(tid, policy, os.sched_param(0))
            except ProcessLookupError:
                continue   # ended since the listing
        return True
    except OSError as err:   # a container that forbids it: run on at the policy we have
        structlog.get_logger().warning("cpu_policy_unchanged", wanted=policy_name,
                                       error=str(err))
        return False


def control_plane() -> bool:
    """This process's threads, and every thread and process they start: SCHED_BATCH."""
    if os.environ.get(POLICY_ENV, "batch") == "other":
        return False
    return _set("SCHED_BATCH")


def data_plane() -> bool:
    """This process's threads, and what they start: SCHED_OTHER, whatever the parent ran."""
    return _set("SCHED_OTHER")
