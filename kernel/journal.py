"""The kernel's journal: the process table and the deployed models, kept in SQLite (WAL mode)
under LLMASOS_HOME, so that llmosd can die (kill -9) and boot again with every accepted job.

What is recorded, before it is acknowledged:
    spawn        one procs row per job (its prompt, sampling, owner, limits)
    tokens       one tokens row per job per step, the step's ONE transaction (see batch())
    state        STOPPED, CONT (READY) and exit (ZOMBIE + status); READY/RUNNING/BLOCKED moves
                 inside the step loop are not recorded: after a reboot every live job is READY
    state also   a signal left pending on a RUNNING job (delivered at its next token boundary)
    nice, reap (deletes the job's rows: compaction), deploy, undeploy
Why SQLite and not an append-only log: both cost well under the 5% budget per step
(bench/journal.py); the log is cheaper to write but must be rewritten to compact and parsed
whole at boot, while SQLite deletes reaped rows in place and makes a step one transaction.
Durability: synchronous=NORMAL in WAL mode: a committed transaction survives the death of the
process (kill -9: the OS holds the written pages) but not a power loss or an OS crash, where the
last transactions may roll back (the file stays consistent). synchronous=FULL survives those
too, at one fsync per commit (bench/journal.py measures both).
Locking: one connection behind one lock, the innermost lock of the kernel (nothing is called
out of the journal while it is held), shared by the step loop and the syscall threads.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import structlog

from llmasos.kernel import journal_wal
from llmasos.kernel.journal_rows import (
    PROC_COLUMNS,
    TOKEN_COLUMNS,
    add_tokens,
    extra_of,
    floats,
    ints,
    procs_from,
)
from llmasos.kernel.proctable import ANSWERED_KEEP_S, Proc, ProcessTable, State

log = structlog.get_logger()

FILE, LOCK_FILE = "journal.sqlite", "journal.lock"
VERSION = 1
CHECKPOINT_PAGES = 1000   # SQLite's auto-checkpoint: the WAL is copied back every ~4 MiB
SWEEP_EVERY = 64          # reaps between sweeps of their token rows (tokens has no pid index:
                          # appending to it then dirties ~4 pages a step instead of ~19)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta   (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS models (name TEXT PRIMARY KEY, fields TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS procs (
    pid INTEGER PRIMARY KEY, user TEXT NOT NULL, uid INTEGER NOT NULL, ppid INTEGER NOT NULL,
    model TEXT NOT NULL, nice INTEGER NOT NULL, name TEXT NOT NULL, prompt BLOB NOT NULL,
    sampling BLOB, max_tokens INTEGER NOT NULL, context_length INTEGER NOT NULL,
    created REAL NOT NULL, state INTEGER NOT NULL, pending_signal INTEGER NOT NULL DEFAULT 0,
    exit_reason INTEGER NOT NULL DEFAULT 0, exit_status INTEGER NOT NULL DEFAULT 0,
    exit_message TEXT NOT NULL DEFAULT '', ended REAL NOT NULL DEFAULT 0,
    extra TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS tokens (
    pid INTEGER NOT NULL, pos INTEGER NOT NULL, ids BLOB NOT NULL, logprobs BLOB NOT NULL,
    text TEXT NOT NULL, t REAL NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('version', 1), ('next_pid', 1), ('steps', 0);  -- VERSION
"""


class Tokens(NamedTuple):
    """One job's new output in one step."""

    pid: int
    pos: int                    # how many output tokens the job had before these
    ids: Sequence[int]
    logprobs: Sequence[float]
    text: str                   # the text they added


class JournalError(Exception):
    """The journal could not be written (disk full, I/O error): nothing was acknowledged."""


class Corrupt(Exception):
    """The journal file cannot be trusted; it is moved aside."""


@dataclass
class Report:
    """What opening the journal found: what was cut or moved aside, in words and figures."""

    steps: int = 0                  # step transactions recovered
    cut_frames: int = 0             # WAL frames of a torn or unacknowledged tail, dropped
    cut_bytes: int = 0
    corrupt: str = ""               # where a corrupt journal was moved aside ("" if none)
    token_gaps: list[int] = field(default_factory=list)   # pids whose tokens were truncated
    bad_jobs: list[int] = field(default_factory=list)     # pids whose rows did not decode: lost

    @property
    def lost(self) -> bool:
        return bool(self.cut_bytes or self.corrupt or self.token_gaps or self.bad_jobs)


