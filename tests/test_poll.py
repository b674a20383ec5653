"""Poll (syscall 29): many jobs' output over one stream, on a real llmosd with the embedded
model. Each job's output is what Read gives it; a step's tokens of several jobs come in one
message; jobs join an open stream; a job that cannot be followed is refused in its own entry
while the others go on; no token, no Poll."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator

import grpc
import pytest

from llmasos.proto import kernel_pb2

from conftest import PROMPTS, System, spawn, wait

DONE = object()


class Follower:
    """A Poll stream whose requests are fed from a queue: add() any time, close() to end."""

    def __init__(self, system: System, token: str | None = None) -> None:
        self.requests: queue.Queue = queue.Queue()
        self.stream = system.kernel.Poll(self._feed(), metadata=system.auth(token), timeout=300)

    def _feed(self) -> Iterator[kernel_pb2.PollRequest]:
        while (item := self.requests.get()) is not DONE:
            yield item

    def add(self, *pids: int, offset: int = 0) -> None:
        self.requests.put(kernel_pb2.PollRequest(
            follow=[kernel_pb2.ReadRequest(pid=p, offset=offset) for p in pids]))

    def close(self) -> None:
        self.requests.put(DONE)


def collect(chunks: Iterator[kernel_pb2.PollChunk]) -> tuple[dict[int, dict], int]:
    """Each pid's output, joined from its entries, and how many messages carried it."""
    out: dict[int, dict] = {}
    messages = 0
    for chunk in chunks:
        messages += 1
        for e in chunk.entries:
            job = out.setdefault(e.pid, {"text": "", "ids": [], "lps": [], "done": False,
                                         "reason": 0, "error_code": "", "entries": 0})
            assert not job["done"], f"pid {e.pid} had an entry after its last one"
            job["entries"] += 1
            if e.error_code:
                job["error_code"], job["done"] = e.error_code, True
                continue
            job["text"] += e.chunk.text
            job["ids"] += list(e.chunk.token_ids)
            job["lps"] += list(e.chunk.logprobs)
            job["done"], job["reason"] = e.chunk.done, e.chunk.exit_reason
    return out, messages


def read_all(system: System, pid: int, offset: int = 0) -> dict:
    text, ids, lps, reason = "", [], [], 0
    for c in system.kernel.Read(kernel_pb2.ReadRequest(pid=pid, offset=offset),
                                metadata=system.auth(), timeout=300):
        text, ids, lps = text + c.text, ids + list(c.token_ids), lps + list(c.logprobs)
        reason = c.exit_reason if c.done else reason
    return {"text": text, "ids": ids, "lps": lps, "reason": reason}


def test_a_poll_gives_each_job_what_read_gives_and_a_steps_tokens_in_one_message(
        model_system: System) -> None:
    pids = [spawn(model_system, p, max_tokens=12) for p in PROMPTS[:4]]
    poll = Follower(model_system)
    poll.add(*pids)
    poll.close()
    got, messages = collect(poll.stream)
    assert sorted(got) == sorted(pids)
    for pid in pids:
        read = read_all(model_system, pid)   # after the end: the whole output at once
        job = got[pid]
        assert job["done"] and job["reason"] == read["reason"]
        assert (job["text"], job["ids"]) == (read["text"], read["ids"])
        assert job["lps"] == pytest.approx(read["lps"], abs=0)   # the same floats, sent twice
        assert len(job["ids"]) == 12
        assert wait(model_system, pid).info.generated_tokens == 12
    tokens = sum(len(got[p]["ids"]) for p in pids)
    # the four decode in the same steps: one message a step carries all of them
    assert messages < tokens / 2, (messages, tokens)
    assert max(got[p]["entries"] for p in pids) > 1   # streamed as made, not at the end


def test_jobs_join_an_open_poll_and_it_ends_when_closed_and_they_have_ended(
        model_system: System) -> None:
    first = spawn(model_system, PROMPTS[4], max_tokens=20)
    poll = Follower(model_system)
    poll.add(first)
    chunks = iter(poll.stream)
    got: dict[int, list[int]] = {}
    ended: set[int] = set()
    second = 0
    for chunk in chunks:
        for e in chunk.entries:
            got.setdefault(e.pid, []).extend(e.chunk.token_ids)
            if e.chunk.done:
                ended.add(e.pid)
        if not second:   # the first job streams: a second one joins the same stream
            second = spawn(model_system, PROMPTS[5], max_tokens=6)
            poll.add(second)
            poll.close()
    assert ended == {first, second}
    assert len(got[first]) == 20 and len(got[second]) == 6
    assert poll.stream.code() == grpc.StatusCode.OK
    for pid in (first, second):
        assert got[pid] == read_all(model_system, pid)["ids"]
        wait(model_system, pid)


