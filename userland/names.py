"""Names people type and read for the ABI's numbers: signals, job states, exit reasons."""

from __future__ import annotations

from llmasos.errors import InvalidArgument
from llmasos.proto import common_pb2
from llmasos.syscalls.table import SIGNALS

SIGNAL_NAMES: dict[int, str] = {num: name for name, num in SIGNALS.items()}


def signal_number(sig: str | int) -> int:
    """'TERM', 'SIGTERM', 'term', '15' or 15 -> 15; anything else is InvalidArgument."""
    text = str(sig).strip().upper().removeprefix("-")
    if text.isdigit() and int(text) in SIGNAL_NAMES:
        return int(text)
    name = text.removeprefix("SIG")
    if name in SIGNALS:
        return SIGNALS[name]
    known = ", ".join(f"{n} ({v})" for n, v in SIGNALS.items())
    raise InvalidArgument(f"unknown signal {sig!r}; use one of {known}")


def signal_name(num: int) -> str:
    return SIGNAL_NAMES.get(num, str(num))


def state_name(state: int) -> str:
    """PROC_RUNNING -> 'RUNNING'."""
    return common_pb2.ProcState.Name(state).removeprefix("PROC_") if state else "?"


def reason_name(reason: int) -> str:
    """EXIT_LENGTH -> 'length'; '' while still running."""
    return common_pb2.ExitReason.Name(reason).removeprefix("EXIT_").lower() if reason else ""


def exit_code(status: int) -> int:
    """A job's exit status as a shell exit code: killed by signal N (status -N) -> 128+N."""
    return 128 - status if status < 0 else min(status, 125)
