"""The step loop: the kernel's mechanism for running jobs, one model at a time, as nano-vllm's
step reads:

    snapshot   (table lock)  runnable jobs and the pager's exact block needs
    plan       (no lock)     one Plan RPC: the scheduler picks slots and any preemption
    admit      (table lock)  preempt as planned, give blocks, build the step's entries
    send       (no lock)     swap-outs, swap-ins, copy-on-write copies (kernel/pending_io.py)
    step       (no lock)     one Step RPC for the whole batch
    commit     (table lock)  tokens into the process table, exits, signals; then releases

Faults are charged to their cause: a transport failure (UNAVAILABLE, a deadline) is the
service's and the batch is retried after it comes back, with its sampler state reset so no
token is doubled; an entry the engine refuses ends that job with EXIT_ERROR and the rest of the
batch runs on; a batch that fails as a whole is split to find the job that broke it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc
import structlog

from llmasos.kernel.fork import fork_siblings, waits_for_fork
from llmasos.kernel.jobctl import JobControl
from llmasos.kernel.kernel import Kernel
from llmasos.kernel.pager import OutOfBlocks, Pager
from llmasos.kernel.pending_io import RPC_ERRORS, PendingIo, send_releases, send_swaps
from llmasos.kernel.proctable import Exit, Proc, State
from llmasos.proto import inference_pb2, scheduler_pb2
from llmasos.syscalls import SyscallError
from llmasos.syscalls.limits import SIGKILL, SIGTERM

log = structlog.get_logger()
RUNNABLE = (State.NEW, State.READY, State.BLOCKED)
RETRY_PAUSE = 0.2   # after a failed step (a service restarting), before trying again
# Codes that say the service (or the way to it) failed, not the request: retry the batch.
SERVICE_FAULTS = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED})


class ServiceFault(Exception):
    """The step could not run because a service is down or restarting."""


@dataclass
class Work:
    """One step of one model, as admitted."""

    model: str
    pager: Pager
    batch: list[tuple[Proc, inference_pb2.StepEntry]] = field(default_factory=list)


class Executor:
    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.table = k.table
        self.io = PendingIo()                                  # guarded by table.lock
        self.jobs = JobControl(k.table, k.pagers, self.io)     # runs under table.lock
        self.wakeup = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="executor", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.wakeup.set()
        self.thread.join(timeout=30)

    def wake(self) -> None:
        self.wakeup.set()

    # --- called by syscall handlers, under the table lock ------------------------------------

    def signal(self, proc: Proc, sig: int) -> None:
        self.jobs.signal(proc, sig)
        self.wake()

    def end(self, proc: Proc, reason: Exit, status: int = 0, message: str = "") -> None:
        self.jobs.end(proc, reason, status, message)
        self.wake()

    def inference_restarted(self, incarnation: int) -> None:
        """New pagers were attached: every job's KV is gone and will be recomputed."""
        with self.table.lock:
            for proc in self.table.live():
                proc.kv_blocks, proc.swap_handle, proc.needs_reset = 0, 0, True
                if proc.state == State.RUNNING:
                    self.table.set_state(proc, State.READY)
            self.io.take()   # descriptors of the dead incarnation mean nothing now
        if incarnation > 1:
            log.warning("kv_lost_recomputing", incarnation=incarnation)
        self.wake()

    def model_lost(self, model: str, why: str) -> None:
        """The model cannot be served (its redeploy failed): its jobs end with the reason."""
        with self.table.lock:
            for proc in self.table.live():
                if proc.model == model:
                    self.jobs.end(proc, Exit.ERROR, -1, why)
            self.table.changed.notify_all()

    def shutdown_jobs(self) -> None:
        with self.table.lock:
            for proc in self.table.live():
                if proc.state == State.RUNNING:
                    proc.pending_signal = SIGKILL
                else:
                    self.jobs.end(proc, Exit.SHUTDOWN, -SIGTERM, "llmosd shut down")

    # --- the loop ------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self.stopping.is_set():
            self.wakeup.clear()
            busy = False
            for model in list(self.k.models):
                try:
                    busy |= self.step(model)
                except (ServiceFault, *RPC_ERRORS) as e:   # a service is restarting
                    log.warning("step_failed", model=model, error=str(e))
                    self._requeue(model)
                    self.stopping.wait(RETRY_PAUSE)
                except Exception:
                    log.exception("step_crashed", model=model)
                    self._requeue(model)
                    self.stopping.wait(RETRY_PAUSE)
            self._flush_releases()
            self.table.reap_expired()
            if not busy:
                self.wakeup.wait(1.0)   # idle: sleep until a syscall wakes us (no polling)

    def step(self, model: str) -> bool:
        """One step of one model's jobs; False when there was nothing to run."""
        pager = self.k.pagers.get(model)
        if pager is None:
            return False
        request = self._snapshot(model, pager)
        if request is None:
            return False
        plan = self.k.scheduler().Plan(request, timeout=30)
        work, io = self._admit(model, pager, plan)
        failed = send_swaps(io, self.k.inference, self.table.lock, self.jobs.lost)
        if failed:
            self._drop(work, failed)
        if not work.batch:
            return bool(plan.slots)
        t0 = time.perf_counter()
        results = self._run(work)
        self._commit(work, results, time.perf_counter() - t0)
        return True

    # --- snapshot: what could run, and what each needs -------------------------------------

    def _snapshot(self, model: str, pager: Pager) -> scheduler_pb2.PlanRequest | None:
        with self.table.lock:
            procs = [p for p in self.table.live() if p.model == model and p.state in RUNNABLE
                     and not waits_for_fork(self.table, p)]
            for p in procs:
                if p.state == State.NEW:
                    self.table.set_state(p, State.READY)
            jobs = [self._sched_job(p, pager) for p in procs]
            limits = self.k.kv_limits(model, {p.user for p in procs})
            free = pager.free_blocks
        if not jobs:
            return None
        return scheduler_pb2.PlanRequest(
            jobs=jobs, free_blocks=free, block_size=pager.block_size,
            token_budget=self.k.cfg.token_budget, max_batch=self.k.cfg.max_batch,
            user_block_limit=limits)

    @staticmethod
    def _sched_job(p: Proc, pager: Pager) -> scheduler_pb2.SchedJob:
        # a swapped-out job holds no blocks: it is admitted again like a waiting one
        resident = p.pid in pager and not pager.is_swapped(p.pid)
        computed = pager.num_computed(p.pid) if p.pid in pager else 0
        return scheduler_pb2.SchedJob(
            pid=p.pid, user=p.user, nice=p.nice, arrival=p.created,
            pending_tokens=len(p.prompt_ids) + len(p.output_ids) - computed,
            context_tokens=computed, blocks_held=p.kv_blocks, resident=resident,
            served_tokens=len(p.output_ids),
            need_blocks=pager.blocks_needed(p.pid, p.user, p.tokens))

    # --- admit: carry out the plan ---------------------------------------------------------

    def _admit(self, model: str, pager: Pager,
               plan: scheduler_pb2.StepPlan) -> tuple[Work, PendingIo]:
        work = Work(model, pager)
        with self.table.lock:
            if self.k.pagers.get(model) is pager:   # else the service restarted meanwhile
                for pid in plan.preempt:
                    self.jobs.preempt(self.table.get(pid), "scheduler")
                for slot in plan.slots:
                    proc = self.table.get(slot.pid)
                    if proc is None or proc.state not in RUNNABLE:
                        continue
                    entry = self._entry(proc, pager, slot.num_tokens)
                    if entry is not None:
                        self.table.set_state(proc, State.RUNNING)
                        work.batch.append((proc, entry))
            return work, self.io.take()

    def _entry(self, proc: Proc, pager: Pager, budget: int) -> inference_pb2.StepEntry | None:
        """Blocks for the job's next chunk; None (job stays READY/BLOCKED) when memory is short,
        which the plan's exact counts make rare (another model's jobs do not share the pool)."""
        tokens = proc.tokens
        try:
            if proc.pid in pager and pager.is_swapped(proc.pid):
                self.jobs.swap_in(proc, pager)
            if proc.pid not in pager:
                pager.admit(proc.pid, proc.user, tokens)
                proc.needs_reset = True
            elif pager.num_tokens(proc.pid) < len(tokens):
                copies = pager.append(proc.pid, tokens[pager.num_tokens(proc.pid):])
                if copies:
                    self.io.copies.setdefault(proc.model, []).extend(copies)
        except OutOfBlocks:
            if proc.state != State.BLOCKED:
                self.table.set_state(proc, State.BLOCKED)
            return None
        proc.kv_blocks = len(pager.block_table(proc.pid))
        start = pager.num_computed(proc.pid)
        n = max(1, min(budget, len(tokens) - start))
        if proc.forks:   # n > 1: prefill up to the last prompt token, then fork the samples
            last = len(proc.prompt_ids) - 1
            if start >= last:
                fork_siblings(self.table, proc, pager)
                self.wake()
            else:
                n = min(n, last - start)
        reset = proc.needs_reset   # the engine rebuilds its sampler state from the tokens
        return inference_pb2.StepEntry(
            seq_id=proc.pid, token_ids=tokens[start:start + n], start_pos=start,
            block_table=pager.block_table(proc.pid), sample=start + n == len(tokens),
            sampling=proc.sampling, generated_ids=proc.output_ids if reset else [], reset=reset)

    def _drop(self, work: Work, pids: set[int]) -> None:
        """Leave out of this step the jobs whose KV could not be restored (recomputed later)."""
        with self.table.lock:
            for proc, _ in work.batch:
                if proc.pid in pids and proc.state == State.RUNNING:
                    self.table.set_state(proc, State.READY)
            work.batch = [(p, e) for p, e in work.batch if p.pid not in pids]

    # --- step: run the batch, charging faults to their cause --------------------------------

    def _run(self, work: Work) -> list[inference_pb2.StepResult | str]:
        """One result per entry: the engine's, or the reason the job must end."""
        try:
            return list(self._send_step(work.model, [e for _, e in work.batch]))
        except grpc.RpcError as e:
            if e.code() in SERVICE_FAULTS:
                self._requeue(work.model)
                raise ServiceFault(f"Step: {e.code().name}: {e.details()}") from None
            log.warning("step_refused_whole", model=work.model, code=e.code().name,
                        error=e.details(), jobs=len(work.batch))
            return self._isolate(work)
        except SyscallError as e:
            self._requeue(work.model)
            raise ServiceFault(e.message) from None

    def _send_step(self, model: str, entries: list[inference_pb2.StepEntry]
                   ) -> list[inference_pb2.StepResult]:
        reply = self.k.inference().Step(
            inference_pb2.StepRequest(model=model, entries=entries), timeout=300)
        return list(reply.results)

    def _isolate(self, work: Work) -> list[inference_pb2.StepResult | str]:
        """The batch failed as a whole: run each entry alone (from a reset sampler state) to
        find the job that broke it; only that job ends."""
        out: list[inference_pb2.StepResult | str] = []
        for proc, entry in work.batch:
            alone = inference_pb2.StepEntry()
            alone.CopyFrom(entry)
            alone.reset, alone.generated_ids[:] = True, proc.output_ids
            try:
                out.append(self._send_step(work.model, [alone])[0])
            except grpc.RpcError as e:
                if e.code() in SERVICE_FAULTS:
                    self._requeue(work.model)
                    raise ServiceFault(f"Step: {e.code().name}: {e.details()}") from None
                out.append(f"{e.code().name}: {e.details()}")
        return out

    def _requeue(self, model: str) -> None:
        """The step did not happen: its jobs wait again, and their sampler state is rebuilt
        on the next try (a Step that timed out may still have run: no token is doubled)."""
        with self.table.lock:
            for proc in self.table.live():
                if proc.model == model and proc.state == State.RUNNING:
                    proc.needs_reset = True
                    self.table.set_state(proc, State.READY)
                    self.jobs.deliver(proc)

    # --- commit ----------------------------------------------------------------------------

    def _commit(self, work: Work, results: list, seconds: float) -> None:
        total = sum(len(e.token_ids) for _, e in work.batch) or 1
        with self.table.lock:
            if self.k.pagers.get(work.model) is not work.pager:   # inference restarted
                return
            for (proc, entry), result in zip(work.batch, results, strict=True):
                if proc.state != State.RUNNING:
                    continue
                proc.cpu_seconds += seconds * len(entry.token_ids) / total
                self.table.set_state(proc, State.READY)
                error = result if isinstance(result, str) else result.error
                if error:
                    self.jobs.end(proc, Exit.ERROR, -1, f"the inference service refused this "
                                  f"job: {error}")
                    continue
                proc.needs_reset = False
                work.pager.mark_computed(proc.pid, entry.start_pos + len(entry.token_ids))
                if result.sampled:
                    self._emit(proc, result)
                if not self._finished(proc, result):
                    self.jobs.deliver(proc)
            self.table.changed.notify_all()
        self._flush_releases()

    def _flush_releases(self) -> None:
        with self.table.lock:   # swaps queued meanwhile stay: they go before the next step
            io = self.io.take_releases()
        if io:
            send_releases(io, self.k.inference)

    @staticmethod
    def _emit(proc: Proc, result: inference_pb2.StepResult) -> None:
        if not proc.first_token:
            proc.first_token = time.time()
        proc.output_ids.append(result.token_id)
        proc.output_logprobs.append(result.logprob)
        proc.text += result.text
        proc.text_ends.append(len(proc.text))

    def _finished(self, proc: Proc, result: inference_pb2.StepResult) -> bool:
        if result.finish_reason == Exit.STOP:
            self.jobs.end(proc, Exit.STOP)
        elif len(proc.output_ids) >= proc.max_tokens:
            self.jobs.end(proc, Exit.LENGTH)
        elif proc.context_length and len(proc.tokens) >= proc.context_length:
            self.jobs.end(proc, Exit.LENGTH, 0, "reached the model's context length")
        else:
            return False
        return True
