"""The step loop: the kernel's mechanism for running jobs, as nano-vllm's step reads:

    snapshot   (table lock)  runnable jobs and the pager's exact block needs
    plan       (no lock)     one Plan RPC: the scheduler picks slots and any preemption (or
                             its last plan again while it stands: kernel/plan_lease.py)
    admit      (table lock)  preempt as planned, give blocks, build the step's entries
    send       (no lock)     swap-outs, swap-ins, copy-on-write copies (kernel/pending_io.py)
    step       (no lock)     one Step RPC for the whole batch
    commit     (table lock)  tokens into the process table, exits, signals; then releases

Overlapped (vLLM's async scheduling, SGLang's overlap scheduler): while step N computes in the
inference service, the kernel snapshots, plans and admits step N+1, counting each job of step N
as if its token were already there (a placeholder in the pager). When N answers, N+1's
placeholders are filled with the sampled tokens (or dropped for jobs that just ended), N+1 is
launched at once, and only then is N committed. A job's signals wait for its step to finish.

Each replica of each model (a lane, kernel/replicas.py) has its own pager and its own step in
flight; one round of the loop steps every lane in turn, so replicas compute side by side while
the kernel prepares the next step of each. A pp model's lane has one slot per stage, each with
a step in flight of its own over the lane's pager (its jobs split between them), so while
stage 1 computes one slot's step, stage 0 computes the next slot's. New jobs are placed on a
replica (and a slot) before each round, and a replica whose process died has its jobs moved to
the live ones.

Faults are charged to their cause: a transport failure (UNAVAILABLE, a deadline) is the
service's and the batch is retried after it comes back, with its sampler state reset so no
token is doubled; an entry the engine refuses ends that job with EXIT_ERROR and the rest of the
batch runs on; a batch that fails as a whole is split to find the job that broke it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import structlog

from llmasos.kernel import metrics, plan_lease, replicas
from llmasos.kernel.fork import fork_siblings, waits_for_fork
from llmasos.kernel.ipc_delivery import deliver_output
from llmasos.kernel.jobctl import JobControl
from llmasos.kernel.journal import Tokens
from llmasos.kernel.kernel import Kernel
from llmasos.kernel.pager import OutOfBlocks, Pager
from llmasos.kernel.pending_io import RPC_ERRORS, PendingIo, send_releases, send_swaps
from llmasos.kernel.proctable import Exit, Proc, State
from llmasos.kernel.replicas import base, lane_of, slot_lane, slot_lane_of
from llmasos.proto import inference_pb2, scheduler_pb2
from llmasos.syscalls.limits import SIGKILL, SIGTERM

log = structlog.get_logger()
RUNNABLE = (State.NEW, State.READY, State.BLOCKED)
RETRY_PAUSE = 0.2   # after a failed step (a service restarting), before trying again
STOP_WAIT_S = 10.0  # how long stopping waits for the steps in flight (a hung service's: no more)
# Codes that say the service (or the way to it) failed, not the request: retry the batch.
SERVICE_FAULTS = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED})


def has_work(p: Proc, pager: Pager) -> bool:
    """Something to compute: a pipe's reader may have to wait for input."""
    if not p.input_open:
        return bool(p.tokens)
    return len(p.tokens) > (pager.num_computed(p.pid) if p.pid in pager else 0)


class ServiceFault(Exception):
    """The step could not run because a service is down or restarting."""


PLACEHOLDER = 0   # stands for a token still being sampled; replaced before the step is sent
FAILED = object()   # a phase of a lane's step that raised (charged to that lane)


@dataclass
class Work:
    """One step of one lane (a model's replica), as admitted (and, once launched, in flight)."""

    lane: str
    pager: Pager
    batch: list[tuple[Proc, inference_pb2.StepEntry]] = field(default_factory=list)
    follows: set[int] = field(default_factory=set)   # pids whose input is the token the
                                                      # step before samples
    io: PendingIo = field(default_factory=PendingIo)
    future: object = None
    started: float = 0.0
    answered: float = 0.0

    def pids(self) -> set[int]:
        return {p.pid for p, _ in self.batch}

    @property
    def model(self) -> str:
        return replicas.split(self.lane)[0]


