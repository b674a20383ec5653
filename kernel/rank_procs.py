"""The tp/pp worker ranks an inference service started (services/inference/rank.py), found as
its child processes: what Services and `llm-ps --services` list beside the services, on this
host and (reported by the agent) on a node."""

from __future__ import annotations

import psutil

RANK_MODULE = "llmasos.services.inference.rank"


def child_ranks(pid: int) -> list[tuple[str, int, int]]:
    """(model, rank, pid) of each rank process that process pid started; [] once it is gone."""
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return []
    out = []
    for child in children:
        try:
            argv = child.cmdline()
        except psutil.Error:   # it ended meanwhile
            continue
        if RANK_MODULE not in argv:
            continue
        flags = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
        out.append((flags.get("model", "?"), int(flags.get("rank", "0")), child.pid))
    return sorted(out)
