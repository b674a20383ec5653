"""Booting from the journal (kernel/journal.py): deployed models, the process table and the pid
counter come back as the last acknowledged step left them. Live jobs return READY with their
tokens so far (their KV is recomputed, or found in the prefix cache), zombies stay reapable,
pids keep counting up. What cannot come back is ended with a reason, never silently dropped:
a pipe reader whose writer's stream was still open, a job whose model is gone."""

from __future__ import annotations

import structlog

from llmasos.kernel import replicas
from llmasos.kernel.journal import Journal, JournalError, restore
from llmasos.kernel.kernel import Deployed, Kernel
from llmasos.kernel.proctable import Exit

log = structlog.get_logger()


def recover(k: Kernel) -> None:
    """Open the journal and load what it holds (before the services start)."""
    try:
        k.journal = Journal.open(k.cfg.home)
    except JournalError as e:
        raise SystemExit(f"llmosd: {e}") from None
    rec = k.journal.replay()
    for name, fields in rec.models.items():
        k.models[name] = Deployed(**{f: v for f, v in fields.items()
                                     if f in Deployed.__dataclass_fields__})
    restore(k.table, rec)
    if rec.procs or rec.models:
        log.warning("kernel_recovered", jobs=len(k.table.live()), models=sorted(rec.models),
                    next_pid=rec.next_pid, lost=rec.report.lost)


def resume(k: Kernel) -> None:
    """Once the services are up: deliver signals that were pending, end what cannot go on."""
    with k.table.lock:
        for proc in k.table.live():
            if proc.model not in k.models or k.models[proc.model].error:
                k.executor.end(proc, Exit.ERROR, -1, f"model {proc.model!r} did not come back "
                               "after llmosd restarted; deploy it again and resubmit")
            elif proc.input_open:
                k.executor.end(proc, Exit.ERROR, -1, "its pipe's input was lost when llmosd "
                               "restarted while the writer ran; run the pipeline again")
            elif proc.pending_signal:
                k.executor.jobs.deliver(proc)
            if proc.replica >= 0 and replicas.lane_of(proc) not in k.pagers:
                proc.replica = -1   # its replica did not come back: placed on another
    if k.remote is not None:
        k.remote.resume_all()   # hosted models' jobs stream again from their text so far
    k.executor.wake()