@dataclass
class Recovered:
    """The kernel's state as the journal last saw it."""

    models: dict[str, dict[str, Any]]   # name -> the fields record_deploy was given, in order
    procs: list[Proc]                   # pid order; live ones READY (or STOPPED), zombies kept
    next_pid: int                       # PIDs are never reused: above every PID ever handed out
    report: Report
    answered: list[tuple[Proc, float]] = field(default_factory=list)   # reaped by a Wait: (job,
                                                                       # when, time.time())


class Journal:
    def __init__(self, path: Path, db: sqlite3.Connection, report: Report, lock_fd: int) -> None:
        self.path = path
        self.report = report
        self._db = db
        self._unlock = weakref.finalize(self, os.close, lock_fd)   # HOME/journal.lock's flock
        self._lock = threading.RLock()
        self._depth = 0             # nesting of batch()
        self._reaped = 0            # reaps since the last sweep

    @classmethod
    def open(cls, home: str | os.PathLike[str], synchronous: str = "NORMAL") -> Journal:
        """Open (or create) HOME/journal.sqlite, mode 0600; cut a torn tail, move a corrupt
        file aside. Both are logged loudly and described in .report."""
        home = Path(home)
        home.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock_home(home)
        try:
            return cls._open(home / FILE, synchronous, lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _open(cls, path: Path, synchronous: str, lock_fd: int) -> Journal:
        report = Report()
        wal = journal_wal.scan(journal_wal.wal_path(path))
        db = None
        try:
            db = _connect(path, synchronous)
            mx_frame = _check(db)
        except sqlite3.OperationalError as e:   # locked, unreadable: never a reason to discard
            _close(db)
            raise JournalError(f"cannot open the journal {path}: {e}; is another llmosd "
                               "using this LLMASOS_HOME?") from e
        except (Corrupt, sqlite3.DatabaseError) as e:
            _close(db)
            report.corrupt = _move_aside(path, str(e))
            wal = journal_wal.WalScan()
            db = _connect(path, synchronous)
            mx_frame = 0
        report.cut_frames, report.cut_bytes = wal.cut(mx_frame)
        report.steps = _meta(db, "steps")
        if report.cut_bytes:
            log.error("journal_tail_cut", path=str(path), frames=report.cut_frames,
                      bytes=report.cut_bytes, steps_recovered=report.steps,
                      lost=f"the unacknowledged step(s) after step {report.steps}")
        return cls(path, db, report, lock_fd)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._unlock()

    # --- transactions ----------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Everything recorded inside is ONE transaction (nestable): the step loop wraps a
        step's commit in it, Spawn its n samples. Other threads' records wait for its end."""
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._run("BEGIN")
            self._depth += 1
            try:
                yield
                if outer:
                    self._run("COMMIT")
            except BaseException:
                if outer and self._db.in_transaction:   # a failed COMMIT may leave it open
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise
            finally:
                self._depth -= 1

    def _run(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, args)
        except sqlite3.Error as e:
            raise JournalError(f"journal {self.path}: {e}; free disk space under "
                               f"{self.path.parent} or move the journal aside") from e

    def _many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            self._db.executemany(sql, rows)
        except sqlite3.Error as e:
            raise JournalError(f"journal {self.path}: {e}") from e

    # --- records -----------------------------------------------------------------------------

    def record_spawn(self, proc: Proc) -> None:
        sampling = proc.sampling.SerializeToString() if proc.sampling is not None else None
        with self.batch():
            self._run("INSERT OR REPLACE INTO procs (pid, user, uid, ppid, model, nice, name, "
                      "prompt, sampling, max_tokens, context_length, created, state, extra) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (proc.pid, proc.user, proc.uid, proc.ppid, proc.model, proc.nice,
                       proc.name, ints(proc.prompt_ids), sampling, proc.max_tokens,
                       proc.context_length, proc.created, int(proc.state), extra_of(proc)))
            self._run("UPDATE meta SET value = max(value, ?) WHERE key = 'next_pid'",
                      (proc.pid + 1,))

    def record_tokens(self, rows: Iterable[Tokens]) -> None:
        """One step's new tokens, one row per job (replay checks that they join: pos)."""
        now = time.time()
        with self.batch():
            self._many("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?)",
                       ((r.pid, r.pos, ints(r.ids), floats(r.logprobs), r.text, now)
                        for r in rows))
            self._run("UPDATE meta SET value = value + 1 WHERE key = 'steps'")

    def record_state(self, proc: Proc) -> None:
        """The job's state, pending signal and exit status as they are now."""
        with self.batch():
            self._run("UPDATE procs SET state = ?, pending_signal = ?, exit_reason = ?, "
                      "exit_status = ?, exit_message = ?, ended = ? WHERE pid = ?",
                      (int(proc.state), proc.pending_signal, int(proc.exit_reason),
                       proc.exit_status, proc.exit_message, proc.ended, proc.pid))

    def record_replica(self, proc: Proc) -> None:
        """Where the job was placed (kernel/replicas.py): recovery puts it back there."""
        with self.batch():
            self._run("UPDATE procs SET extra = json_set(extra, '$.replica', ?) WHERE pid = ?",
                      (proc.replica, proc.pid))

    def record_nice(self, pid: int, nice: int) -> None:
        with self.batch():
            self._run("UPDATE procs SET nice = ? WHERE pid = ?", (nice, pid))

    def record_reap(self, pid: int, answered: bool = False) -> None:
        """The job is gone for good: its rows go too (this is the journal's compaction; its
        token rows in the next sweep, which replay does not need: it skips them). A job whose
        status a Wait handed out (`answered`) stays, REAPED, for ANSWERED_KEEP_S: the same Wait
        asked of a rebooted kernel (the reply lost with the old one) answers the same."""
        with self.batch():
            if answered:
                self._run("UPDATE procs SET state = ?, extra = json_set(extra, '$.reaped_at', ?)"
                          " WHERE pid = ?", (int(State.REAPED), time.time(), pid))
            else:
                self._run("DELETE FROM procs WHERE pid = ?", (pid,))
            self._reaped += 1
            if self._reaped >= SWEEP_EVERY:
                self._sweep()

    def _sweep(self) -> None:
        """Delete answered jobs kept past ANSWERED_KEEP_S, then the token rows of reaped jobs
        (one sequential scan for SWEEP_EVERY reaps)."""
        self._run("DELETE FROM procs WHERE state = ? AND json_extract(extra, '$.reaped_at') < ?",
                  (int(State.REAPED), time.time() - ANSWERED_KEEP_S))
        self._run("DELETE FROM tokens WHERE pid NOT IN (SELECT pid FROM procs)")
        self._reaped = 0

    def record_deploy(self, name: str, fields: dict[str, Any]) -> None:
        """fields: what redeploying needs, JSON-serializable (dataclasses.asdict(Deployed))."""
        with self.batch():
            self._run("DELETE FROM models WHERE name = ?", (name,))   # a new rowid: new order
            self._run("INSERT INTO models VALUES (?, ?)", (name, json.dumps(fields)))

    def token_rows(self, pid: int) -> int:
        """How many token rows a job has: a hosted model's job counts its chunks so (no ids)."""
        with self._lock:
            return int(self._run("SELECT count(*) FROM tokens WHERE pid = ?",
                                 (pid,)).fetchone()[0])

    def record_undeploy(self, name: str) -> None:
        with self.batch():
            self._run("DELETE FROM models WHERE name = ?", (name,))

    # --- upkeep ------------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Sweep reaped jobs' tokens, copy the WAL into the database and truncate it (SQLite
        also checkpoints by itself every CHECKPOINT_PAGES pages); call it when idle."""
        with self._lock:
            if self._depth:
                return
            if self._reaped:
                with self.batch():
                    self._sweep()
            wal = journal_wal.wal_path(self.path)
            if wal.exists() and wal.stat().st_size:
                self._run("PRAGMA wal_checkpoint(TRUNCATE)")

    def size(self) -> int:
        """Bytes on disk: the database and its WAL."""
        wal = journal_wal.wal_path(self.path)
        return self.path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)

    # --- replay ------------------------------------------------------------------------------

    def replay(self) -> Recovered:
        with self._lock:
            models = {name: json.loads(fields) for name, fields in
                      self._db.execute("SELECT name, fields FROM models ORDER BY rowid")}
            procs, bad = procs_from(self._db.execute(
                f"SELECT {PROC_COLUMNS} FROM procs WHERE state != ? ORDER BY pid",
                (int(State.REAPED),)))
            answered, bad_answered = procs_from(self._db.execute(
                f"SELECT {PROC_COLUMNS} FROM procs WHERE state = ? ORDER BY pid",
                (int(State.REAPED),)))
            reaped_at = dict(self._db.execute(
                "SELECT pid, json_extract(extra, '$.reaped_at') FROM procs WHERE state = ?",
                (int(State.REAPED),)))
            gaps = add_tokens({**procs, **answered}, self._db.execute(
                f"SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY rowid"))
            bad += bad_answered
            next_pid = max([_meta(self._db, "next_pid"),
                            *(p + 1 for p in [*procs, *answered, *bad])])
        for proc in answered.values():
            proc.state = State.REAPED
        self.report.token_gaps, self.report.bad_jobs = sorted(gaps), bad
        if gaps:
            log.error("journal_token_gap", pids=sorted(gaps),
                      lost="output past the gap; those jobs continue from where it starts")
        if bad:
            log.error("journal_bad_rows", pids=bad, lost="those jobs (their rows are damaged)")
        rec = Recovered(models, list(procs.values()), next_pid, self.report,
                        [(p, float(reaped_at[p.pid] or 0)) for p in answered.values()])
        log.info("journal_replayed", models=list(models), jobs=len(procs), next_pid=next_pid,
                 steps=self.report.steps, zombies=sum(p.state == State.ZOMBIE for p in procs
                                                      .values()))
        return rec


def restore(table: ProcessTable, rec: Recovered) -> None:
    """Put recovered jobs into an empty process table (at boot, before the step loop runs).
    Pending signals (p.pending_signal) are then the caller's to deliver."""
    with table.lock:
        table.procs = {p.pid: p for p in rec.procs}
        table.next_pid = max(table.next_pid, rec.next_pid)
        now, wall = time.monotonic(), time.time()
        for proc, at in sorted(rec.answered, key=lambda kept: kept[1]):
            if wall - at < ANSWERED_KEEP_S:
                table.answered[proc.pid] = (now - max(0.0, wall - at), proc)
        table.changed.notify_all()


