"""`python -m llmasos.services.scheduler [--option policy=fcfs|priority|fair]`"""

from __future__ import annotations

import argparse
import sys

import grpc

from llmasos.proto import scheduler_pb2_grpc
from llmasos.services.runtime import options, serve
from llmasos.services.scheduler.servicer import SchedulerServicer


def register(server: grpc.Server, args: argparse.Namespace) -> list[str]:
    servicer = SchedulerServicer(options(args).get("policy", "fcfs"))
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
    return ["llmasos.v1.Scheduler"]


if __name__ == "__main__":
    sys.exit(serve("scheduler", register))
