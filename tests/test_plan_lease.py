"""Renewable plans (kernel/plan_lease.py): which plans the scheduler grants as renewable, the
kernel's rules for running one again without asking, that every plan so renewed is the plan
the scheduler would have made, and that the step loop does renew them on a real llmosd."""

from __future__ import annotations

import random

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmasos.kernel.plan_lease import granted, renew
from llmasos.proto import kernel_pb2, scheduler_pb2
from llmasos.services.scheduler.policy import plan
from llmasos.services.scheduler.servicer import SchedulerServicer

from conftest import PROMPTS, System, spawn, wait


def job(pid: int, *, pending: int = 1, resident: bool = True, need: int = 0, nice: int = 0,
        user: str = "u") -> scheduler_pb2.SchedJob:
    return scheduler_pb2.SchedJob(pid=pid, user=user, nice=nice, arrival=float(pid),
                                  pending_tokens=pending, context_tokens=20, blocks_held=2,
                                  resident=resident, need_blocks=need)


def request(jobs: list, free: int = 100, budget: int = 256, max_batch: int = 64,
            limits: dict[str, int] | None = None) -> scheduler_pb2.PlanRequest:
    return scheduler_pb2.PlanRequest(jobs=jobs, free_blocks=free, block_size=16,
                                     token_budget=budget, max_batch=max_batch,
                                     user_block_limit=limits or {})


def asked(policy: str, req: scheduler_pb2.PlanRequest) -> scheduler_pb2.StepPlan:
    return SchedulerServicer(policy).Plan(req, None)


def test_a_plan_of_every_job_whole_is_renewable_under_stateless_policies() -> None:
    req = request([job(1), job(2, pending=40, resident=False, need=3), job(3)])
    for policy in ("fcfs", "priority"):
        got = asked(policy, req)
        assert got.renewable and granted(got) == tuple(s.pid for s in got.slots)
    assert not asked("fair", req).renewable   # it charges each plan's tokens to their users


def test_a_plan_that_leaves_out_chunks_or_preempts_is_not_renewable() -> None:
    chunked = asked("fcfs", request([job(1), job(2, pending=300, resident=False, need=20)]))
    assert [s.num_tokens for s in chunked.slots] == [1, 255] and not chunked.renewable
    short = asked("fcfs", request([job(1, need=1), job(2, need=1)], free=1))
    assert not short.renewable and granted(short) is None
    preempting = asked("priority", request([job(1, nice=10, need=0),
                                           job(2, nice=-5, pending=32, resident=False,
                                               need=3)], free=0))
    assert list(preempting.preempt) == [1] and not preempting.renewable


def test_renewal_rules() -> None:
    lease = (3, 1, 2)
    decoding = [job(1), job(2, need=1), job(3)]
    again = renew(lease, request(decoding, free=1))
    assert [(s.pid, s.num_tokens) for s in again.slots] == [(3, 1), (1, 1), (2, 1)]
    assert not again.renewable and not again.preempt
    fewer = renew(lease, request([job(2), job(3)]))          # job 1 ended: the rest stands
    assert [s.pid for s in fewer.slots] == [3, 2]
    assert renew(None, request(decoding)) is None                     # no lease
    assert renew(lease, request([*decoding, job(4)])) is None          # a new job
    assert renew(lease, request([job(1, pending=7), job(2)])) is None  # a prompt chunk
    assert renew(lease, request([job(1, resident=False)])) is None     # swapped out: admit
    assert renew(lease, request(decoding, free=0)) is None             # a block short
    assert renew(lease, request(decoding, max_batch=2)) is None        # over the batch
    assert renew(lease, request(decoding, limits={"u": 50})) is None   # quotas: ask
    bare = scheduler_pb2.SchedJob(pid=1, pending_tokens=1, resident=True)   # no need_blocks
    assert renew(lease, request([bare])) is None


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_every_renewed_plan_is_the_plan_the_scheduler_would_make(policy: str) -> None:
    rng = random.Random(7)
    renewed = 0
    for _ in range(2000):
        n = rng.randint(1, 12)
        first = request([job(p, pending=rng.choice([1, 1, 5, 40]), need=rng.randint(0, 3),
                             nice=rng.randint(-3, 3), resident=rng.random() < 0.8,
                             user=rng.choice("ab")) for p in range(1, n + 1)],
                        free=rng.randint(0, 30), budget=rng.choice([8, 64, 256]),
                        max_batch=rng.choice([4, 64]))
        lease = granted(asked(policy, first))
        later = [job(j.pid, need=rng.randint(0, 3), nice=rng.randint(-3, 3), user=j.user,
                     pending=rng.choice([1, 1, 1, 2]), resident=rng.random() < 0.95)
                 for j in first.jobs if rng.random() < 0.9]
        later += [job(100 + i) for i in range(rng.choice([0, 0, 0, 1]))]
        req = request(later, free=rng.randint(0, 30), budget=first.token_budget,
                      max_batch=first.max_batch)
        got = renew(lease, req)
        if got is None:
            continue
        renewed += 1
        fresh = plan(policy, req)
        assert sorted((s.pid, s.num_tokens) for s in got.slots) == sorted(fresh.slots)
        assert fresh.preempt == []
    assert renewed > 100   # the rules were exercised, not just refused


def renewed_plans(system: System) -> float:
    text = system.call("Metrics", kernel_pb2.MetricsRequest()).text
    return sum(s.value for f in text_string_to_metric_families(text)
               for s in f.samples if s.name == "llmasos:plans_renewed_total")


def test_steady_decoding_renews_the_plan_instead_of_asking(model_system: System) -> None:
    before = renewed_plans(model_system)
    pids = [spawn(model_system, p, max_tokens=24) for p in PROMPTS[:3]]
    for pid in pids:
        assert wait(model_system, pid).info.generated_tokens == 24
    assert renewed_plans(model_system) - before >= 10   # most of ~23 decode steps