# --- opening -----------------------------------------------------------------------------------

def _lock_home(home: Path) -> int:
    """Hold HOME/journal.lock while open; the OS drops it when the process dies (kill -9)."""
    fd = os.open(home / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise JournalError(f"another llmosd (pid {holder}) uses {home}; stop it or give this "
                           "one another LLMASOS_HOME") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    if not path.exists():   # SQLite gives the WAL and shm files the database file's mode
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.text_factory = lambda b: b.decode(errors="replace")   # a damaged text is not fatal
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_PAGES}")
        db.executescript(SCHEMA)
    except sqlite3.Error:
        db.close()
        raise
    return db


def _close(db: sqlite3.Connection | None) -> None:
    if db is not None:
        with contextlib.suppress(sqlite3.Error):
            db.close()


def _check(db: sqlite3.Connection) -> int:
    """quick_check the file; return how many WAL frames SQLite accepted (its mxFrame)."""
    (ok,) = db.execute("PRAGMA quick_check").fetchone()
    version = _meta(db, "version")
    if ok != "ok" or version != VERSION:
        raise Corrupt(f"quick_check: {ok}" if ok != "ok" else
                      f"journal version {version}, this llmosd reads {VERSION}")
    _busy, mx_frame, _done = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return mx_frame


def _move_aside(path: Path, why: str) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = path.with_name(f"journal.corrupt-{stamp}.sqlite")
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{path}{suffix}")
        if src.exists():
            src.rename(f"{dest}{suffix}")
    log.error("journal_corrupt", path=str(path), error=why, moved_to=str(dest),
              lost="every job and deployment journaled before this boot; the old file is kept "
                   "for inspection")
    return str(dest)


def _meta(db: sqlite3.Connection, key: str) -> int:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row else 0


class NoJournal:
    """The kernel composed without a journal (benchmarks, in-process tests): records nothing."""

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        yield

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None
