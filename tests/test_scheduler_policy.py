"""Scheduling policies in-process: budget, order, chunking, admission, preemption."""

from __future__ import annotations

from llmasos.proto import scheduler_pb2
from llmasos.services.scheduler.policy import plan


def job(pid: int, *, user: str = "u", nice: int = 0, arrival: float = 0.0, pending: int = 1,
        context: int = 0, blocks: int = 0, resident: bool = False,
        served: int = 0) -> scheduler_pb2.SchedJob:
    return scheduler_pb2.SchedJob(pid=pid, user=user, nice=nice, arrival=arrival or pid,
                                  pending_tokens=pending, context_tokens=context,
                                  blocks_held=blocks, resident=resident, served_tokens=served)


def request(jobs: list, free: int = 100, budget: int = 64, max_batch: int = 64) -> object:
    return scheduler_pb2.PlanRequest(jobs=jobs, free_blocks=free, block_size=16,
                                     token_budget=budget, max_batch=max_batch)


def test_fcfs_runs_decodes_first_then_chunks_long_prompt() -> None:
    jobs = [job(3, pending=100), job(1, pending=1, context=20, blocks=2, resident=True),
            job(2, pending=1, context=40, blocks=3, resident=True)]
    result = plan("fcfs", request(jobs, budget=50))
    assert result.slots == [(1, 1), (2, 1), (3, 48)]
    assert result.preempt == []


def test_admission_respects_free_blocks() -> None:
    jobs = [job(1, pending=64), job(2, pending=16)]
    result = plan("fcfs", request(jobs, free=4, budget=512))
    assert result.slots == [(1, 64)]   # job 2 would need a 5th block


def test_priority_orders_by_nice_and_preempts_lower_priority() -> None:
    jobs = [job(1, nice=10, pending=1, context=32, blocks=2, resident=True),
            job(2, nice=-5, pending=32)]
    result = plan("priority", request(jobs, free=0, budget=512))
    assert result.preempt == [1]
    assert result.slots == [(2, 32)]
    fcfs = plan("fcfs", request(jobs, free=1, budget=512))   # FCFS never preempts for arrivals
    assert fcfs.preempt == [] and fcfs.slots == [(1, 1)]


def test_fair_share_favours_the_least_served_user() -> None:
    jobs = [job(1, user="heavy", served=500), job(2, user="light", served=10)]
    result = plan("fair", request(jobs, budget=1))
    assert result.slots == [(2, 1)]


def test_max_batch_caps_jobs_per_step() -> None:
    jobs = [job(i, pending=1) for i in range(1, 11)]
    assert len(plan("fcfs", request(jobs, max_batch=4)).slots) == 4


def test_resident_job_that_cannot_grow_preempts_the_lowest_ranked() -> None:
    # Both hold full blocks and need one more; one block short: the newer one yields.
    jobs = [job(1, pending=1, context=32, blocks=2, resident=True),
            job(2, pending=1, context=32, blocks=2, resident=True)]
    result = plan("fcfs", request(jobs, free=1))
    assert result.slots == [(1, 1)] and result.preempt == [2]
    alone_ = plan("fcfs", request([job(1, pending=1, context=32, blocks=2, resident=True)],
                                  free=0))
    assert alone_.slots == [] and alone_.preempt == [1]   # yields its own blocks


def test_exact_need_from_the_pager_decides_admission() -> None:
    # a 64-token prompt whose first 48 tokens hit the prefix cache needs 1 block, not 4
    jobs = [job(1, pending=64), job(2, pending=64)]
    jobs[0].need_blocks, jobs[1].need_blocks = 1, 4
    result = plan("fcfs", request(jobs, free=2, budget=512))
    assert result.slots == [(1, 64)]


def test_copy_on_write_counts_in_a_resident_jobs_need() -> None:
    grow = job(1, pending=1, context=20, blocks=2, resident=True)   # fits its last block ...
    grow.need_blocks = 1                                            # ... but it is shared
    assert plan("fcfs", request([grow], free=0)).preempt == [1]
    assert plan("fcfs", request([grow], free=1)).slots == [(1, 1)]


def test_a_users_kv_quota_holds_back_its_new_jobs_only() -> None:
    jobs = [job(1, user="greedy", pending=1, context=64, blocks=4, resident=True),
            job(2, user="greedy", pending=64), job(3, user="other", pending=64)]
    jobs[1].need_blocks = jobs[2].need_blocks = 4
    req = request(jobs, free=100, budget=512)
    req.user_block_limit["greedy"] = 6
    assert [pid for pid, _ in plan("fcfs", req).slots] == [1, 3]


def test_fair_share_remembers_finished_jobs_through_decayed_usage() -> None:
    from llmasos.services.scheduler.usage import Usage
    usage = Usage(half_life=60.0, last=0.0)
    usage.charge("heavy", 10_000)   # served long jobs that have ended
    jobs = [job(1, user="heavy"), job(2, user="light")]
    first = plan("fair", request(jobs, budget=1), usage.decay(now=1.0))
    assert first.slots == [(2, 1)]
    forgotten = usage.decay(now=60.0 * 30)   # thirty half-lives later it is forgiven
    assert "heavy" not in forgotten
    assert plan("fair", request(jobs, budget=1), forgotten).slots == [(1, 1)]


def test_growing_past_a_kv_quota_preempts_the_owners_lowest_job() -> None:
    jobs = [job(1, user="q", pending=1, context=32, blocks=2, resident=True),
            job(2, user="q", pending=1, context=32, blocks=2, resident=True),
            job(3, user="other", pending=1, context=32, blocks=2, resident=True)]
    for j in jobs:
        j.need_blocks = 1
    req = request(jobs, free=100)
    req.user_block_limit["q"] = 5
    result = plan("fcfs", req)
    assert result.preempt == [2] and [pid for pid, _ in result.slots] == [1, 3]
