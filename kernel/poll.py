"""Poll (syscall 29): one stream that follows many jobs' output, a front end's epoll.

A front end serving N streams (the HTTP gateway, a batch client) would hold N Read streams, each
woken and sent once per step; a Poll is woken once per step and sends one message holding every
followed job's new output. The caller adds jobs (a ReadRequest each: pid and offset) whenever it
likes on the request side of the stream, which a reader thread drains. A job it may not follow
(not found, not its own, a bad offset) is refused in an entry of its own, so one bad pid never
ends the other jobs' stream. A job leaves the set with its last entry (done). The stream ends
once the caller has closed its side and the set is empty, or when the caller goes away.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from llmasos.kernel.proctable import Proc, ProcessTable, State
from llmasos.proto import kernel_pb2
from llmasos.syscalls import SyscallError

log = structlog.get_logger()
ENDED = (State.ZOMBIE, State.REAPED)
MAX_FOLLOWED = 4096     # jobs one Poll follows at once; past it a job is refused
CHUNK_BYTES = 1 << 20   # output past this in one message waits for the next (gRPC caps at 4 MiB)


@dataclass
class Followed:
    proc: Proc
    tokens: int   # output tokens already sent
    chars: int    # characters of text already sent


class Poll:
    """One Poll stream's set of jobs. `find` is the syscall's lookup (NOT_FOUND, or
    PERMISSION_DENIED for another user's job), `check` the table's argument check, `audit` hears
    each refusal and each job of another user's followed (code, pid)."""

    def __init__(self, table: ProcessTable, find: Callable[[int], Proc],
                 check: Callable[[Any], None], audit: Callable[[str, str, Any], None]) -> None:
        self.table, self.find, self.check, self.audit = table, find, check, audit
        self.news = threading.Condition(table.lock)   # touched with any followed job
        self.followed: dict[int, Followed] = {}       # pid → what was sent, in order added
        self.refused: list[kernel_pb2.PollEntry] = []
        self.closed = False                           # the caller sent its last request

    # --- the request side (a reader thread) ------------------------------------------------

    def drain(self, requests: Iterator[kernel_pb2.PollRequest]) -> None:
        """Add each request's jobs until the caller closes its side or the call ends."""
        try:
            for request in requests:
                for follow in request.follow:
                    self.add(follow)
        except grpc.RpcError:
            pass   # the call ended (the caller went away): the reply side sees it too
        except Exception:
            log.exception("poll_requests_crashed")
        finally:
            with self.news:
                self.closed = True
                self.news.notify_all()

    def add(self, follow: kernel_pb2.ReadRequest) -> None:
        try:
            self.check(follow)
            proc = self.find(follow.pid)
            with self.news:
                self._follow(proc, follow.offset)
                self.news.notify_all()
        except SyscallError as e:
            self.audit(e.code, e.message, follow)
            with self.news:
                self.refused.append(kernel_pb2.PollEntry(pid=follow.pid, error_code=e.code,
                                                         error=e.message))
                self.news.notify_all()
            return
        self.audit("OK", "", follow)

    def _follow(self, proc: Proc, offset: int) -> None:
        if proc.pid in self.followed:
            raise SyscallError("INVALID_ARGUMENT", f"process {proc.pid} is already followed "
                               "by this Poll")
        if len(self.followed) >= MAX_FOLLOWED:
            raise SyscallError("RESOURCE_EXHAUSTED", f"a Poll follows at most {MAX_FOLLOWED} "
                               "jobs at once; open another Poll")
        if offset > len(proc.output_ids):
            raise SyscallError("OUT_OF_RANGE", f"offset {offset} is past the "
                               f"{len(proc.output_ids)} tokens process {proc.pid} has produced")
        chars = proc.text_ends[offset - 1] if offset else 0
        self.followed[proc.pid] = Followed(proc, offset, chars)
        self.table.follow(proc.pid, self.news)

    # --- the reply side (the call's thread) ------------------------------------------------

    def chunks(self, active: Callable[[], bool]) -> Iterator[kernel_pb2.PollChunk]:
        try:
            while True:
                with self.news:
                    while not (entries := self._take()) and not self._over() and active():
                        self.news.wait(1.0)
                if not entries or not active():
                    return
                yield kernel_pb2.PollChunk(entries=entries)
        finally:
            with self.news:
                for pid in self.followed:
                    self.table.unfollow(pid, self.news)
                self.followed.clear()

    def _over(self) -> bool:
        return self.closed and not self.followed and not self.refused

    def _take(self) -> list[kernel_pb2.PollEntry]:
        """Every followed job's news since the last message (under the lock)."""
        entries, self.refused, size = self.refused, [], 0
        for pid, f in list(self.followed.items()):
            proc, done = f.proc, f.proc.state in ENDED
            if len(proc.output_ids) == f.tokens and len(proc.text) == f.chars and not done:
                continue
            text, ids = proc.text[f.chars:], proc.output_ids[f.tokens:]
            chunk = kernel_pb2.ReadChunk(
                text=text, token_ids=ids, logprobs=proc.output_logprobs[f.tokens:f.tokens +
                                                                        len(ids)],
                done=done, exit_reason=int(proc.exit_reason) if done else 0)
            f.chars, f.tokens = f.chars + len(text), f.tokens + len(ids)
            entries.append(kernel_pb2.PollEntry(pid=pid, chunk=chunk))
            if done:
                del self.followed[pid]
                self.table.unfollow(pid, self.news)
            size += len(text) + 9 * len(ids)
            if size > CHUNK_BYTES:
                break   # the rest goes in the next message, sent at once
        return entries
