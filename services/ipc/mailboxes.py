"""Named mailboxes: bounded FIFO queues of (sender, payload, sequence) that carry messages
between jobs and programs. Thread-safe; Receive waits on a Condition, never polls.

One lock guards the whole table (the byte budget spans mailboxes); each mailbox has its own
Condition on that lock, so a Send wakes only that mailbox's receivers.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

# Limits (ipc.proto fixes the name length, the payload size and the default capacity).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,63}")
MAX_PAYLOAD = 1 << 20             # bytes per message
DEFAULT_CAPACITY = 1024           # messages, when CreateMailbox asks for 0
MAX_CAPACITY = 65536              # messages per mailbox
MAX_MAILBOXES = 4096
MAX_BYTES = 256 << 20             # payload bytes held by all mailboxes together
MAX_LABEL = 64                    # owner and sender strings


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


class BadRequest(IpcError, ValueError):
    pass


@dataclass(frozen=True)
class Message:
    sender: str
    payload: bytes
    sequence: int   # per mailbox, from 1


@dataclass(frozen=True)
class MailboxInfo:
    name: str
    owner: str
    depth: int
    capacity: int


@dataclass
class Mailbox:
    name: str
    owner: str
    capacity: int
    ready: threading.Condition
    queue: deque[Message] = field(default_factory=deque)
    last_sequence: int = 0


def check_name(name: str) -> str:
    if NAME_RE.fullmatch(name) is None:
        raise BadRequest(f"bad mailbox name {name!r}: 1..64 chars of [A-Za-z0-9_.:@/-], "
                         "starting with a letter or digit")
    return name


def check_label(what: str, value: str) -> str:
    if len(value) > MAX_LABEL:
        raise BadRequest(f"{what} is {len(value)} chars; at most {MAX_LABEL}")
    return value


class Mailboxes:
    def __init__(self, max_bytes: int = MAX_BYTES, max_mailboxes: int = MAX_MAILBOXES,
                 max_waiters: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self.max_mailboxes = max_mailboxes
        self.max_waiters = max_waiters  # blocked receivers; the server's threads are finite
        self._lock = threading.Lock()
        self._boxes: dict[str, Mailbox] = {}
        self._bytes = 0
        self._waiters = 0

    def _get(self, name: str) -> Mailbox:
        box = self._boxes.get(name)
        if box is None:
            raise NoSuchMailbox(f"no mailbox named {name!r}")
        return box

    def create(self, name: str, owner: str = "", capacity: int = 0) -> MailboxInfo:
        check_name(name)
        check_label("owner", owner)
        if capacity < 0 or capacity > MAX_CAPACITY:
            raise BadRequest(f"capacity {capacity} out of range [0, {MAX_CAPACITY}]")
        with self._lock:
            if name in self._boxes:
                raise MailboxExists(f"mailbox {name!r} already exists")
            if len(self._boxes) >= self.max_mailboxes:
                raise MailboxFull(f"at most {self.max_mailboxes} mailboxes")
            box = Mailbox(name, owner, capacity or DEFAULT_CAPACITY,
                          threading.Condition(self._lock))
            self._boxes[name] = box
            return MailboxInfo(name, owner, 0, box.capacity)

    def send(self, name: str, payload: bytes, sender: str = "") -> int:
        """Append a message; return its sequence number. Never blocks: full → MailboxFull."""
        if len(payload) > MAX_PAYLOAD:
            raise BadRequest(f"payload of {len(payload)} bytes; at most {MAX_PAYLOAD}")
        check_label("sender", sender)
        with self._lock:
            box = self._get(name)
            if len(box.queue) >= box.capacity:
                raise MailboxFull(f"mailbox {name!r} is full ({box.capacity} messages)")
            if self._bytes + len(payload) > self.max_bytes:
                raise MailboxFull(f"IPC memory budget of {self.max_bytes} bytes is used up")
            box.last_sequence += 1
            box.queue.append(Message(sender, bytes(payload), box.last_sequence))
            self._bytes += len(payload)
            box.ready.notify()
            return box.last_sequence

    def receive(self, name: str, timeout: float = 0.0,
                alive: Callable[[], bool] | None = None) -> Message:
        """Take the oldest message, waiting up to `timeout` seconds for one. `alive` says whether
        the caller still wants it (a cancelled RPC); wake() makes a waiter look again."""
        with self._lock:
            box = self._get(name)
            if not box.queue and timeout > 0:
                self._wait(box, timeout, alive)
            if alive is not None and not alive():
                if box.queue:
                    box.ready.notify()  # we were woken for a message we will not take
                raise ReceiveTimeout(f"receiver on {name!r} went away")
            if not box.queue:
                raise ReceiveTimeout(f"no message in {name!r} within {timeout:g} s")
            msg = box.queue.popleft()
            self._bytes -= len(msg.payload)
            return msg

    def _wait(self, box: Mailbox, timeout: float, alive: Callable[[], bool] | None) -> None:
        """Wait (lock held) until box has a message, the timeout passes or alive() is False."""
        if self._waiters >= self.max_waiters:
            raise MailboxFull(f"too many blocked receivers (at most {self.max_waiters})")
        self._waiters += 1
        deadline = time.monotonic() + timeout
        try:
            while not box.queue and (alive is None or alive()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                box.ready.wait(remaining)
        finally:
            self._waiters -= 1

    def wake(self, name: str) -> None:
        """Make every receiver waiting on name re-check its condition (e.g. after a cancel)."""
        with self._lock:
            box = self._boxes.get(name)
            if box is not None:
                box.ready.notify_all()

    def list_mailboxes(self) -> list[MailboxInfo]:
        with self._lock:
            return [MailboxInfo(b.name, b.owner, len(b.queue), b.capacity)
                    for b in sorted(self._boxes.values(), key=lambda b: b.name)]

    @property
    def waiters(self) -> int:
        """Receivers blocked right now."""
        with self._lock:
            return self._waiters

    @property
    def bytes_held(self) -> int:
        with self._lock:
            return self._bytes
