"""The kernel's journal (kernel/journal.py): round trip, kill -9 of a writer, torn and corrupt
tails, the PID high-water mark, compaction, concurrent writers."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from llmasos.kernel import journal_wal
from llmasos.kernel.journal import FILE, LOCK_FILE, Journal, JournalError, Tokens, restore
from llmasos.kernel.proctable import Exit, Proc, ProcessTable, State
from llmasos.proto import common_pb2


def make_proc(pid: int, **kw) -> Proc:
    fields = dict(user="alice", uid=1000, ppid=0, model="smollm2-135m", nice=0, name=f"job{pid}",
                  prompt_ids=[1, 2, 3, pid], max_tokens=64, context_length=8192,
                  sampling=common_pb2.SamplingParams(temperature=0.5, seed=pid))
    fields.update(kw)
    return Proc(pid=pid, **fields)


def step(j: Journal, procs: list[Proc], n: int) -> None:
    """One step: every job gets token 1000*pid + its position, in one transaction."""
    rows = []
    for p in procs:
        tok = 1000 * p.pid + len(p.output_ids)
        rows.append(Tokens(p.pid, len(p.output_ids), [tok], [-0.5], f"<{tok}>"))
        p.output_ids.append(tok)
    with j.batch():
        j.record_tokens(rows)


# --- round trip ------------------------------------------------------------------------------

def test_round_trip(tmp_path):
    j = Journal.open(tmp_path)
    j.record_deploy("smollm2-135m", {"path": "/m/a.gguf", "dtype": "float32", "embedded": True})
    j.record_deploy("other", {"path": "/m/b.gguf", "dtype": "bfloat16", "embedded": False})
    j.record_deploy("gone", {"path": "/m/c.gguf", "dtype": "float32", "embedded": False})
    j.record_undeploy("gone")
    procs = [make_proc(pid) for pid in range(1, 6)]
    with j.batch():
        for p in procs:
            j.record_spawn(p)
    for n in range(3):
        step(j, procs, n)
    running, stopped, zombie, reaped, signalled = procs
    stopped.state = State.STOPPED
    j.record_state(stopped)
    zombie.state, zombie.exit_reason, zombie.exit_status = State.ZOMBIE, Exit.KILLED, -9
    zombie.exit_message, zombie.ended = "killed by signal 9", 1234.5
    j.record_state(zombie)
    j.record_reap(reaped.pid)
    signalled.state, signalled.pending_signal = State.RUNNING, 19
    j.record_state(signalled)
    j.record_nice(running.pid, 7)
    j.close()

    rec = Journal.open(tmp_path).replay()
    assert list(rec.models) == ["smollm2-135m", "other"]
    assert rec.models["other"] == {"path": "/m/b.gguf", "dtype": "bfloat16", "embedded": False}
    assert [p.pid for p in rec.procs] == [1, 2, 3, 5]
    got = {p.pid: p for p in rec.procs}
    assert got[1].state == State.READY and got[1].nice == 7
    assert got[2].state == State.STOPPED
    assert got[3].state == State.ZOMBIE and got[3].exit_reason == Exit.KILLED
    assert (got[3].exit_status, got[3].exit_message, got[3].ended) == \
        (-9, "killed by signal 9", 1234.5)
    assert got[5].state == State.READY and got[5].pending_signal == 19
    for p in rec.procs:
        orig = procs[p.pid - 1]
        assert p.prompt_ids == orig.prompt_ids and p.output_ids == orig.output_ids
        assert p.output_logprobs == [-0.5] * 3
        assert p.text == "".join(f"<{t}>" for t in orig.output_ids)
        assert p.sampling == orig.sampling and p.sampling.seed == p.pid
        assert (p.user, p.uid, p.model, p.name, p.max_tokens, p.context_length, p.created) == \
            (orig.user, orig.uid, orig.model, orig.name, orig.max_tokens, orig.context_length,
             orig.created)
        assert p.first_token > 0 and p.kv_blocks == 0 and p.computed == 0
    assert rec.next_pid == 6
    assert not rec.report.lost and rec.report.steps == 3


def test_restore_into_table(tmp_path):
    j = Journal.open(tmp_path)
    live, zombie = make_proc(1), make_proc(2, state=State.ZOMBIE, ended=1.0)
    j.record_spawn(live)
    j.record_spawn(zombie)
    j.record_state(zombie)
    j.close()
    table = ProcessTable()
    restore(table, Journal.open(tmp_path).replay())
    assert [p.pid for p in table.live()] == [1]
    table.set_state(table.get(1), State.RUNNING)        # a READY job runs again
    table.reap(table.get(2))                            # the zombie is still reapable
    assert table.spawn(user="u", uid=1, ppid=0, model="m", nice=0).pid == 3


def test_file_is_private(tmp_path):
    j = Journal.open(tmp_path / "home")
    j.record_spawn(make_proc(1))
    for name in (FILE, FILE + "-wal"):
        assert stat.S_IMODE(os.stat(tmp_path / "home" / name).st_mode) == 0o600


def test_failed_batch_rolls_back(tmp_path):
    j = Journal.open(tmp_path)
    with pytest.raises(RuntimeError), j.batch():
        j.record_spawn(make_proc(1))
        raise RuntimeError("the step failed")
    j.record_spawn(make_proc(2))
    assert [p.pid for p in j.replay().procs] == [2]


# --- kill -9 of a writer, torn and corrupt tails ----------------------------------------------

WRITER = r"""
import sys
from llmasos.kernel.journal import Journal, Tokens
from llmasos.kernel.proctable import Proc, State
j = Journal.open(sys.argv[1])
procs = [Proc(pid=p, user="bob", uid=7, ppid=0, model="m", nice=0, prompt_ids=[p])
         for p in range(1, 9)]
