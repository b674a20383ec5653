"""Named mailboxes: bounded FIFO queues of (sender, payload, sequence) that carry messages
between jobs and programs. Thread-safe; Receive waits on a Condition, never polls.

One lock guards the whole table (the byte budget spans mailboxes); each mailbox has its own
Condition on that lock, so a Send wakes only that mailbox's receivers. Every change is written
through to the Store (sqlite, services/ipc/store.py) before it answers, and the table is read
back from it at start: messages outlive the process.

Policy lives here: each mailbox has an owner and a mode (owner only / group / everyone), and
every call names its Caller (None: the kernel itself, which may do anything).
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from llmasos.services.ipc.store import MEMORY, BoxRow, MsgRow, Store

# Limits (ipc.proto fixes the name length, the payload size and the default capacity).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,63}")
USER_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")   # as the security service names users
MAX_PAYLOAD = 1 << 20             # bytes per message
DEFAULT_CAPACITY = 1024           # messages, when CreateMailbox asks for 0
MAX_CAPACITY = 65536              # messages per mailbox
DEFAULT_BOX_BYTES = 16 << 20      # payload bytes per mailbox, when CreateMailbox asks for 0
MAX_MAILBOXES = 4096
MAX_PER_OWNER = 256               # mailboxes one user may own (admins and the kernel: no limit)
MAX_BYTES = 256 << 20             # payload bytes held by all mailboxes together
MAX_LABEL = 64                    # owner and sender strings
MAX_MEMBERS = 64

OWNER, GROUP, ALL = 0, 1, 2       # ipc.proto's MailboxMode
MODE_NAMES = {OWNER: "owner", GROUP: "group", ALL: "all"}


class IpcError(Exception):
    """Base of the typed errors the servicer maps to status codes."""


class MailboxExists(IpcError):
    pass


class NoSuchMailbox(IpcError):
    pass


class MailboxFull(IpcError):
    pass


class ReceiveTimeout(IpcError):
    pass


class Denied(IpcError):
    pass


class BadRequest(IpcError, ValueError):
    pass


@dataclass(frozen=True)
class Caller:
    """Who a call acts for; admins (root, the "admin" capability) may use any mailbox."""

    user: str
    admin: bool = False


KERNEL: Caller | None = None      # a call without a Caller: the kernel's own, full access


@dataclass(frozen=True)
class Message:
    sender: str
    payload: bytes
    sequence: int   # per mailbox, from 1
    pid: int = 0    # the job whose output this is, if a job's exit sent it


@dataclass(frozen=True)
class MailboxInfo:
    name: str
    owner: str
    depth: int
    capacity: int
    mode: int = OWNER
    members: tuple[str, ...] = ()
    bytes: int = 0
    max_bytes: int = DEFAULT_BOX_BYTES
    created: float = 0.0


@dataclass
class Mailbox:
    name: str
    owner: str
    capacity: int
    ready: threading.Condition
    mode: int = OWNER
    members: tuple[str, ...] = ()
    max_bytes: int = DEFAULT_BOX_BYTES
    created: float = field(default_factory=time.time)
    queue: deque[Message] = field(default_factory=deque)
    last_sequence: int = 0
    bytes: int = 0
    removed: bool = False   # wakes its receivers with NoSuchMailbox

    def info(self) -> MailboxInfo:
        return MailboxInfo(self.name, self.owner, len(self.queue), self.capacity, self.mode,
                           self.members, self.bytes, self.max_bytes, self.created)

    def row(self) -> BoxRow:
        return BoxRow(self.name, self.owner, self.mode, self.members, self.capacity,
                      self.max_bytes, self.last_sequence, self.created)


def check_name(name: str) -> str:
    if NAME_RE.fullmatch(name) is None:
        raise BadRequest(f"bad mailbox name {name!r}: 1..64 chars of [A-Za-z0-9_.:@/-], "
                         "starting with a letter or digit")
    return name


def check_label(what: str, value: str) -> str:
    if len(value) > MAX_LABEL:
        raise BadRequest(f"{what} is {len(value)} chars; at most {MAX_LABEL}")
    return value


def check_access(mode: int, members: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    if mode not in MODE_NAMES:
        raise BadRequest(f"mode {mode} unknown; use owner (0), group (1) or all (2)")
    if mode != GROUP and members:
        raise BadRequest("members are for mode group only")
    if mode == GROUP and not members:
        raise BadRequest("mode group needs at least one member (user names)")
    if len(members) > MAX_MEMBERS:
        raise BadRequest(f"{len(members)} members; at most {MAX_MEMBERS}")
    bad = [m for m in members if USER_RE.fullmatch(m) is None]
    if bad:
        raise BadRequest(f"bad member names {bad}: user names are [a-z][a-z0-9_-]{{0,31}}")
    return tuple(sorted(set(members)))


def may_use(box: Mailbox, caller: Caller | None) -> bool:
    """Send and receive: the owner, admins, the kernel, and whom the mode lets in."""
    if caller is None or caller.admin or caller.user == box.owner or box.mode == ALL:
        return True
    return box.mode == GROUP and caller.user in box.members


def may_remove(box: Mailbox, caller: Caller | None) -> bool:
    return caller is None or caller.admin or caller.user == box.owner


class Mailboxes:
    def __init__(self, max_bytes: int = MAX_BYTES, max_mailboxes: int = MAX_MAILBOXES,
                 max_waiters: int = 1 << 30, store: Store | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_mailboxes = max_mailboxes
        self.max_waiters = max_waiters  # blocked receivers; the server's threads are finite
        self.store = store or Store(MEMORY)
        self._lock = threading.Lock()
        self._boxes: dict[str, Mailbox] = {}
        self._bytes = 0
        self._waiters = 0
        self._load()

    def _load(self) -> None:
        """Rebuild the table from the store (a restart finds what the last run left)."""
        for row in self.store.boxes():
            self._boxes[row.name] = Mailbox(row.name, row.owner, row.capacity,
                                            threading.Condition(self._lock), row.mode,
                                            row.members, row.max_bytes, row.created,
                                            last_sequence=row.last_sequence)
        for m in self.store.messages():
            box = self._boxes.get(m.name)
            if box is not None:
                box.queue.append(Message(m.sender, m.payload, m.sequence, m.pid))
                box.bytes += len(m.payload)
                self._bytes += len(m.payload)

    def _get(self, name: str, caller: Caller | None = KERNEL) -> Mailbox:
        box = self._boxes.get(name)
        if box is None:
            raise NoSuchMailbox(f"no mailbox named {name!r}; see `ipcs`")
        if not may_use(box, caller):
            raise Denied(f"mailbox {name!r} belongs to {box.owner} "
                         f"(mode {MODE_NAMES[box.mode]}); ask them to let you in")
        return box

    def create(self, name: str, owner: str = "", capacity: int = 0, *, mode: int = OWNER,
               members: list[str] | tuple[str, ...] = (), max_bytes: int = 0,
               caller: Caller | None = KERNEL) -> MailboxInfo:
        check_name(name)
        if caller is not None and owner and owner != caller.user and not caller.admin:
            raise Denied("only an admin may create a mailbox for another user")
        owner = check_label("owner", owner or (caller.user if caller else ""))
        if capacity < 0 or capacity > MAX_CAPACITY:
            raise BadRequest(f"capacity {capacity} out of range [0, {MAX_CAPACITY}]")
        if max_bytes < 0 or max_bytes > self.max_bytes:
            raise BadRequest(f"max_bytes {max_bytes} out of range [0, {self.max_bytes}]")
        members = check_access(mode, members)
        with self._lock:
            if name in self._boxes:
                raise MailboxExists(f"mailbox {name!r} already exists")
            if len(self._boxes) >= self.max_mailboxes:
                raise MailboxFull(f"at most {self.max_mailboxes} mailboxes")
            if caller is not None and not caller.admin and \
                    sum(b.owner == owner for b in self._boxes.values()) >= MAX_PER_OWNER:
                raise MailboxFull(f"{owner} owns {MAX_PER_OWNER} mailboxes already; "
                                  "remove some with `ipcrm`")
            box = Mailbox(name, owner, capacity or DEFAULT_CAPACITY,
                          threading.Condition(self._lock), mode, members,
                          max_bytes or min(DEFAULT_BOX_BYTES, self.max_bytes))
            self.store.create(box.row())
            self._boxes[name] = box
            return box.info()

    def send(self, name: str, payload: bytes, sender: str = "", *, pid: int = 0,
             caller: Caller | None = KERNEL) -> int:
        """Append a message; return its sequence number. Never blocks: full → MailboxFull."""
        if len(payload) > MAX_PAYLOAD:
            raise BadRequest(f"payload of {len(payload)} bytes; at most {MAX_PAYLOAD}")
        check_label("sender", sender)
        with self._lock:
            box = self._get(name, caller)
            if len(box.queue) >= box.capacity:
                raise MailboxFull(f"mailbox {name!r} is full ({box.capacity} messages); "
                                  "a receiver must take some first")
            if box.bytes + len(payload) > box.max_bytes:
                raise MailboxFull(f"mailbox {name!r} is full ({box.bytes} of {box.max_bytes} "
                                  "bytes held); a receiver must take some first")
            if self._bytes + len(payload) > self.max_bytes:
                raise MailboxFull(f"IPC memory budget of {self.max_bytes} bytes is used up")
            msg = Message(sender, bytes(payload), box.last_sequence + 1, pid)
            self.store.put(MsgRow(name, msg.sequence, sender, pid, msg.payload))
            box.last_sequence = msg.sequence
            box.queue.append(msg)
            box.bytes += len(payload)
            self._bytes += len(payload)
            box.ready.notify()
            return msg.sequence

    def receive(self, name: str, timeout: float = 0.0,
                alive: Callable[[], bool] | None = None, *,
                caller: Caller | None = KERNEL) -> Message:
        """Take the oldest message, waiting up to `timeout` seconds for one. `alive` says whether
        the caller still wants it (a cancelled RPC); wake() makes a waiter look again."""
        with self._lock:
            box = self._get(name, caller)
            if not box.queue and timeout > 0:
                self._wait(box, timeout, alive)
            if box.removed:
                raise NoSuchMailbox(f"mailbox {name!r} was removed while we waited")
            if alive is not None and not alive():
                if box.queue:
                    box.ready.notify()  # we were woken for a message we will not take
                raise ReceiveTimeout(f"receiver on {name!r} went away")
            if not box.queue:
                raise ReceiveTimeout(f"no message in {name!r} within {timeout:g} s")
            msg = box.queue[0]
            self.store.take(name, msg.sequence)
            box.queue.popleft()
            box.bytes -= len(msg.payload)
            self._bytes -= len(msg.payload)
            return msg

    def _wait(self, box: Mailbox, timeout: float, alive: Callable[[], bool] | None) -> None:
        """Wait (lock held) until box has a message or is removed, the timeout passes or
        alive() is False."""
        if self._waiters >= self.max_waiters:
            raise MailboxFull(f"too many blocked receivers (at most {self.max_waiters})")
        self._waiters += 1
        deadline = time.monotonic() + timeout
        try:
            while not box.queue and not box.removed and (alive is None or alive()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                box.ready.wait(remaining)
        finally:
            self._waiters -= 1

    def remove(self, name: str, caller: Caller | None = KERNEL) -> int:
        """Delete a mailbox and its messages (owner or admin); return how many were dropped."""
        with self._lock:
            box = self._boxes.get(name)
            if box is None:
                raise NoSuchMailbox(f"no mailbox named {name!r}; see `ipcs`")
            if not may_remove(box, caller):
                raise Denied(f"mailbox {name!r} belongs to {box.owner}; only they or an admin "
                             "may remove it")
            self.store.remove(name)
            del self._boxes[name]
            box.removed = True
            box.ready.notify_all()
            self._bytes -= box.bytes
            return len(box.queue)

    def stat(self, name: str, caller: Caller | None = KERNEL) -> MailboxInfo:
        """One mailbox, if the caller may use it (NoSuchMailbox / Denied otherwise)."""
        with self._lock:
            return self._get(name, caller).info()

    def wake(self, name: str) -> None:
        """Make every receiver waiting on name re-check its condition (e.g. after a cancel)."""
        with self._lock:
            box = self._boxes.get(name)
            if box is not None:
                box.ready.notify_all()

    def list_mailboxes(self, caller: Caller | None = KERNEL) -> list[MailboxInfo]:
        """The mailboxes the caller may use, by name."""
        with self._lock:
            return [b.info() for b in sorted(self._boxes.values(), key=lambda b: b.name)
                    if may_use(b, caller)]

    @property
    def waiters(self) -> int:
        """Receivers blocked right now."""
        with self._lock:
            return self._waiters

    @property
    def bytes_held(self) -> int:
        with self._lock:
            return self._bytes
