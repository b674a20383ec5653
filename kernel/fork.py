"""n > 1 samples: the first job of a Spawn computes the shared prompt; its siblings wait, then
share its prompt KV copy-on-write instead of computing it again (runs under the table lock)."""

from __future__ import annotations

import structlog

from llmasos.kernel.pager import Pager
from llmasos.kernel.proctable import Proc, ProcessTable, State
from llmasos.kernel.replicas import lane_of

log = structlog.get_logger()


def waits_for_fork(table: ProcessTable, proc: Proc) -> bool:
    """A sibling sample waits while its parent still computes the shared prompt."""
    if not proc.fork_pending:
        return False
    parent = table.get(proc.ppid)
    if parent is None or parent.state in (State.ZOMBIE, State.STOPPED) or parent.output_ids:
        proc.fork_pending = False   # the parent is gone: compute the prompt itself
        return False
    return True


def fork_siblings(table: ProcessTable, parent: Proc, pager: Pager) -> None:
    """The parent's prompt KV (all but its last token) is computed: share it."""
    for pid in parent.forks:
        child = table.get(pid)
        if child is not None and child.fork_pending and pid not in pager and \
                lane_of(child) == lane_of(parent):   # else it runs on another replica
            pager.fork(parent.pid, pid)
            child.kv_blocks = parent.kv_blocks
            log.info("job_forked", pid=pid, parent=parent.pid, shared_blocks=child.kv_blocks)
        if child is not None:
            child.fork_pending = False
    parent.forks = []
