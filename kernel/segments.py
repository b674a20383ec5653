"""Shared memory for LLM jobs: named KV segments (System V's shmget/shmat, for KV blocks).

A segment is a prefix computed once by a job of its own (its "holder": prefill only, never
sampling) whose blocks then stay pinned. A job that attaches it at Spawn forks the holder's
blocks copy-on-write (kernel/pager.py's fork), so the shared part costs no block and no compute;
it needs only that its prompt's tokens begin with the segment's (the kernel tokenizes the
segment's text + the job's prompt as one, so output equals giving the prefix as text).

Owner and mode decide who may attach (owner only, a group of users, everyone; admins always).
The holder's blocks count against the owner's KV quota. Removal marks the segment: no new
attach, and the holder ends (freeing its blocks) once no attached job is left.
Everything here runs under the table lock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from llmasos.kernel.proctable import Exit, Proc, State
from llmasos.kernel.replicas import lane_of
from llmasos.proto import kernel_pb2
from llmasos.syscalls import SyscallError

OWNER, GROUP, ALL = 0, 1, 2   # kernel.proto MboxMode


@dataclass
class Segment:
    name: str
    owner: str
    mode: int
    members: list[str]
    model: str
    text: str
    holder: Proc
    attached: set[int] = field(default_factory=set)
    removed: bool = False
    created: float = field(default_factory=time.time)

    @property
    def tokens(self) -> list[int]:
        return self.holder.prompt_ids

    def may_attach(self, user: str, admin: bool) -> bool:
        return admin or user == self.owner or self.mode == ALL or (
            self.mode == GROUP and user in self.members)


class Segments:
    def __init__(self, k: object) -> None:
        self.k = k
        self.by_name: dict[str, Segment] = {}   # [table.lock]

    def create(self, seg: Segment) -> None:
        if seg.name in self.by_name:
            raise SyscallError("ALREADY_EXISTS", f"a segment named {seg.name!r} exists; "
                               "remove it with `ipcrm -s` or choose another name")
        seg.holder.segment = seg.name
        self.by_name[seg.name] = seg

    def get(self, name: str, user: str, admin: bool) -> Segment:
        seg = self.by_name.get(name)
        if seg is None or seg.removed:
            raise SyscallError("NOT_FOUND", f"no KV segment {name!r}; see `ipcs`")
        if not seg.may_attach(user, admin):
            raise SyscallError("PERMISSION_DENIED", f"segment {name!r} belongs to {seg.owner} "
                               "and is not shared with you")
        return seg

    def ready(self, seg: Segment) -> bool:
        pager = self.k.pagers.get(lane_of(seg.holder))   # the replica the holder runs on
        p = seg.holder
        return pager is not None and p.pid in pager and not pager.is_swapped(p.pid) and \
            pager.num_computed(p.pid) == len(p.prompt_ids)

    def attach_need(self, proc: Proc, pager: object) -> int | None:
        """Exact free blocks an attaching job takes: its own tokens' blocks, plus a copy of
        the segment's partly filled last block; None when it will not share."""
        seg = self.by_name.get(proc.shm)
        if seg is None or not self.ready(seg) or not self._fits(seg, proc):
            return None
        shared = len(pager.block_table(seg.holder.pid))
        partial = len(seg.tokens) % pager.block_size != 0
        return pager.blocks_for(len(proc.tokens)) - shared + partial

    @staticmethod
    def _fits(seg: Segment, proc: Proc) -> bool:
        n = len(seg.tokens)
        return len(proc.tokens) > n and proc.tokens[:n] == seg.tokens and \
            lane_of(proc) == lane_of(seg.holder)

    def attach(self, proc: Proc) -> bool:
        """At admission: share the segment's blocks (True), or compute it all (False: the
        segment is not resident now, or the prompt does not begin with its tokens)."""
        seg = self.by_name.get(proc.shm)
        if seg is None or not self.ready(seg) or not self._fits(seg, proc):
            return False
        self.k.pagers[lane_of(seg.holder)].fork(seg.holder.pid, proc.pid)
        return True

    def remove(self, seg: Segment) -> None:
        seg.removed = True
        self.collect(seg)

    def detach(self, proc: Proc) -> None:
        """A job ended; a removed segment goes with its last attached job."""
        seg = self.by_name.get(proc.shm)
        if seg is not None:
            seg.attached.discard(proc.pid)
            self.collect(seg)

    def collect(self, seg: Segment) -> None:
        if seg.removed and not seg.attached:
            self.by_name.pop(seg.name, None)
            if seg.holder.state not in (State.ZOMBIE, State.REAPED):
                self.k.executor.end(seg.holder, Exit.KILLED, 0, f"segment {seg.name} removed")
            if seg.holder.state == State.ZOMBIE:
                self.k.table.reap(seg.holder)   # nobody waits for a holder

    def held_blocks(self, user: str, model: str) -> int:
        """Blocks the user's segments pin in a model's pool (for the KV quota)."""
        return sum(s.holder.kv_blocks for s in self.by_name.values()
                   if s.owner == user and s.model == model)

    def info(self, seg: Segment) -> kernel_pb2.ShmInfo:
        return kernel_pb2.ShmInfo(
            name=seg.name, owner=seg.owner, mode=seg.mode, members=seg.members,
            model=seg.model, tokens=len(seg.tokens), blocks=seg.holder.kv_blocks,
            attached=sorted(seg.attached), removed=seg.removed, created_unix=seg.created)