with j.batch():
    for p in procs:
        j.record_spawn(p)
n = 0
while True:
    n += 1
    with j.batch():   # one step: 8 tokens and, every 10th step, a state change
        j.record_tokens([Tokens(p.pid, n - 1, [1000 * p.pid + n - 1], [-1.0], "x")
                         for p in procs])
        if n % 10 == 0:
            procs[n // 10 % 8].nice = n
            j.record_nice(procs[n // 10 % 8].pid, n)
    print("ack", n, flush=True)
"""


def expected_outputs(steps: int) -> dict[int, list[int]]:
    return {pid: [1000 * pid + i for i in range(steps)] for pid in range(1, 9)}


@pytest.fixture(scope="module")
def killed_journal(tmp_path_factory) -> tuple[Path, int]:
    """A journal whose writer was killed with SIGKILL mid-stream; (its home, last ack)."""
    home = tmp_path_factory.mktemp("killed")
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(home)], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout is not None
    for line in child.stdout:
        if int(line.split()[1]) >= 60:
            break
    child.send_signal(signal.SIGKILL)
    rest = child.stdout.read()
    child.wait()
    # only whole lines count: the kill can cut the last one short ("ack" with no number)
    whole = [x for x in (line + rest).split("\n")[:-1] if x.startswith("ack ")]
    acked = int(whole[-1].split()[1])
    assert (home / (FILE + "-wal")).stat().st_size > 0   # nothing was checkpointed away
    return home, acked


def last_commit_end(wal: Path) -> int:
    """Where the WAL's last commit frame ends (a killed writer may have left a partial
    transaction after it)."""
    data = wal.read_bytes()
    page_size = struct.unpack_from(">I", data, 8)[0]
    frame, end = 24 + page_size, 0
    for off in range(32, len(data) - frame + 1, frame):
        if struct.unpack_from(">I", data, off + 4)[0]:   # db size after commit: a commit
            end = off + frame
    return end


def copy_home(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_replay_after_kill9(killed_journal, tmp_path):
    home, acked = killed_journal
    rec = Journal.open(copy_home(home, tmp_path / "h")).replay()
    steps = rec.report.steps
    assert steps in (acked, acked + 1)   # every acknowledged step; at most one more
    assert {p.pid: p.output_ids for p in rec.procs} == expected_outputs(steps)
    assert not rec.report.corrupt and not rec.report.token_gaps and rec.next_pid == 9
    assert rec.procs[(steps // 10) % 8].nice == steps // 10 * 10
    fd = os.open(home / LOCK_FILE, os.O_RDWR)   # the dead writer's lock went with it
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)


def test_one_llmosd_per_home(tmp_path):
    j = Journal.open(tmp_path)
    with pytest.raises(JournalError, match=f"another llmosd \\(pid {os.getpid()}\\)"):
        Journal.open(tmp_path)
    j.record_spawn(make_proc(1))               # the refused open changed nothing
    j.close()
    assert [p.pid for p in Journal.open(tmp_path).replay().procs] == [1]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_torn_tail_is_cut_and_reported(killed_journal, tmp_path, damage):
    home, _ = killed_journal
    whole_j = Journal.open(copy_home(home, tmp_path / "whole"))
    whole = whole_j.replay().report.steps
    whole_j.close()
    torn = copy_home(home, tmp_path / "torn")
    wal = torn / (FILE + "-wal")
    at = last_commit_end(wal) - 100  # inside the last committed step's commit frame
    with open(wal, "r+b") as f:
        if damage == "truncate":     # the last frame written only in part
            f.truncate(at)
        else:                        # one bit of the last frame's page is wrong
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0x40]))
    with capture_logs() as logs:
        j = Journal.open(torn)
    rec = j.replay()
    assert rec.report.steps == whole - 1      # exactly the last step is gone
    assert {p.pid: p.output_ids for p in rec.procs} == expected_outputs(whole - 1)
    assert rec.report.lost and rec.report.cut_frames >= 1 and rec.report.cut_bytes > 0
    cut = [e for e in logs if e["event"] == "journal_tail_cut"]
    assert cut and cut[0]["steps_recovered"] == whole - 1 and cut[0]["log_level"] == "error"
    step(j, rec.procs, 0)                     # and the journal goes on from there
    j.close()
    assert Journal.open(torn).replay().report.steps == whole


@pytest.mark.parametrize("page", [0, 2])
def test_corrupt_file_is_moved_aside(killed_journal, tmp_path, page):
    home = copy_home(killed_journal[0], tmp_path / "bad")
    Journal.open(home).close()               # checkpointed into the file, the WAL gone
    junk = b"this is not an sqlite file at all" * 200
    with open(home / FILE, "r+b") as f:      # the header, or a whole b-tree page
        f.seek(4096 * page)
        f.write(junk[:4096])
    with capture_logs() as logs:
        j = Journal.open(home)
    rec = j.replay()
    assert rec.procs == [] and rec.report.corrupt and rec.report.lost
    assert junk[:4096] in Path(rec.report.corrupt).read_bytes()
    assert [e for e in logs if e["event"] == "journal_corrupt"]
    j.record_spawn(make_proc(1))
    j.close()
    assert [p.pid for p in Journal.open(home).replay().procs] == [1]


# --- PIDs, compaction, threads ------------------------------------------------------------------

def test_pids_are_never_reused(tmp_path):
    j = Journal.open(tmp_path)
    for pid in range(1, 6):
        j.record_spawn(make_proc(pid))
    for pid in range(1, 6):
        j.record_reap(pid)
    j.close()
    rec = Journal.open(tmp_path).replay()
    assert rec.procs == [] and rec.next_pid == 6
    table = ProcessTable()
    restore(table, rec)
    assert table.spawn(user="u", uid=1, ppid=0, model="m", nice=0).pid == 6


def test_a_status_a_wait_handed_out_outlives_a_reboot(tmp_path, monkeypatch):
    """Reaped by a Wait: kept (REAPED, with its output) for the same Wait asked of the next
    kernel, never run again; past ANSWERED_KEEP_S a sweep deletes it."""
    from llmasos.kernel import journal, proctable
    j = Journal.open(tmp_path)
    answered, plain, live = make_proc(1), make_proc(2), make_proc(3)
    with j.batch():
        for p in (answered, plain, live):
            j.record_spawn(p)
    step(j, [answered, plain, live], 0)
    for p in (answered, plain):
        p.state, p.exit_reason, p.ended = State.ZOMBIE, Exit.LENGTH, 1.0
        j.record_state(p)
    j.record_reap(answered.pid, answered=True)
    j.record_reap(plain.pid)
    j.close()
    j = Journal.open(tmp_path)
    rec = j.replay()
    assert [p.pid for p in rec.procs] == [3]
    table = ProcessTable()
    restore(table, rec)
    again = table.answered_wait(1)
    assert again is not None and again.state == State.REAPED and again.exit_reason == Exit.LENGTH
    assert again.output_ids == answered.output_ids
    assert again.text == "".join(f"<{t}>" for t in answered.output_ids)
    assert table.get(1) is None and table.answered_wait(2) is None and table.next_pid == 4
    real = journal.time.time   # a sweep ANSWERED_KEEP_S + 1 s later deletes the kept row
    monkeypatch.setattr(journal.time, "time", lambda: real() + proctable.ANSWERED_KEEP_S + 1)
    with j.batch():
        j._sweep()
    assert j._db.execute("SELECT pid FROM procs").fetchall() == [(3,)]


def test_reaped_jobs_are_compacted(tmp_path):
    j = Journal.open(tmp_path)

    def round_of_jobs(first: int) -> None:
        procs = [make_proc(pid, prompt_ids=list(range(500))) for pid in range(first, first + 64)]
        with j.batch():
            for p in procs:
                j.record_spawn(p)
        for n in range(100):
            step(j, procs, n)
        for p in procs:
            j.record_reap(p.pid)
        j.checkpoint()

    round_of_jobs(1)
    first = j.size()
    for r in range(1, 6):
        round_of_jobs(1 + 64 * r)
    assert j._db.execute("SELECT count(*) FROM tokens").fetchone() == (0,)
    assert j._db.execute("SELECT count(*) FROM procs").fetchone() == (0,)
    assert (tmp_path / (FILE + "-wal")).stat().st_size == 0       # truncated by checkpoint()
    assert j.size() < 1.25 * first    # freed pages are reused (kept: 6x first)


def test_concurrent_writers(tmp_path):
    """Syscall threads spawn while the step loop commits batches: nothing is lost or mixed."""
    j = Journal.open(tmp_path)
    base = [make_proc(pid) for pid in range(1, 5)]
    for p in base:
        j.record_spawn(p)

    def spawner(t: int) -> None:
        for i in range(50):
            j.record_spawn(make_proc(100 + 50 * t + i))

    threads = [threading.Thread(target=spawner, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for n in range(100):
        step(j, base, n)
    for t in threads:
        t.join()
    j.close()
    rec = Journal.open(tmp_path).replay()
    assert len(rec.procs) == 204 and rec.next_pid == 300 and rec.report.steps == 100
    assert [p.output_ids for p in rec.procs[:4]] == [p.output_ids for p in base]


def test_stale_wal_frames_are_not_reported_as_cut(tmp_path):
    """After a checkpoint SQLite rewrites the WAL from its start: the older, longer generation's
    frames after the new ones are leftovers, not a torn tail."""
    j = Journal.open(tmp_path / "live")
    procs = [make_proc(pid) for pid in range(1, 65)]
    for p in procs:
        j.record_spawn(p)
    wal = tmp_path / "live" / (FILE + "-wal")
    scan = journal_wal.WalScan()
    for n in range(3000):
        step(j, procs, n)
        if n % 20 == 19:
            scan = journal_wal.scan(wal)
            if scan.current and not all(scan.current):
                break
    assert scan.current and not all(scan.current), "the WAL never wrapped"
    crashed = copy_home(tmp_path / "live", tmp_path / "crashed")   # as kill -9 leaves it
    with capture_logs() as logs:
        rec = Journal.open(crashed).replay()
    assert rec.report.steps == n + 1 and not rec.report.lost
    assert not [e for e in logs if e["event"] == "journal_tail_cut"]
    assert {p.pid: p.output_ids for p in rec.procs} == {p.pid: p.output_ids for p in procs}


def test_damaged_rows_lose_only_their_jobs(tmp_path):
    """SQLite checks a file's structure, not its contents: a row that does not decode costs
    its own job (or the output after a damaged chunk), named in the report."""
    j = Journal.open(tmp_path)
    procs = [make_proc(pid) for pid in range(1, 5)]
    for p in procs:
        j.record_spawn(p)
    for n in range(3):
        step(j, procs, n)
    j._db.execute("UPDATE procs SET state = 99 WHERE pid = 2")
    j._db.execute("UPDATE tokens SET ids = x'010203' WHERE pid = 3 AND pos = 1")
    with capture_logs() as logs:
        rec = j.replay()
    got = {p.pid: p.output_ids for p in rec.procs}
    assert got == {1: procs[0].output_ids, 3: procs[2].output_ids[:1], 4: procs[3].output_ids}
    assert rec.report.bad_jobs == [2] and rec.report.token_gaps == [3] and rec.report.lost
    assert rec.next_pid == 5
    assert {e["event"] for e in logs} >= {"journal_bad_rows", "journal_token_gap"}


def test_full_disk_is_a_clear_error_and_rolls_back(tmp_path):
    j = Journal.open(tmp_path)
    j.record_spawn(make_proc(1))
    (pages,) = j._db.execute("PRAGMA page_count").fetchone()
    j._db.execute(f"PRAGMA max_page_count = {pages}")     # as if the disk were full
    with pytest.raises(JournalError, match="full.*free disk space"), j.batch():
        j.record_spawn(make_proc(2, prompt_ids=list(range(100_000))))
    assert not j._db.in_transaction
    j._db.execute("PRAGMA max_page_count = 1073741823")
    j.record_spawn(make_proc(3))
    assert [p.pid for p in j.replay().procs] == [1, 3]
