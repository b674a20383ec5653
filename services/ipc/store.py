"""Where mailboxes live between restarts: one sqlite3 database in WAL mode.

Every change is written through before the call answers, so a message that Send acknowledged
survives `kill -9` of the service: a WAL commit is in the file (the OS page cache) when it
returns. synchronous=NORMAL syncs the WAL to disk at checkpoints only, so a power cut may lose
the last commits; `sync=full` (service option) pays an fsync per change to close that gap.
The caller (Mailboxes) serialises every call under its lock; the store itself does not lock.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS mailbox (
    name TEXT PRIMARY KEY, owner TEXT NOT NULL, mode INTEGER NOT NULL, members TEXT NOT NULL,
    capacity INTEGER NOT NULL, max_bytes INTEGER NOT NULL, last_sequence INTEGER NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS message (
    name TEXT NOT NULL, sequence INTEGER NOT NULL, sender TEXT NOT NULL, pid INTEGER NOT NULL,
    payload BLOB NOT NULL, PRIMARY KEY (name, sequence)) WITHOUT ROWID;
"""
MEMORY = ":memory:"   # no state dir: a store that lives as long as the process


@dataclass(frozen=True)
class BoxRow:
    name: str
    owner: str
    mode: int
    members: tuple[str, ...]
    capacity: int
    max_bytes: int
    last_sequence: int
    created: float


@dataclass(frozen=True)
class MsgRow:
    name: str
    sequence: int
    sender: str
    pid: int
    payload: bytes


def db_path(state_dir: str) -> str:
    """<state_dir>/ipc/mailboxes.db (folder 0700), or MEMORY when there is no state dir."""
    if not state_dir:
        return MEMORY
    folder = Path(state_dir) / "ipc"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return str(folder / "mailboxes.db")


class Store:
    def __init__(self, path: str = MEMORY, sync: str = "normal") -> None:
        if sync not in ("normal", "full"):
            raise ValueError(f"sync must be normal or full, got {sync!r}")
        self.path = path
        # isolation_level=None: we say BEGIN/COMMIT ourselves; one connection, used under a lock.
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        if path != MEMORY:
            os.chmod(path, 0o600)
            self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={sync.upper()}")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- reading everything back at start ---------------------------------------------------

    def boxes(self) -> list[BoxRow]:
        rows = self.db.execute("SELECT name, owner, mode, members, capacity, max_bytes, "
                               "last_sequence, created FROM mailbox ORDER BY name")
        return [BoxRow(n, o, m, tuple(filter(None, mem.split(","))), c, b, s, t)
                for n, o, m, mem, c, b, s, t in rows]

    def messages(self) -> list[MsgRow]:
        rows = self.db.execute("SELECT name, sequence, sender, pid, payload FROM message "
                               "ORDER BY name, sequence")
        return [MsgRow(n, s, who, pid, bytes(p)) for n, s, who, pid, p in rows]

    # -- write-through ----------------------------------------------------------------------

    def create(self, box: BoxRow) -> None:
        self.db.execute("INSERT INTO mailbox VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (box.name, box.owner, box.mode, ",".join(box.members), box.capacity,
                         box.max_bytes, box.last_sequence, box.created))

    def remove(self, name: str) -> None:
        with self._transaction():
            self.db.execute("DELETE FROM message WHERE name = ?", (name,))
            self.db.execute("DELETE FROM mailbox WHERE name = ?", (name,))

    def put(self, msg: MsgRow) -> None:
        """Append a message and advance its mailbox's sequence, in one transaction."""
        with self._transaction():
            self.db.execute("INSERT INTO message VALUES (?, ?, ?, ?, ?)",
                            (msg.name, msg.sequence, msg.sender, msg.pid, msg.payload))
            self.db.execute("UPDATE mailbox SET last_sequence = ? WHERE name = ?",
                            (msg.sequence, msg.name))

    def take(self, name: str, sequence: int) -> None:
        self.db.execute("DELETE FROM message WHERE name = ? AND sequence = ?", (name, sequence))

    def _transaction(self) -> _Transaction:
        return _Transaction(self.db)


class _Transaction:
    """BEGIN ... COMMIT, or ROLLBACK when the body raised."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *rest: object) -> None:
        self.db.execute("ROLLBACK" if kind else "COMMIT")
