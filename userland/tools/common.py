"""What every admin tool shares: the standard flags, and turning errors into exit codes."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable

from llmasos.client import LLMClient
from llmasos.errors import LLMError
from llmasos.fmt import error
from llmasos.version import version_string

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--version", action="version", version=version_string(prog))
    ap.add_argument("--addr", help="llmosd's address (default $LLMASOS_ADDR or 127.0.0.1:7070)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")
    ap.add_argument("--retry", type=float, default=None, metavar="SECONDS",
                    help="how long a call waits for a restarting llmosd "
                         "(default $LLMASOS_RETRY_S or 30; 0: not at all)")
    return ap


def client(args: argparse.Namespace) -> LLMClient:
    """The tool's connection: it rides over a restart of llmosd like every LLMClient."""
    return LLMClient(address=args.addr, timeout=args.timeout,
                     retry_s=getattr(args, "retry", None))  # llm-kill parses its own flags


def run(prog: str, body: Callable[[], int]) -> int:
    """Run a tool's body: LLMError -> message on stderr and its exit status; Ctrl-C -> 130."""
    try:
        return body()
    except LLMError as err:
        error(prog, str(err))
        return err.exit_status
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `llm-ps | head`: the reader left, which is not our failure
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
