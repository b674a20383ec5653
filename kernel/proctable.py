"""The process table: every LLM job the kernel knows, keyed by pid.

PIDs are allocated monotonically and never reused. A job's state moves only along TRANSITIONS
(illegal moves raise). Zombies keep their exit status until Wait reaps them or their TTL expires.
Locking (xv6's proc.h style): `ProcessTable.lock` guards the table and every field of every
Proc; the step loop and syscall handlers take it only to decide and record, never across an
RPC. Fields marked [loop] are written only by the step loop (under the lock).
"""

from __future__ import annotations

import enum
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


class State(enum.IntEnum):
    """Numbers match kernel.proto's ProcState."""

    NEW = 1
    READY = 2
    RUNNING = 3
    BLOCKED = 4
    STOPPED = 5
    ZOMBIE = 6
    REAPED = 7


class Exit(enum.IntEnum):
    """Numbers match kernel.proto's ExitReason."""

    NONE = 0
    STOP = 1
    LENGTH = 2
    KILLED = 3
    ERROR = 4
    SHUTDOWN = 5


S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    S.NEW:     frozenset({S.READY, S.STOPPED, S.ZOMBIE}),
    S.READY:   frozenset({S.RUNNING, S.BLOCKED, S.STOPPED, S.ZOMBIE}),
    S.RUNNING: frozenset({S.READY, S.BLOCKED, S.STOPPED, S.ZOMBIE}),
    S.BLOCKED: frozenset({S.READY, S.STOPPED, S.ZOMBIE}),
    S.STOPPED: frozenset({S.READY, S.ZOMBIE}),
    S.ZOMBIE:  frozenset({S.REAPED}),
    S.REAPED:  frozenset(),
}


# Transitions that Wait and Read sleep for (new output is announced by the step loop).
WAKES = frozenset({S.STOPPED, S.ZOMBIE, S.REAPED})


class IllegalTransition(Exception):
    pass


@dataclass
class Proc:
    pid: int
    user: str
    uid: int
    ppid: int
    model: str
    nice: int
    name: str = ""
    state: State = State.NEW
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    text: str = ""                      # emitted output text
    text_ends: list[int] = field(default_factory=list)   # len(text) after each output token
    sampling: Any = None                # the SamplingParams proto message
    max_tokens: int = 256
    context_length: int = 0             # the model's longest sequence
    kv_blocks: int = 0
    computed: int = 0                   # tokens whose KV is in the cache
    created: float = field(default_factory=time.time)
    started: float = 0.0
    first_token: float = 0.0
    ended: float = 0.0
    exit_status: int = 0
    exit_reason: Exit = Exit.NONE
    exit_message: str = ""
    cpu_seconds: float = 0.0
    preemptions: int = 0
    pending_signal: int = 0             # delivered at the next token boundary (xv6's p->killed)
    forks: list[int] = field(default_factory=list)   # sibling samples (n > 1) still to fork
    fork_pending: bool = False          # a sibling sample waiting to share its parent's KV
    swap_handle: int = 0                # where the inference service keeps its swapped-out KV
    needs_reset: bool = False           # [loop] the engine must rebuild its sampler state
    preempt_after: bool = False         # [loop] the scheduler preempted it while its step flew
    # pipes (kernel/pipes.py)
    stdin_pid: int = 0                  # the job whose output is its input
    stdout_pids: list[int] = field(default_factory=list)   # the jobs reading its output
    input_open: bool = False            # its writer still runs: prefill only, never sample
    stdin_exit: Exit = Exit.NONE        # how its writer ended
    ignore_sigpipe: bool = False
    shm: str = ""                       # the KV segment it attached (kernel/segments.py)
    segment: str = ""                   # the KV segment it holds (prefill only, pinned)
    stdout_mailbox: str = ""            # where its text goes when it ends (kernel/ipc_delivery.py)
    prompt_text: str = ""               # a hosted model's prompt (kernel/remote_jobs.py): no ids
    replica: int = -1                   # which replica of its model runs it; -1 until the step
                                        # loop places it (kernel/replicas.py)
    slot: int = -1                      # a pp model's job: which of its replica's steps in
                                        # flight carries it (kernel/replicas.py); -1 until set

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids


# A Wait's reply can be lost after the job was reaped (the caller's deadline passed while it was
# in flight); the same Wait again gets the same answer for this long, then NOT_FOUND.
ANSWERED_KEEP_S = 300.0
ANSWERED_KEEP_MAX = 4096