class Done:
    """A finished call, for stubs without futures (the cores composed in one process)."""

    def __init__(self, call: object, request: object, timeout: float) -> None:
        try:
            self.value, self.error = call(request, timeout=timeout), None
        except grpc.RpcError as e:
            self.value, self.error = None, e

    def result(self) -> object:
        if self.error is not None:
            raise self.error
        return self.value


class Executor:
    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.table = k.table
        self.io = PendingIo()                                  # guarded by table.lock
        self.jobs = JobControl(k.table, k.pagers, self.io,     # runs under table.lock
                               on_exit=self._exited, journal=k.journal)
        self.wakeup = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="executor", daemon=True)
        self.inflight: dict[str, Work] = {}   # [loop] lane → the step its replica computes
        self.dead: list[dict[str, Pager]] = []   # pagers of replicas whose process died
        self.leases: dict[str, tuple[int, ...] | None] = {}   # [loop] lane → renewable plan

    def start(self) -> None:
        self.thread.start()

    def _exited(self, proc: Proc) -> None:
        """After a job's exit is recorded (under the table lock)."""
        deliver_output(self.k, proc)
        if self.k.pipes is not None:
            self.k.pipes.on_exit(proc)
        if proc.shm:
            self.k.segments.detach(proc)

    def stop(self) -> None:
        """Stop the loop, then collect the steps it left in flight: what they made is real,
        and a signal that waited for them (the kill of llmosd's shutdown) is delivered."""
        self.stopping.set()
        self.wakeup.set()
        self.thread.join(timeout=30)
        if self.thread.is_alive():
            return   # stuck in a call: its steps are the journal's to recover
        if self._steps_end():
            self._guarded("", self._finish_inflight)
        with self.table.lock:
            for proc in self.table.live():
                if proc.state == State.RUNNING and proc.pending_signal:
                    self.table.set_state(proc, State.READY)
                    self.jobs.deliver(proc)

    def _steps_end(self) -> bool:
        """Do the steps in flight end within STOP_WAIT_S?"""
        deadline = time.monotonic() + STOP_WAIT_S
        for work in self.inflight.values():
            wait = getattr(work.future, "exception", None)   # a Done (one process) has ended
            if wait is not None:
                try:
                    wait(timeout=max(0.0, deadline - time.monotonic()))
                except grpc.FutureTimeoutError:
                    return False
                except grpc.FutureCancelledError:
                    continue
        return True

    def wake(self) -> None:
        self.wakeup.set()

    # --- called by syscall handlers, under the table lock ------------------------------------

    def signal(self, proc: Proc, sig: int) -> None:
        self.jobs.signal(proc, sig)
        self.wake()

    def end(self, proc: Proc, reason: Exit, status: int = 0, message: str = "") -> None:
        self.jobs.end(proc, reason, status, message)
        self.wake()

    def on_host(self, lane: str, replica: int, host: str) -> bool:
        """Is the lane replica `replica` of its model, placed on `host` ("" for this one)?"""
        model, r = replicas.split(lane)
        return r == replica and replicas.host_of(self.k, model, r) == host

    def replica_restarted(self, replica: int, incarnation: int,
                          pagers: dict[str, Pager], host: str = "") -> None:
        """A replica's service (re)started with these fresh pagers: the KV of every job there is
        gone and will be recomputed; a lane it could not redeploy hands its jobs to the others."""
        with self.table.lock:
            stale = [ln for ln in list(self.k.pagers) if self.on_host(ln, replica, host)]
            for ln in stale:
                self.io.take(ln)   # descriptors of the dead incarnation mean nothing now
                if ln not in pagers:
                    self.k.pagers.pop(ln, None)
            for proc in self.table.live():
                if proc.replica != replica or not self.on_host(lane_of(proc), replica, host):
                    continue
                self._forget_kv(proc)
                if lane_of(proc) not in pagers and replicas.count(self.k, proc.model) > 1:
                    proc.replica = proc.slot = -1   # placed again on a live replica
            self.k.pagers.update(pagers)
        if incarnation > 1:
            log.warning("kv_lost_recomputing", replica=replica, incarnation=incarnation)
        self.wake()

    def lane_back(self, lane: str, pager: Pager) -> None:
        """A lane that had no pager (its model waited for a node, kernel/node_ranks.py) is
        served again: its jobs' KV is recomputed there."""
        with self.table.lock:
            self.io.take(lane)
            for proc in self.table.live():
                if lane_of(proc) == lane:
                    self._forget_kv(proc)
            self.k.pagers[lane] = pager
        self.wake()

    def replica_died(self, replica: int, host: str = "") -> None:
        """(supervisor or nodes thread) A replica's process (on `host`, "" for this one) is
        gone: the loop moves the jobs of its replicated models at its next round (a model with
        one replica waits for the restart)."""
        lanes = [replicas.lane(m, replica) for m in list(self.k.models)
                 if replicas.count(self.k, m) > 1 and replicas.host_of(self.k, m, replica) == host]
        dead = {ln: pager for ln in lanes if (pager := self.k.pagers.get(ln)) is not None}
        if dead:
            self.dead.append(dead)
            self.wake()

    def _move_off_dead(self) -> None:
        """[loop] Jobs of a dead replica: back to READY with their tokens, unplaced."""
        while self.dead:
            dead = self.dead.pop(0)
            with self.table.lock:
                gone = {ln for ln, pager in dead.items() if self.k.pagers.get(ln) is pager}
                for ln in gone:
                    del self.k.pagers[ln]
                    self.io.take(ln)
                    for key in [key for key in self.inflight if base(key) == ln]:
                        self.inflight.pop(key)   # its answer will never come
                moved = [p for p in self.table.live() if lane_of(p) in gone]
                for proc in moved:
                    self._forget_kv(proc)
                    proc.replica = proc.slot = -1
                    self.jobs.deliver(proc)
            if gone:
                log.warning("replica_down_jobs_moved", lanes=sorted(gone), jobs=len(moved))

    def _forget_kv(self, proc: Proc) -> None:
        """Its KV is gone with its replica's process: it is recomputed from its tokens."""
        proc.kv_blocks, proc.swap_handle, proc.needs_reset = 0, 0, True
        if proc.state == State.RUNNING:
            self.table.set_state(proc, State.READY)

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
            self._move_off_dead()
            replicas.place_new(self.k)
            busy = self._round(self._slot_lanes())
            self._flush_releases()
            for pid in self.table.reap_expired():
                self.k.journal.record_reap(pid)
            if not busy and not self.inflight:
                self.k.journal.checkpoint()
                self.wakeup.wait(1.0)   # idle: sleep until a syscall wakes us (no polling)

    def _slot_lanes(self) -> list[str]:
        """Every lane's slots: one step in flight each (several for a pp model's replica)."""
        return [slot_lane(ln, s) for ln in self.k.lanes()
                for s in range(replicas.depth(self.k, replicas.split(ln)[0]))]

    def _round(self, lanes: list[str]) -> bool:
        """One step of every lane; True when there was work. Each lane's next step is prepared
        while the steps in flight compute; then lane by lane its step is collected and the next
        one launched; the commits come last, so one replica's bookkeeping keeps no other
        waiting. With one lane this is the overlapped step as it always was."""
        if not lanes:
            return self._guarded("", self._finish_inflight) is not False
        staged = {lane: self._guarded(lane, self._stage, lane) for lane in lanes}
        busy, finished = False, []
        for lane, work in staged.items():
            got = FAILED if work is FAILED else self._guarded(lane, self._relaunch, lane, work)
            if got is FAILED:
                busy = True
                continue
            done, more = got
            busy = busy or more
            if done is not None:
                finished.append((lane, done))
        for lane, done in finished:
            self._guarded(lane, self._commit, *done)
        return busy

    def _guarded(self, lane: str, fn: Callable[..., object], *args: object) -> object:
        """fn(*args), a failure charged to the lane: FAILED when it raised."""
        try:
            return fn(*args)
        except (ServiceFault, *RPC_ERRORS) as e:   # a service is restarting
            log.warning("step_failed", model=lane, error=str(e))
            self._fail_inflight(lane)
        except Exception:
            log.exception("step_crashed", model=lane)
            self._fail_inflight(lane)
            if lane:
                self._requeue(lane)
        self.stopping.wait(RETRY_PAUSE)
        return FAILED

    def _stage(self, lane: str) -> Work | None:
        """Prepare the lane's next step while its step in flight computes."""
        pager = self.k.pagers.get(base(lane))
        try:
            return self._prepare(lane, pager) if pager is not None else None
        except RPC_ERRORS:   # the scheduler is restarting: still collect the step in flight
            self._finish_inflight(lane)
            raise

    def _relaunch(self, lane: str, work: Work | None) -> tuple[tuple | None, bool]:
        """Collect the lane's step in flight and launch the prepared one; the collected step
        (to commit) and whether there was work."""
        finished = self._await_inflight(lane, work)
        if work is not None and work.batch:
            try:
                self._launch(work)
            except RPC_ERRORS as e:   # the service went away between two steps
                if finished is not None:
                    self._commit(*finished)   # what the last step made is real
                self._requeue(lane)
                raise ServiceFault(f"Step not sent: {e}") from None
            if finished is not None and finished[0].answered:   # the engine waited on us
                metrics.on_gap(work.model, work.started - finished[0].answered)
        return finished, finished is not None or lane in self.inflight or bool(work and work.io)

    def _finish_inflight(self, lane: str = "") -> bool:
        """Collect the step in flight of one lane (of every lane when none is named)."""
        finished = False
        for ln in [lane] if lane else list(self.inflight):
            done = self._await_inflight(ln, None)
            if done is not None:
                self._commit(*done)
                finished = True
        return finished

    def _prepare(self, lane: str, pager: Pager) -> Work | None:
        request = self._snapshot(lane, pager)
        if request is None:
            return None
        plan = plan_lease.renew(self.leases.get(lane), request)
        if plan is None:
            plan = self.k.scheduler().Plan(request, timeout=30)
            self.leases[lane] = plan_lease.granted(plan)
        else:
            metrics.on_renewed(replicas.split(lane)[0])
        return self._admit(lane, pager, plan)

    def _await_inflight(self, lane: str, work: Work | None) -> tuple | None:
        """Wait for the lane's step in flight; fill in or drop what the next one took for
        granted."""
        done = self.inflight.pop(lane, None)
        if done is None:
            if work is not None:
                self._send_io(work)
            return None
        try:
            results = self._results(done)
        except ServiceFault:
            if work is not None:
                self._unprepare(work)
            self._requeue(lane)
            raise
        if work is not None:
            with self.table.lock:
                self._fill(work, done, results)
            self._send_io(work)
        return done, results, time.perf_counter() - done.started

    def _route(self, lane: str) -> tuple[object, str]:
        """The inference service that holds this lane's replica, and the model's name there."""
        model, replica = replicas.split(lane)
        return replicas.stub(self.k, model, replica), model

    def _send_io(self, work: Work) -> None:
        failed = send_swaps(work.io, self._route, self.table.lock, self.jobs.lost)
        if failed:
            self._drop(work, failed)
        if work.io.releases or work.io.dropped:   # jobs that ended since the last round's flush
            send_releases(work.io, self._route)

    def _launch(self, work: Work) -> None:
        step = self._route(work.lane)[0].Step
        request = inference_pb2.StepRequest(model=work.model, entries=[e for _, e in work.batch])
        work.started = time.perf_counter()
        work.future = step.future(request, timeout=300) if hasattr(step, "future") \
            else Done(step, request, 300)
        self.inflight[work.lane] = work
        metrics.on_launch(work.model, sum(w.model == work.model for w in self.inflight.values()))

    def _fail_inflight(self, lane: str) -> None:
        """A step failed: the lane's step in flight is abandoned and its jobs wait again."""
        done = self.inflight.pop(lane, None)
        if done is not None:
            self._requeue(lane)

    # --- snapshot: what could run, and what each needs -------------------------------------

    def _snapshot(self, lane: str, pager: Pager) -> scheduler_pb2.PlanRequest | None:
        flying = self._flying(lane)
        with self.table.lock:
            procs = [p for p in self.table.live() if slot_lane_of(p) == lane and
                     p.state in RUNNABLE and self._slotted(p) and
                     not waits_for_fork(self.table, p) and has_work(p, pager)]
            for p in procs:
                if p.state == State.NEW:
                    self.table.set_state(p, State.READY)
            jobs = [self._sched_job(p, pager) for p in procs]
            jobs += [self._sched_next(p, e, pager) for p, e in flying.values()
                     if self._continues(p, e)]
            limits = self._kv_limits(lane, pager, jobs)
            free = pager.free_blocks
        if not jobs:
            return None
        return scheduler_pb2.PlanRequest(
            jobs=jobs, free_blocks=free, block_size=pager.block_size,
            token_budget=self.k.cfg.token_budget, max_batch=self.k.cfg.max_batch,
            user_block_limit=limits)

    def _slotted(self, p: Proc) -> bool:
        """Does the job have its slot (a pp model's job gets one before its first step)?"""
        return p.slot >= 0 or replicas.depth(self.k, p.model) == 1

    def _kv_limits(self, lane: str, pager: Pager,
                   jobs: list[scheduler_pb2.SchedJob]) -> dict[str, int]:
        """Each quota'd user's KV limit, less the blocks its resident jobs outside this plan
        hold (a job whose preemption waits for its step to land, one about to end, one in
        another slot's step, ...)."""
        lane = base(lane)
        limits = self.k.kv_limits(lane, {j.user for j in jobs})
        planned = {j.pid for j in jobs}
        for p in self.table.live():
            if p.user in limits and lane_of(p) == lane and p.pid not in planned and \
                    p.pid in pager and not pager.is_swapped(p.pid) and not p.segment:
                limits[p.user] = max(0, limits[p.user] - len(pager.block_table(p.pid)))
        return limits

    def _flying(self, lane: str) -> dict[int, tuple[Proc, inference_pb2.StepEntry]]:
        """The jobs of the lane's step in flight."""
        done = self.inflight.get(lane)
        if done is None:
            return {}
        return {p.pid: (p, e) for p, e in done.batch}

    @staticmethod
    def _continues(p: Proc, e: inference_pb2.StepEntry) -> bool:
        """May this job of the step in flight be planned into the next one already?"""
        if p.state != State.RUNNING or p.pending_signal or p.forks or p.preempt_after:
            return False
        if not e.sample:   # mid-prompt: its next chunk follows, if it has one
            return len(p.tokens) > e.start_pos + len(e.token_ids)
        grown = len(p.tokens) + 1
        return len(p.output_ids) + 1 < p.max_tokens and not (
            p.context_length and grown >= p.context_length)

    def _sched_job(self, p: Proc, pager: Pager) -> scheduler_pb2.SchedJob:
        # a swapped-out job holds no blocks: it is admitted again like a waiting one
        resident = p.pid in pager and not pager.is_swapped(p.pid)
        computed = pager.num_computed(p.pid) if p.pid in pager else 0
        need = self.k.segments.attach_need(p, pager) if p.shm and p.pid not in pager else None
        return scheduler_pb2.SchedJob(
            pid=p.pid, user=p.user, nice=p.nice, arrival=p.created,
            pending_tokens=len(p.prompt_ids) + len(p.output_ids) - computed,
            context_tokens=computed, blocks_held=p.kv_blocks, resident=resident,
            served_tokens=len(p.output_ids),
            need_blocks=need if need is not None else pager.blocks_needed(
                p.pid, p.user, p.tokens))

    @staticmethod
    def _sched_next(p: Proc, e: inference_pb2.StepEntry, pager: Pager) -> scheduler_pb2.SchedJob:
        """A job of the step in flight, as it will be once that step is done."""
        computed = e.start_pos + len(e.token_ids)
        tokens = len(p.tokens) + (1 if e.sample else 0)
        return scheduler_pb2.SchedJob(
            pid=p.pid, user=p.user, nice=p.nice, arrival=p.created,
            pending_tokens=tokens - computed, context_tokens=computed, blocks_held=p.kv_blocks,
            resident=True, served_tokens=len(p.output_ids),
            need_blocks=pager.blocks_to_append(p.pid, tokens - pager.num_tokens(p.pid)))

    # --- admit: carry out the plan ---------------------------------------------------------

    def _admit(self, lane: str, pager: Pager, plan: scheduler_pb2.StepPlan) -> Work:
        work = Work(lane, pager)
        flying = self._flying(lane)
        with self.table.lock:
            if self.k.pagers.get(base(lane)) is pager:   # else the service restarted meanwhile
                waiting: set[str] = set()   # owners whose freed blocks come a step late
                for pid in plan.preempt:
                    if pid in flying:   # its blocks are in use: it yields once its step ends
                        flying[pid][0].preempt_after = True
                        waiting.add(flying[pid][0].user)
                    else:
                        self.jobs.preempt(self.table.get(pid), "scheduler")
                for slot in plan.slots:
                    proc = self.table.get(slot.pid)
                    if proc is not None and proc.user in waiting and \
                            self._grows(proc, pager, slot.pid in flying):
                        continue   # it was planned on blocks not yet free: next step
                    if slot.pid in flying:
                        entry = self._entry_after(work, proc, pager, slot.num_tokens,
                                                  flying[slot.pid][1])
                    elif proc is not None and proc.state in RUNNABLE and \
                            slot_lane_of(proc) == lane:
                        entry = self._entry(proc, pager, slot.num_tokens)
                    else:
                        continue
                    if entry is not None:
                        if proc.state == State.BLOCKED:
                            self.table.set_state(proc, State.READY)
                        if proc.state != State.RUNNING:
                            self.table.set_state(proc, State.RUNNING)
                        work.batch.append((proc, entry))
            work.io = self.io.take(base(lane))   # what this admit queued, and what waited
            return work

    @staticmethod
    def _grows(proc: Proc, pager: Pager, flying: bool) -> bool:
        """Would running this job now take a free block?"""
        if proc.pid not in pager or pager.is_swapped(proc.pid):
            return True
        more = len(proc.tokens) + (1 if flying else 0) - pager.num_tokens(proc.pid)
        return pager.blocks_to_append(proc.pid, max(more, 0)) > 0

    def _entry(self, proc: Proc, pager: Pager, budget: int) -> inference_pb2.StepEntry | None:
        """Blocks for the job's next chunk; None (job stays READY/BLOCKED) when memory is short,
        which the plan's exact counts make rare."""
        tokens = proc.tokens
        try:
            if proc.pid in pager and pager.is_swapped(proc.pid):
                self.jobs.swap_in(proc, pager)
            if proc.pid not in pager:
                if not (proc.shm and self.k.segments.attach(proc)):   # else shares its blocks
                    cached = pager.admit(proc.pid, proc.user, tokens)
                    metrics.on_prefix(proc.model, len(tokens), cached)
                proc.needs_reset = True
            if pager.num_tokens(proc.pid) < len(tokens):
                self._append(proc, pager, tokens[pager.num_tokens(proc.pid):])
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
            block_table=pager.block_table(proc.pid),
            sample=start + n == len(tokens) and not proc.input_open,
            sampling=proc.sampling, generated_ids=proc.output_ids if reset else [], reset=reset)

    def _entry_after(self, work: Work, proc: Proc, pager: Pager, budget: int,
                     last: inference_pb2.StepEntry) -> inference_pb2.StepEntry | None:
        """The next entry of a job whose step is still in flight: it starts where that step
        ends, and its first token is the one that step samples (a placeholder until then)."""
        tokens = proc.tokens
        if last.sample:
            try:
                self._append(proc, pager, [PLACEHOLDER])
            except OutOfBlocks:
                return None   # it waits a step, READY again once its step is committed
            tokens = [*tokens, PLACEHOLDER]
            work.follows.add(proc.pid)
        proc.kv_blocks = len(pager.block_table(proc.pid))
        start = last.start_pos + len(last.token_ids)
        n = max(1, min(budget, len(tokens) - start))
        return inference_pb2.StepEntry(
            seq_id=proc.pid, token_ids=tokens[start:start + n], start_pos=start,
            block_table=pager.block_table(proc.pid),
            sample=start + n == len(tokens) and not proc.input_open, sampling=proc.sampling)

    def _append(self, proc: Proc, pager: Pager, tokens: list[int]) -> None:
        copies = pager.append(proc.pid, tokens)
        if copies:
            self.io.copies.setdefault(lane_of(proc), []).extend(copies)

    def _drop(self, work: Work, pids: set[int]) -> None:
        """Leave out of this step the jobs whose KV could not be restored (recomputed later)."""
        with self.table.lock:
            for proc, _ in work.batch:
                if proc.pid in pids and proc.state == State.RUNNING and \
                        (work.lane not in self.inflight or
                         proc.pid not in self.inflight[work.lane].pids()):
                    self.table.set_state(proc, State.READY)
            work.batch = [(p, e) for p, e in work.batch if p.pid not in pids]

    # --- when the step in flight answers ---------------------------------------------------

    def _fill(self, work: Work, done: Work, results: list) -> None:
        """Give the next step the tokens the finished one sampled; drop the jobs it ended,
        refused, or that were signalled meanwhile (under the table lock)."""
        by_pid = {p.pid: r for (p, _), r in zip(done.batch, results, strict=True)}
        keep = []
        for proc, entry in work.batch:
            result = by_pid.get(proc.pid)
            if result is not None and not self._carries_on(proc, result):
                if proc.pid in work.follows:
                    work.pager.truncate(proc.pid, len(proc.tokens))
                    proc.kv_blocks = len(work.pager.block_table(proc.pid))
                continue
            if proc.pid in work.follows:
                entry.token_ids[0] = result.token_id
                work.pager.set_token(proc.pid, len(proc.tokens), result.token_id)
            keep.append((proc, entry))
        work.batch = keep

    def _carries_on(self, proc: Proc, result: inference_pb2.StepResult | str) -> bool:
        if isinstance(result, str) or result.error or proc.pending_signal or \
                proc.preempt_after or proc.state != State.RUNNING:
            return False
        return not result.sampled or (result.finish_reason != Exit.STOP and self._continues(
            proc, inference_pb2.StepEntry(sample=True)))

    def _unprepare(self, work: Work) -> None:
        """The step before failed, so this one will not be sent: its jobs wait again and any
        KV it meant to move or fill is recomputed."""
        with self.table.lock:
            moved = [s.proc for s in (*work.io.swap_outs, *work.io.swap_ins)]
            for proc, _ in work.batch:
                self.jobs.lost(proc)
                if proc.state == State.RUNNING:
                    self.table.set_state(proc, State.READY)
            for proc in moved:
                self.jobs.lost(proc)

    # --- step: run the batch, charging faults to their cause --------------------------------

    def _results(self, done: Work) -> list[inference_pb2.StepResult | str]:
        """One result per entry: the engine's, or the reason the job must end."""
        try:
            reply = done.future.result()
            done.answered = time.perf_counter()
            metrics.on_compute(done.model, reply.compute_ms / 1000)
            return list(reply.results)
        except grpc.RpcError as e:
            if e.code() in SERVICE_FAULTS:
                raise ServiceFault(f"Step: {e.code().name}: {e.details()}") from None
            log.warning("step_refused_whole", model=done.model, code=e.code().name,
                        error=e.details(), jobs=len(done.batch))
            return self._isolate(done)

    def _send_step(self, lane: str, entries: list[inference_pb2.StepEntry]
                   ) -> list[inference_pb2.StepResult]:
        stub, model = self._route(lane)
        reply = stub.Step(inference_pb2.StepRequest(model=model, entries=entries), timeout=300)
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
                out.append(self._send_step(work.lane, [alone])[0])
            except grpc.RpcError as e:
                if e.code() in SERVICE_FAULTS:
                    raise ServiceFault(f"Step: {e.code().name}: {e.details()}") from None
                out.append(f"{e.code().name}: {e.details()}")
        return out

    def _requeue(self, lane: str) -> None:
        """The step did not happen: its jobs wait again, and their sampler state is rebuilt
        on the next try (a Step that timed out may still have run: no token is doubled)."""
        with self.table.lock:
            pager = self.k.pagers.get(base(lane))
            for proc in self.table.live():
                if slot_lane_of(proc) == lane and proc.state == State.RUNNING:
                    proc.needs_reset = True
                    if pager is not None and proc.pid in pager and not pager.is_swapped(
                            proc.pid) and pager.num_tokens(proc.pid) > len(proc.tokens):
                        pager.truncate(proc.pid, len(proc.tokens))   # an unfilled placeholder
                    self.table.set_state(proc, State.READY)
                    self.jobs.deliver(proc)

    # --- commit ----------------------------------------------------------------------------

    def _commit(self, work: Work, results: list, seconds: float) -> None:
        total = sum(len(e.token_ids) for _, e in work.batch) or 1
        nxt = self.inflight[work.lane].pids() if work.lane in self.inflight else set()
        with self.table.lock, self.k.journal.batch():   # one transaction: tokens and exits
            if self.k.pagers.get(base(work.lane)) is not work.pager:   # its replica restarted
                return
            rows: list[Tokens] = []
            for (proc, entry), result in zip(work.batch, results, strict=True):
                if proc.state != State.RUNNING:
                    continue
                proc.cpu_seconds += seconds * len(entry.token_ids) / total
                error = result if isinstance(result, str) else result.error
                if error:
                    self.table.set_state(proc, State.READY)
                    self.jobs.end(proc, Exit.ERROR, -1, f"the inference service refused this "
                                  f"job: {error}")
                    continue
                proc.needs_reset = False
                work.pager.mark_computed(proc.pid, entry.start_pos + len(entry.token_ids))
                if result.sampled:
                    rows.append(Tokens(proc.pid, len(proc.output_ids), [result.token_id],
                                       [result.logprob], result.text))
                    self._emit(proc, result)
                    self.table.touch(proc)
                    if proc.stdout_pids and self.k.pipes is not None:
                        self.k.pipes.wrote(proc)
                if proc.pid in nxt:
                    continue   # its next step is in flight: signals wait for that one
                self.table.set_state(proc, State.READY)
                if not self._finished(proc, result):
                    self.jobs.deliver(proc)
                    if proc.preempt_after and proc.state == State.READY:
                        self.jobs.preempt(proc, "scheduler")
                proc.preempt_after = False
            self.k.journal.record_tokens(rows)   # durable before any reader sees them
            self.table.changed.notify_all()
        prompt = sum(max(0, min(e.start_pos + len(e.token_ids), len(p.prompt_ids)) - e.start_pos)
                     for p, e in work.batch)
        metrics.on_step(work.model, seconds, len(work.batch), prompt, len(rows),
                        [r.pid for r in rows])

    def _flush_releases(self) -> None:
        with self.table.lock:   # swaps queued meanwhile stay: they go before the next step
            io = self.io.take_releases()
        if io:
            send_releases(io, self._route)

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
