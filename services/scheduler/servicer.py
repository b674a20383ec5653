"""gRPC face of the scheduling policy."""

from __future__ import annotations

import grpc

from llmasos.proto import scheduler_pb2, scheduler_pb2_grpc
from llmasos.services.scheduler.placement import place
from llmasos.services.scheduler.policy import POLICIES, plan
from llmasos.services.scheduler.usage import Usage


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
            preempt=result.preempt)

    def Policy(self, request: scheduler_pb2.PolicyRequest,  # noqa: N802
               context: grpc.ServicerContext) -> scheduler_pb2.PolicyResponse:
        return scheduler_pb2.PolicyResponse(policy=self.policy)

    def Place(self, request: scheduler_pb2.PlaceRequest,  # noqa: N802
              context: grpc.ServicerContext) -> scheduler_pb2.PlaceResponse:
        return scheduler_pb2.PlaceResponse(replica=place(request))