def test_a_poll_resumes_from_an_offset(model_system: System) -> None:
    pid = spawn(model_system, PROMPTS[6], max_tokens=10)
    whole = read_all(model_system, pid)
    poll = Follower(model_system)
    poll.add(pid, offset=4)
    poll.close()
    got, _ = collect(poll.stream)
    assert got[pid]["ids"] == whole["ids"][4:]
    assert whole["text"].endswith(got[pid]["text"]) and got[pid]["text"]
    wait(model_system, pid)


def test_a_job_that_cannot_be_followed_is_refused_in_its_entry_and_the_rest_go_on(
        model_system: System) -> None:
    other = model_system.adduser("poller")
    theirs = spawn(model_system, PROMPTS[7], max_tokens=4, token=other)
    mine = spawn(model_system, PROMPTS[0], max_tokens=8)
    short = spawn(model_system, PROMPTS[1], max_tokens=3)
    wait_short = read_all(model_system, short)
    poll = Follower(model_system, token=other)   # "poller" may follow only its own jobs
    poll.add(theirs)
    poll.add(mine)                      # root's: not theirs
    poll.add(0)                         # not a pid
    poll.add(999_999)                   # no such job
    poll.close()
    got, _ = collect(poll.stream)
    assert poll.stream.code() == grpc.StatusCode.OK   # refusals do not end the stream
    assert got[theirs]["done"] and len(got[theirs]["ids"]) == 4
    assert got[mine]["error_code"] == "PERMISSION_DENIED"
    assert got[0]["error_code"] == "INVALID_ARGUMENT"
    assert got[999_999]["error_code"] == "NOT_FOUND"
    root = Follower(model_system)
    root.add(short, offset=len(wait_short["ids"]) + 1)   # past what it made
    root.close()
    refused, _ = collect(root.stream)
    assert refused[short]["error_code"] == "OUT_OF_RANGE"
    audit = (model_system.home / "audit.log").read_text().splitlines()
    denied = [json.loads(line) for line in audit if '"Poll"' in line]
    assert any(e["code"] == "PERMISSION_DENIED" and e["args"]["pid"] == mine
               and e["user"] == "poller" for e in denied), denied
    for pid, token in ((theirs, other), (mine, None), (short, None)):
        wait(model_system, pid, token=token)


def test_a_duplicate_follow_is_refused_once_and_the_job_streams_once(
        model_system: System) -> None:
    pid = spawn(model_system, PROMPTS[2], max_tokens=5)
    poll = Follower(model_system)
    poll.add(pid)
    poll.add(pid)
    poll.close()
    entries = [e for chunk in poll.stream for e in chunk.entries]
    refused = [e for e in entries if e.error_code]
    assert [e.error_code for e in refused] == ["INVALID_ARGUMENT"]
    assert sum(len(e.chunk.token_ids) for e in entries) == 5
    wait(model_system, pid)


def test_no_token_no_poll(model_system: System) -> None:
    for metadata in ((), (("authorization", "Bearer not-a-token"),)):
        stream = model_system.kernel.Poll(iter([kernel_pb2.PollRequest(
            follow=[kernel_pb2.ReadRequest(pid=1)])]), metadata=metadata, timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_poll_the_caller_leaves_lets_its_jobs_run_on(model_system: System) -> None:
    pid = spawn(model_system, PROMPTS[3], max_tokens=16)
    poll = Follower(model_system)
    poll.add(pid)
    for chunk in poll.stream:
        if any(e.chunk.token_ids for e in chunk.entries):
            poll.stream.cancel()
            break
    reply = wait(model_system, pid)
    assert reply.info.generated_tokens == 16 and len(reply.token_ids) == 16


def test_many_pollers_follow_one_job_each_get_all_of_it(model_system: System) -> None:
    pid = spawn(model_system, PROMPTS[4], max_tokens=10)
    results: list[list[int]] = []

    def follow() -> None:
        poll = Follower(model_system)
        poll.add(pid)
        poll.close()
        got, _ = collect(poll.stream)
        results.append(got[pid]["ids"])

    threads = [threading.Thread(target=follow) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 3 and all(r == results[0] for r in results)
    assert len(results[0]) == 10
    wait(model_system, pid)
