"""grpc.health.v1 as it should read: the kernel NOT_SERVING while it drains, and each supervised
service by name ("llmasos.inference", ...) SERVING only while HEALTHY. A thread mirrors the
supervisor's states into the health servicer (the supervisor knows nothing of it)."""

from __future__ import annotations

import threading
import time
from typing import Any

from grpc_health.v1 import health, health_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
KERNEL = ("llmasos.v1.Kernel", "")
POLL_S = 0.25


def statuses(k: Any) -> dict[str, int]:
    """What each health name should say now."""
    out = {name: NOT_SERVING if k.draining.is_set() else SERVING for name in KERNEL}
    for svc in list(k.supervisor.services.values()):
        out[f"llmasos.{svc.spec.name}"] = SERVING if svc.state == "HEALTHY" else NOT_SERVING
    return out


def watch(k: Any, servicer: health.HealthServicer) -> threading.Thread:
    """Mirror statuses(k) into the servicer, setting only what changed (Watch streams see it)."""
    def loop() -> None:
        last: dict[str, int] = {}
        while True:
            now = statuses(k)
            for name, status in now.items():
                if last.get(name) != status:
                    servicer.set(name, status)
            last = now
            time.sleep(POLL_S)

    thread = threading.Thread(target=loop, name="health", daemon=True)
    thread.start()
    return thread
