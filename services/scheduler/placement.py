"""Placement: which replica of a model runs a new job (data parallelism).

A replica's score is its live jobs, less what its prefix cache saves the job: each cached block
of the prompt is worth one job of load, up to PREFIX_WORTH_MAX (SGLang's cache-aware router
reads the same way: follow the cache while the load stays balanced). The lowest score wins;
ties go to the longer cached prefix, then the freer KV pool, then the lower index. Jobs are
placed in arrival order, each adding one to its replica's load, so a burst is spread out.
"""

from __future__ import annotations

from llmasos.proto import scheduler_pb2

PREFIX_WORTH_MAX = 4   # a prefix hit outweighs at most this many jobs of load difference


def place(request: scheduler_pb2.PlaceRequest) -> list[int]:
    """The replica index of each job, in request order (empty when no replica is live)."""
    replicas = list(request.replicas)
    if not replicas:
        return []
    load = [r.live_jobs for r in replicas]
    out = []
    for job in request.jobs:
        cached = list(job.cached_blocks) + [0] * (len(replicas) - len(job.cached_blocks))

        def rank(i: int, cached: list[int] = cached) -> tuple:
            score = load[i] - min(cached[i], PREFIX_WORTH_MAX)
            return (score, -cached[i], -replicas[i].free_blocks, replicas[i].replica)
        best = min(range(len(replicas)), key=rank)
        load[best] += 1
        out.append(replicas[best].replica)
    return out
