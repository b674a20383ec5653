"""The step loop: the kernel's mechanism for running jobs. Each step it asks the scheduler
service for a plan (one RPC), gives the planned jobs KV blocks through the pager, runs the batch
on the inference service (one RPC) and commits the tokens to the process table. Signals are
delivered here, at token boundaries (xv6: kill sets a flag, the victim acts at its next crossing).
"""

from __future__ import annotations

import contextlib
import threading
import time

import grpc
import structlog

from llmasos.kernel.ipc_delivery import deliver_output
from llmasos.kernel.kernel import Kernel
from llmasos.kernel.pager import OutOfBlocks, Pager
from llmasos.kernel.proctable import Exit, Proc, State
from llmasos.proto import inference_pb2, scheduler_pb2
from llmasos.syscalls import SyscallError

log = structlog.get_logger()
SIGKILL, SIGTERM, SIGCONT, SIGSTOP = 9, 15, 18, 19
RUNNABLE = (State.NEW, State.READY, State.BLOCKED)
RETRY_PAUSE = 0.2   # after a failed step (a service restarting), before trying again
SWAP_SPACE = 1.0    # host memory for swapped-out KV, as a multiple of the pool


class Executor:
    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.table = k.table
        self.wakeup = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="executor", daemon=True)
        self.copies: list[tuple[int, int]] = []   # copy-on-write block copies of this step

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.wakeup.set()
        self.thread.join(timeout=30)

    def wake(self) -> None:
        self.wakeup.set()

    # --- signals (called with the table lock held) ---------------------------------------

    def signal(self, proc: Proc, sig: int) -> None:
        if proc.state == State.RUNNING:
            proc.pending_signal = sig if sig != SIGCONT else 0
        elif sig in (SIGKILL, SIGTERM):
            self._end(proc, Exit.KILLED, -sig, f"killed by signal {sig}")
        elif sig == SIGSTOP and proc.state != State.STOPPED:
            self._suspend(proc)
        elif sig == SIGCONT and proc.state == State.STOPPED:
            self.table.set_state(proc, State.READY)
        self.wake()

    def _deliver(self, proc: Proc) -> None:
        sig, proc.pending_signal = proc.pending_signal, 0
        if sig:
            self.signal(proc, sig)

    def _suspend(self, proc: Proc) -> None:
        """STOP: the job's KV moves to host memory in the inference service (swap); if that
        cannot be done the blocks are simply freed and CONT recomputes them."""
        pager = self.k.pagers.get(proc.model)
        if pager is None or not self._swap_out(proc, pager):
            self._evict(proc)
        proc.kv_blocks = 0
        self.table.set_state(proc, State.STOPPED)

    def _swap_out(self, proc: Proc, pager: Pager) -> bool:
        """Copy the job's blocks to host memory and free them; False when it cannot (not
        resident, host swap space full, the service unreachable)."""
        if proc.pid not in pager or pager.is_swapped(proc.pid):
            return False
        blocks = pager.block_table(proc.pid)
        if self._swapped_blocks(pager) + len(blocks) > pager.num_blocks * SWAP_SPACE:
            return False
        try:
            proc.swap_handle = self.k.inference().SwapOut(inference_pb2.SwapOutRequest(
                model=proc.model, blocks=blocks), timeout=60).handle
        except (grpc.RpcError, SyscallError):
            return False
        pager.swap_out(proc.pid)
        log.info("job_swapped_out", pid=proc.pid, blocks=len(blocks))
        return True

    def _swapped_blocks(self, pager: Pager) -> int:
        return sum(pager.blocks_for(pager.num_tokens(p.pid)) for p in self.table.live()
                   if p.pid in pager and pager.is_swapped(p.pid))

    def _swap_in(self, proc: Proc, pager: Pager, planned: set[int]) -> None:
        """Bring a continued or preempted job's KV back from host memory (or recompute it if
        that fails)."""
        need = pager.blocks_for(pager.num_tokens(proc.pid))
        self._make_room(pager, need, planned, proc)
        blocks = pager.swap_in(proc.pid)
        try:
            self.k.inference().SwapIn(inference_pb2.SwapInRequest(
                model=proc.model, handle=proc.swap_handle, blocks=blocks), timeout=60)
            proc.swap_handle = 0
            log.info("job_swapped_in", pid=proc.pid, blocks=len(blocks))
        except (grpc.RpcError, SyscallError):
            pager.free(proc.pid)   # the copy is gone (service restarted): recompute instead
            proc.swap_handle = 0

    def _evict(self, proc: Proc) -> None:
        """Give back everything the job holds: its blocks and any swapped-out copy."""
        pager = self.k.pagers.get(proc.model)
        if pager is not None:
            pager.free(proc.pid)
        if proc.swap_handle:
            self._drop_swap(proc)
        proc.kv_blocks = 0

    def _end(self, proc: Proc, reason: Exit, status: int = 0, message: str = "") -> None:
        self._evict(proc)
        self.table.exit(proc, reason, status, message)
        deliver_output(self.k, proc)   # stdout_mailbox: copies fields, sends in the background
        log.info("job_exit", pid=proc.pid, reason=reason.name, tokens=len(proc.output_ids))

    def _drop_swap(self, proc: Proc) -> None:
        handle, proc.swap_handle = proc.swap_handle, 0
        with contextlib.suppress(grpc.RpcError, SyscallError):   # else it died with the service
            self.k.inference().Release(inference_pb2.ReleaseRequest(
                model=proc.model, swap_handles=[handle]), timeout=30)

    def inference_restarted(self, incarnation: int) -> None:
        """New pagers were attached: every job's KV is gone and will be recomputed."""
        with self.table.lock:
            for proc in self.table.live():
                proc.kv_blocks, proc.swap_handle = 0, 0
                if proc.state == State.RUNNING:
                    self.table.set_state(proc, State.READY)
        if incarnation > 1:
            log.warning("kv_lost_recomputing", incarnation=incarnation)
        self.wake()

    def shutdown_jobs(self) -> None:
        with self.table.lock:
            for proc in self.table.live():
                if proc.state == State.RUNNING:
                    proc.pending_signal = SIGKILL
                else:
                    self._end(proc, Exit.SHUTDOWN, -SIGTERM, "llmosd shut down")

    # --- the loop ------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self.stopping.is_set():
            self.wakeup.clear()
            busy = False
            for model in list(self.k.models):
                try:
                    busy |= self.step(model)
                except (grpc.RpcError, SyscallError) as e:   # a service is restarting
                    log.warning("step_failed", model=model, error=str(e.details() if
                                isinstance(e, grpc.RpcError) else e.message))
                    self._requeue(model)
                    self.stopping.wait(RETRY_PAUSE)
                except Exception:
                    log.exception("step_crashed", model=model)
                    self._requeue(model)
                    self.stopping.wait(RETRY_PAUSE)
            self.table.reap_expired()
            if not busy:
                self.wakeup.wait(1.0)   # idle: sleep until a syscall wakes us (no polling)

    def _requeue(self, model: str) -> None:
        with self.table.lock:
            for proc in self.table.live():
                if proc.model == model and proc.state == State.RUNNING:
                    self.table.set_state(proc, State.READY)
                    self._deliver(proc)

    def step(self, model: str) -> bool:
        """One step of one model's jobs; False when there was nothing to run."""
        pager = self.k.pagers.get(model)
        if pager is None:
            return False
        with self.table.lock:
            procs = [p for p in self.table.live() if p.model == model and p.state in RUNNABLE
                     and not self._waits_for_fork(p)]
            for p in procs:
                if p.state == State.NEW:
                    self.table.set_state(p, State.READY)
            jobs = [self._sched_job(p, pager) for p in procs]
            free = pager.free_blocks
        if not jobs:
            return False
        plan = self.k.scheduler().Plan(scheduler_pb2.PlanRequest(
            jobs=jobs, free_blocks=free, block_size=pager.block_size,
            token_budget=self.k.cfg.token_budget, max_batch=self.k.cfg.max_batch), timeout=30)
        with self.table.lock:
            for pid in plan.preempt:
                self._preempt(self.table.get(pid), "scheduler")
            self.copies = []
            batch = self._prepare(plan, pager)
        if not batch:
            return False
        if self.copies:
            src, dst = zip(*self.copies, strict=True)
            self.k.inference().CopyBlocks(inference_pb2.CopyBlocksRequest(
                model=model, src=src, dst=dst), timeout=60)
        t0 = time.perf_counter()
        reply = self.k.inference().Step(
            inference_pb2.StepRequest(model=model, entries=[e for _, e in batch]), timeout=300)
        self._commit(model, pager, batch, reply, time.perf_counter() - t0)
        return True

    def _sched_job(self, p: Proc, pager: Pager) -> scheduler_pb2.SchedJob:
        # a swapped-out job holds no blocks: it is admitted again like a waiting one
        resident = p.pid in pager and not pager.is_swapped(p.pid)
        computed = pager.num_computed(p.pid) if p.pid in pager else 0
        return scheduler_pb2.SchedJob(
            pid=p.pid, user=p.user, nice=p.nice, arrival=p.created,
            pending_tokens=len(p.prompt_ids) + len(p.output_ids) - computed,
            context_tokens=computed, blocks_held=p.kv_blocks, resident=resident,
            served_tokens=len(p.output_ids))

    # --- building the batch --------------------------------------------------------------

    def _prepare(self, plan: scheduler_pb2.StepPlan,
                 pager: Pager) -> list[tuple[Proc, inference_pb2.StepEntry]]:
        batch = []
        planned = {s.pid for s in plan.slots}
        for slot in plan.slots:
            proc = self.table.get(slot.pid)
            if proc is None or proc.state not in RUNNABLE:
                continue
            entry = self._entry(proc, pager, slot.num_tokens, planned)
            if entry is not None:
                self.table.set_state(proc, State.RUNNING)
                batch.append((proc, entry))
        return batch

    def _entry(self, proc: Proc, pager: Pager, budget: int,
               planned: set[int]) -> inference_pb2.StepEntry | None:
        """Blocks for the job's next chunk; None (job stays READY/BLOCKED) when memory is short."""
        tokens = proc.tokens
        try:
            if proc.pid in pager and pager.is_swapped(proc.pid):
                self._swap_in(proc, pager, planned)
            reset = proc.pid not in pager
            if reset:
                self._make_room(pager, pager.blocks_for(len(tokens)), planned, proc)
                pager.admit(proc.pid, proc.user, tokens)
            elif pager.num_tokens(proc.pid) < len(tokens):
                new = tokens[pager.num_tokens(proc.pid):]
                self._make_room(pager, pager.blocks_to_append(proc.pid, len(new)), planned, proc)
                self.copies += pager.append(proc.pid, new)   # copy-on-write of a forked block
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
                self._fork(proc, pager)
            else:
                n = min(n, last - start)
        sample = start + n == len(tokens)
        return inference_pb2.StepEntry(
            seq_id=proc.pid, token_ids=tokens[start:start + n], start_pos=start,
            block_table=pager.block_table(proc.pid), sample=sample, sampling=proc.sampling,
            generated_ids=proc.output_ids if reset else [], reset=reset)

    def _fork(self, parent: Proc, pager: Pager) -> None:
        """The parent's prompt KV (all but its last token) is computed: each sibling sample
        shares it copy-on-write instead of computing it again."""
        for pid in parent.forks:
            child = self.table.get(pid)
            if child is not None and child.fork_pending and pid not in pager:
                pager.fork(parent.pid, pid)
                child.kv_blocks = parent.kv_blocks
                log.info("job_forked", pid=pid, parent=parent.pid, shared_blocks=child.kv_blocks)
            if child is not None:
                child.fork_pending = False
        parent.forks = []
        self.wake()

    def _waits_for_fork(self, proc: Proc) -> bool:
        """A sibling sample waits while its parent still computes the shared prompt."""
        if not proc.fork_pending:
            return False
        parent = self.table.get(proc.ppid)
        if parent is None or parent.state in (State.ZOMBIE, State.STOPPED) or \
                parent.output_ids:
            proc.fork_pending = False   # the parent is gone: compute the prompt itself
            return False
        return True

    def _make_room(self, pager: Pager, needed: int, planned: set[int], proc: Proc) -> None:
        """Preempt resident jobs outside this step, lowest priority then newest first."""
        if needed <= pager.free_blocks:
            return
        victims = sorted((p for p in self.table.live()
                          if p.pid in pager and p.pid not in planned and p.model == proc.model
                          and p.state != State.RUNNING and not pager.is_swapped(p.pid)),
                         key=lambda p: (p.nice, p.created), reverse=True)
        for victim in victims:
            if needed <= pager.free_blocks:
                return
            if (victim.nice, victim.created) <= (proc.nice, proc.created):
                break   # never evict a job that outranks the one asking
            self._preempt(victim, "memory")
        if needed > pager.free_blocks:
            raise OutOfBlocks(needed, pager.free_blocks)

    def _preempt(self, proc: Proc | None, why: str) -> None:
        """Take a job's blocks: a decoding job's KV is swapped to host memory (cheaper than
        recomputing prompt and output); a job still in its prompt is recomputed later."""
        if proc is None or proc.state in (State.ZOMBIE, State.REAPED):
            return
        pager = self.k.pagers.get(proc.model)
        swapped = bool(proc.output_ids) and pager is not None and self._swap_out(proc, pager)
        if not swapped:
            self._evict(proc)
        proc.kv_blocks = 0
        proc.preemptions += 1
        log.info("job_preempted", pid=proc.pid, why=why, preemptions=proc.preemptions,
                 mode="swap" if swapped else "recompute")

    # --- committing ----------------------------------------------------------------------

    def _commit(self, model: str, pager: Pager, batch: list, reply: inference_pb2.StepResponse,
                seconds: float) -> None:
        ended = []
        total = sum(len(e.token_ids) for _, e in batch) or 1
        with self.table.lock:
            if self.k.pagers.get(model) is not pager:   # inference restarted mid-step
                self._requeue(model)
                return
            for (proc, entry), result in zip(batch, reply.results, strict=True):
                proc.cpu_seconds += seconds * len(entry.token_ids) / total
                pager.mark_computed(proc.pid, entry.start_pos + len(entry.token_ids))
                if result.sampled:
                    self._emit(proc, result)
                self.table.set_state(proc, State.READY)
                if self._finished(proc, result):
                    ended.append(proc.pid)
                else:
                    self._deliver(proc)
                    if proc.state == State.ZOMBIE:
                        ended.append(proc.pid)
            self.table.changed.notify_all()
        if ended:
            self.k.inference().Release(inference_pb2.ReleaseRequest(model=model, seq_ids=ended),
                                       timeout=30)

    def _emit(self, proc: Proc, result: inference_pb2.StepResult) -> None:
        if not proc.first_token:
            proc.first_token = time.time()
        proc.output_ids.append(result.token_id)
        proc.output_logprobs.append(result.logprob)
        proc.text += result.text

    def _finished(self, proc: Proc, result: inference_pb2.StepResult) -> bool:
        if result.finish_reason == Exit.STOP:
            self._end(proc, Exit.STOP)
        elif len(proc.output_ids) >= proc.max_tokens:
            self._end(proc, Exit.LENGTH)
        elif proc.context_length and len(proc.tokens) >= proc.context_length:
            self._end(proc, Exit.LENGTH, 0, "reached the model's context length")
        else:
            return False
        return True