class ProcessTable:
    """pid → Proc with O(1) lookups; iteration is in pid order (dicts keep insertion order)."""

    def __init__(self, zombie_ttl: float = 600.0) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # notified on exits, stops and new output
        self.watchers: dict[int, threading.Condition] = {}   # pid → its Read and Wait callers
        self.followers: dict[int, set[threading.Condition]] = {}   # pid → the Polls following it
        self.procs: dict[int, Proc] = {}
        self.next_pid = 1
        self.zombie_ttl = zombie_ttl
        self.answered: OrderedDict[int, tuple[float, Proc]] = OrderedDict()  # reaped by a Wait

    def spawn(self, **fields: Any) -> Proc:
        with self.lock:
            proc = Proc(pid=self.next_pid, **fields)
            self.next_pid += 1
            self.procs[proc.pid] = proc
            self.changed.notify_all()
            return proc

    def get(self, pid: int) -> Proc | None:
        return self.procs.get(pid)

    def set_state(self, proc: Proc, new: State) -> None:
        with self.lock:
            if new not in TRANSITIONS[proc.state]:
                raise IllegalTransition(f"pid {proc.pid}: {proc.state.name} -> {new.name}")
            proc.state = new
            if new == State.RUNNING and not proc.started:
                proc.started = time.time()
            if new in WAKES:   # the step loop's READY <-> RUNNING moves wake nobody
                self.changed.notify_all()
                self.touch(proc)

    def watch(self, proc: Proc) -> threading.Condition:
        """The condition one job's Read and Wait callers sleep on: notified only for that job
        (touch), so a step's output wakes each reader once and no waiter at all."""
        with self.lock:
            if proc.state == State.REAPED:
                return threading.Condition(self.lock)   # ended: nothing will notify it
            return self.watchers.setdefault(proc.pid, threading.Condition(self.lock))

    def follow(self, pid: int, news: threading.Condition) -> None:
        """Notify `news` (a Poll's, on this table's lock) whenever the job is touched."""
        with self.lock:
            self.followers.setdefault(pid, set()).add(news)

    def unfollow(self, pid: int, news: threading.Condition) -> None:
        with self.lock:
            polls = self.followers.get(pid)
            if polls is not None:
                polls.discard(news)
                if not polls:
                    del self.followers[pid]

    def touch(self, proc: Proc) -> None:
        """The job has new output or a new state its watchers wait for (under the lock)."""
        watchers = self.watchers.get(proc.pid)
        if watchers is not None:
            watchers.notify_all()
            if proc.state == State.REAPED:
                del self.watchers[proc.pid]
        for news in self.followers.get(proc.pid, ()):
            news.notify_all()

    def exit(self, proc: Proc, reason: Exit, status: int = 0, message: str = "") -> None:
        """Make a live job a zombie with its exit status."""
        with self.lock:
            self.set_state(proc, State.ZOMBIE)
            proc.exit_reason, proc.exit_status, proc.exit_message = reason, status, message
            proc.ended = time.time()

    def reap(self, proc: Proc, answered: bool = False) -> None:
        """Gone from the table; `answered` (a Wait handed out its status) keeps it for a Wait
        asked again (answered_wait)."""
        with self.lock:
            self.set_state(proc, State.REAPED)
            del self.procs[proc.pid]
            if answered:
                self.answered[proc.pid] = (time.monotonic(), proc)
                while len(self.answered) > ANSWERED_KEEP_MAX:
                    self.answered.popitem(last=False)

    def answered_wait(self, pid: int) -> Proc | None:
        """A job a Wait reaped within ANSWERED_KEEP_S, for the same Wait asked again."""
        with self.lock:
            now = time.monotonic()
            while self.answered and now - next(iter(self.answered.values()))[0] > \
                    ANSWERED_KEEP_S:
                self.answered.popitem(last=False)
            kept = self.answered.get(pid)
            return kept[1] if kept else None

    def reap_expired(self, now: float | None = None) -> list[int]:
        """Reap zombies nobody waited for within the TTL."""
        now = time.time() if now is None else now
        with self.lock:
            old = [p for p in self.procs.values()
                   if p.state == State.ZOMBIE and now - p.ended > self.zombie_ttl]
            for p in old:
                self.reap(p)
            return [p.pid for p in old]

    def live(self) -> list[Proc]:
        with self.lock:
            return [p for p in self.procs.values() if p.state not in (State.ZOMBIE, State.REAPED)]

    def listing(self, user: str | None = None) -> list[Proc]:
        with self.lock:
            procs = list(self.procs.values())
        return procs if user is None else [p for p in procs if p.user == user]

    def __len__(self) -> int:
        return len(self.procs)
