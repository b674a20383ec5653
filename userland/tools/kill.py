"""llm-kill: send a signal to LLM jobs, with kill(1)'s conventions.

    llm-kill PID...            TERM          llm-kill -9 PID / -KILL / -s KILL
    llm-kill -STOP PID         suspend       llm-kill -CONT PID        resume
    llm-kill -l                list signals
Exit status: 0 every signal delivered, 1 any failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import sys

from llmasos.errors import LLMError
from llmasos.fmt import error
from llmasos.names import SIGNAL_NAMES, signal_number
from llmasos.tools import common
from llmasos.version import version_string

USAGE = "llm-kill [-s SIGNAL | -SIGNAL] PID...   or   llm-kill -l"


class Usage(Exception):
    """Bad command line; the message says what is wrong."""


def parse(argv: list[str]) -> tuple[int, list[int], argparse.Namespace]:
    """(signal number, pids, options) from kill(1)-style arguments; Usage on bad input."""
    opts = argparse.Namespace(addr=None, timeout=10.0, list=False)
    sig, pids, args = 15, [], list(argv)
    while args and args[0].startswith("-") and args[0] != "--":
        a = args.pop(0)
        if a in ("-l", "--list"):
            opts.list = True
        elif a in ("-s", "--signal", "--addr", "--timeout"):
            if not args:
                raise Usage(f"option {a} needs a value")
            value = args.pop(0)
            if a in ("-s", "--signal"):
                sig = _signal(value)
            elif a == "--addr":
                opts.addr = value
            else:
                opts.timeout = float(value)
        elif a in ("-h", "--help"):
            raise Usage("")
        elif a == "--version":
            print(version_string("llm-kill"))
            raise SystemExit(0)
        else:
            sig = _signal(a[1:])
    if args and args[0] == "--":
        args.pop(0)
    for a in args:
        if not a.isdigit() or int(a) <= 0:
            raise Usage(f"{a!r} is not a job pid (a positive number; see llm-ps)")
        pids.append(int(a))
    if not pids and not opts.list:
        raise Usage("no pid given")
    return sig, pids, opts


def _signal(text: str) -> int:
    try:
        return signal_number(text)
    except LLMError as err:
        raise Usage(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    try:
        sig, pids, opts = parse(sys.argv[1:] if argv is None else argv)
    except Usage as err:
        if str(err):
            error("llm-kill", str(err))
        print(f"usage: {USAGE}", file=sys.stderr)
        return common.EXIT_USAGE
    if opts.list:
        print(" ".join(f"{n}) {name}" for n, name in sorted(SIGNAL_NAMES.items())))
        return common.EXIT_OK
    return common.run("llm-kill", lambda: deliver(sig, pids, opts))


def deliver(sig: int, pids: list[int], opts: argparse.Namespace) -> int:
    """Signal each pid in turn; report each failure as kill(1) does, and go on."""
    status = common.EXIT_OK
    with common.client(opts) as c:
        for pid in pids:
            try:
                c.kill(pid, sig)
            except LLMError as err:
                error("llm-kill", f"({pid}) - {err}")
                status = common.EXIT_FAIL
    return status


if __name__ == "__main__":
    sys.exit(main())
