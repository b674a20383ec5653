"""Job control: signals, suspension (STOP swaps a job's KV to host memory), preemption and
exit. Every function runs under the table lock and only decides: the pager is updated at once
and the RPCs that move KV contents are queued on the executor's PendingIo, sent after the lock
is released (kernel/pending_io.py). Signals reach a RUNNING job at its next token boundary
(xv6: kill sets p->killed, the victim acts when it next crosses into the kernel)."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from llmasos.kernel import metrics
from llmasos.kernel.journal import NoJournal
from llmasos.kernel.pager import Pager
from llmasos.kernel.pending_io import PendingIo, SwapOut
from llmasos.kernel.proctable import Exit, Proc, ProcessTable, State
from llmasos.kernel.replicas import lane_of
from llmasos.syscalls.limits import SIGCONT, SIGKILL, SIGPIPE, SIGSTOP, SIGTERM

log = structlog.get_logger()
SWAP_SPACE = 1.0    # host memory for swapped-out KV, as a multiple of the pool


class JobControl:
    """The table, the pagers (by lane: kernel/replicas.py) and the queue of RPCs that state
    changes produce."""

    def __init__(self, table: ProcessTable, pagers: dict[str, Pager], io: PendingIo,
                 on_exit: Callable[[Proc], object] = lambda proc: None,
                 journal: object = None) -> None:
        self.table, self.pagers, self.io = table, pagers, io
        self.on_exit = on_exit   # after the exit is recorded (stdout_mailbox delivery)
        self.journal = journal if journal is not None else NoJournal()
        self.on_signal: Callable[[Proc, int], object] = lambda proc, sig: None   # remote jobs

    # --- signals ---------------------------------------------------------------------------

    def signal(self, proc: Proc, sig: int) -> None:
        """Act on a signal; what it changed is journaled before the caller is answered."""
        self._signal(proc, sig)
        self.journal.record_state(proc)
        self.on_signal(proc, sig)   # a hosted model's job: cancel or restart its stream

    def _signal(self, proc: Proc, sig: int) -> None:
        if proc.state == State.RUNNING:
            proc.pending_signal = sig if sig != SIGCONT else 0
        elif sig in (SIGKILL, SIGTERM, SIGPIPE):
            why = " (broken pipe: its reader ended)" if sig == SIGPIPE else ""
            self.end(proc, Exit.KILLED, -sig, f"killed by signal {sig}{why}")
        elif sig == SIGSTOP and proc.state != State.STOPPED:
            self.suspend(proc)
        elif sig == SIGCONT and proc.state == State.STOPPED:
            self.table.set_state(proc, State.READY)

    def deliver(self, proc: Proc) -> None:
        """At a token boundary: act on a signal that arrived while the job ran."""
        sig, proc.pending_signal = proc.pending_signal, 0
        if sig:
            self.signal(proc, sig)

    # --- memory ----------------------------------------------------------------------------

    def suspend(self, proc: Proc) -> None:
        """STOP: the job's KV moves to host memory (or is dropped, and CONT recomputes it)."""
        if not self.swap_out(proc):
            self.evict(proc)
        self.table.set_state(proc, State.STOPPED)

    def preempt(self, proc: Proc | None, why: str) -> None:
        """Take a job's blocks: a decoding job's KV is swapped to host memory (cheaper than
        recomputing prompt and output); a job still in its prompt is recomputed later."""
        if proc is None or proc.state in (State.ZOMBIE, State.REAPED):
            return
        swapped = bool(proc.output_ids) and self.swap_out(proc)
        if not swapped:
            self.evict(proc)
        proc.preemptions += 1
        metrics.on_preempt(proc.model)
        log.info("job_preempted", pid=proc.pid, why=why, preemptions=proc.preemptions,
                 mode="swap" if swapped else "recompute")

    def swap_out(self, proc: Proc) -> bool:
        """Free the job's blocks now and queue the copy of their contents to host memory;
        False when it cannot be swapped (not resident, host swap space full)."""
        pager = self.pagers.get(lane_of(proc))
        if pager is None or proc.pid not in pager or pager.is_swapped(proc.pid):
            return False
        need = len(pager.block_table(proc.pid))
        if self.swapped_blocks(pager) + need > pager.num_blocks * SWAP_SPACE:
            return False
        blocks = pager.swap_out(proc.pid)
        self.io.swap_outs.append(SwapOut(proc, lane_of(proc), blocks))
        metrics.on_swap(proc.model, "out", len(blocks))
        proc.kv_blocks = 0
        return True

    def swap_in(self, proc: Proc, pager: Pager) -> None:
        """Blocks for a swapped-out job (raises OutOfBlocks); its contents follow by RPC."""
        blocks = pager.swap_in(proc.pid)
        self.io.swap_ins.append(SwapOut(proc, lane_of(proc), blocks))
        metrics.on_swap(proc.model, "in", len(blocks))

    def swapped_blocks(self, pager: Pager) -> int:
        return sum(pager.blocks_for(pager.num_tokens(p.pid)) for p in self.table.live()
                   if p.pid in pager and pager.is_swapped(p.pid))

    def lost(self, proc: Proc) -> None:
        """Its KV could not be saved or restored: start again from the tokens (recompute)."""
        pager = self.pagers.get(lane_of(proc))
        if pager is not None:
            pager.free(proc.pid)
        proc.kv_blocks, proc.swap_handle, proc.needs_reset = 0, 0, True

    def evict(self, proc: Proc) -> None:
        """Give back everything the job holds: its blocks and any swapped-out copy."""
        pager = self.pagers.get(lane_of(proc))
        if pager is not None:
            pager.free(proc.pid)
        self.io.drop(lane_of(proc), proc.swap_handle)
        proc.kv_blocks, proc.swap_handle = 0, 0

    # --- exit ------------------------------------------------------------------------------

    def end(self, proc: Proc, reason: Exit, status: int = 0, message: str = "") -> None:
        self.evict(proc)
        if proc.replica >= 0:   # else no service has seen it
            self.io.release(lane_of(proc), proc.pid)
        self.table.exit(proc, reason, status, message)
        self.journal.record_state(proc)
        metrics.on_exit(proc)
        self.on_exit(proc)
        log.info("job_exit", pid=proc.pid, reason=reason.name, tokens=len(proc.output_ids),
                 message=message or None)
