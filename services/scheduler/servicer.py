"""gRPC face of the scheduling policy."""

from __future__ import annotations

import grpc

from llmasos.proto import scheduler_pb2, scheduler_pb2_grpc
from llmasos.services.scheduler.placement import place
from llmasos.services.scheduler.policy import POLICIES, Plan, plan
from llmasos.services.scheduler.usage import Usage

RENEWABLE = ("fcfs", "priority")   # policies whose plan depends on the request alone


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose one of {sorted(POLICIES)}")
        self.policy = policy
        self.usage = Usage()   # soft state: a restart forgets old usage, nothing else

    def Plan(self, request: scheduler_pb2.PlanRequest,  # noqa: N802
             context: grpc.ServicerContext) -> scheduler_pb2.StepPlan:
        history = self.usage.decay() if self.policy == "fair" else None
        result = plan(self.policy, request, history)
        users = {j.pid: j.user for j in request.jobs}
        for pid, n in result.slots:
            self.usage.charge(users[pid], n)
        return scheduler_pb2.StepPlan(
            slots=[scheduler_pb2.PlanSlot(pid=p, num_tokens=n) for p, n in result.slots],
            preempt=result.preempt, renewable=self._renewable(request, result))

    def _renewable(self, request: scheduler_pb2.PlanRequest, result: Plan) -> bool:
        """Every job runs all it has pending and none is preempted: while that still fits,
        this stateless policy would plan the same again (StepPlan.renewable)."""
        pending = {j.pid: j.pending_tokens for j in request.jobs}
        return self.policy in RENEWABLE and not result.preempt and \
            len(result.slots) == len(pending) and \
            all(pending.get(pid) == n for pid, n in result.slots)

    def Policy(self, request: scheduler_pb2.PolicyRequest,  # noqa: N802
               context: grpc.ServicerContext) -> scheduler_pb2.PolicyResponse:
        return scheduler_pb2.PolicyResponse(policy=self.policy)

    def Place(self, request: scheduler_pb2.PlaceRequest,  # noqa: N802
              context: grpc.ServicerContext) -> scheduler_pb2.PlaceResponse:
        return scheduler_pb2.PlaceResponse(replica=place(request))
