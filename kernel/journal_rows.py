"""The journal's row format: how a Proc and a step's tokens are stored, and read back.

Token ids are int32 and logprobs float32 arrays (blobs); sampling is the serialized proto.
Reading is defensive: SQLite checks a file's structure, not its contents, so a row that does
not decode costs its own job (or the output after a damaged chunk), never the whole replay.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf.message import DecodeError

from llmasos.kernel.proctable import Exit, Proc, State
from llmasos.proto import common_pb2

PROC_COLUMNS = ("pid, user, uid, ppid, model, nice, name, prompt, sampling, max_tokens, "
                "context_length, created, state, pending_signal, exit_reason, exit_status, "
                "exit_message, ended, extra")
EXTRA = ("stdout_mailbox", "ignore_sigpipe", "stdin_pid", "input_open", "shm",
         "prompt_text", "replica")   # as JSON


def extra_of(proc: Proc) -> str:
    return json.dumps({name: getattr(proc, name) for name in EXTRA})
TOKEN_COLUMNS = "pid, pos, ids, logprobs, text, t"


def ints(xs: Sequence[int]) -> bytes:
    return array("i", xs).tobytes()       # token ids < 2**31


def floats(xs: Sequence[float]) -> bytes:
    return array("f", xs).tobytes()       # logprobs are proto floats (32 bits): exact


def unpack(kind: str, blob: bytes) -> list[Any]:
    a = array(kind)
    a.frombytes(blob)
    return a.tolist()


def procs_from(rows: Iterable[tuple]) -> tuple[dict[int, Proc], list[int]]:
    """pid -> Proc, and the pids whose rows are damaged (SQLite checks structure, not content)."""
    procs, bad = {}, []
    for row in rows:
        try:
            procs[row[0]] = proc_from(row)
        except (ValueError, TypeError, DecodeError):
            bad.append(row[0])
    return procs, bad


def proc_from(row: tuple) -> Proc:
    (pid, user, uid, ppid, model, nice, name, prompt, sampling, max_tokens, context_length,
     created, state, pending, reason, status, message, ended, extra) = row
    state = State(state)
    if state not in (State.STOPPED, State.ZOMBIE):
        state = State.READY          # its KV is gone: it is computed again from its tokens
    return Proc(pid=pid, user=user, uid=uid, ppid=ppid, model=model, nice=nice, name=name,
                state=state, prompt_ids=unpack("i", prompt),
                sampling=None if sampling is None else
                common_pb2.SamplingParams.FromString(sampling),
                max_tokens=max_tokens, context_length=context_length, created=created,
                pending_signal=pending if state != State.ZOMBIE else 0,
                exit_reason=Exit(reason), exit_status=status, exit_message=message,
                ended=ended, **{k: v for k, v in json.loads(extra).items() if k in EXTRA})


def add_tokens(procs: dict[int, Proc], rows: Iterable[tuple]) -> set[int]:
    """Append each step's chunk to its job; a chunk that does not join (a gap) ends that job's
    output there. Rows of reaped jobs are skipped."""
    gaps: set[int] = set()
    for pid, pos, ids, lps, text, t in rows:
        proc = procs.get(pid)
        if proc is None or pid in gaps:
            continue
        try:
            new, new_lps = unpack("i", ids), unpack("f", lps)
        except (ValueError, TypeError):
            new, new_lps = [], [0.0]      # damaged: a gap
        if pos != len(proc.output_ids) or len(new) != len(new_lps):
            gaps.add(pid)
            continue
        if not proc.first_token:
            proc.first_token = proc.started = t
        proc.output_ids += new
        proc.output_logprobs += new_lps
        proc.text += text
        proc.text_ends += [len(proc.text)] * len(new)   # a row is one step: one token each
    return gaps
