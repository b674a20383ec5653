"""`python -m llmasos.services.security` serves llmasos.v1.Security (see services/runtime.py).

`python -m llmasos.services.security adduser NAME [--state-dir DIR] [--cap CAP ...]` edits the
store directly (under its file lock) and prints the new token once on stdout; this is what
`llmosd adduser NAME` runs.
"""

from __future__ import annotations

import argparse
import sys

import grpc

from llmasos.services import runtime
from llmasos.services.security import servicer
from llmasos.services.security.identity import CAPABILITIES, UserExistsError
from llmasos.services.security.security import Security, default_state_dir


def register(server: grpc.Server, args: argparse.Namespace) -> list[str]:
    return servicer.register(server, Security(args.state_dir or default_state_dir()))


def adduser(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="llmosd adduser",
                                 description="Create a user and print its token once.")
    ap.add_argument("name")
    ap.add_argument("--state-dir", default="", help="default: $LLMASOS_HOME or "
                    "~/.local/state/llmasos")
    ap.add_argument("--cap", action="append", default=[],
                    help=f"a capability to grant (repeatable), one of {', '.join(CAPABILITIES)}; "
                    "default: proc, models, system")
    args = ap.parse_args(argv)
    runtime.configure_logging("security")  # logs go to stderr; stdout carries only the token
    try:
        _, token = Security(args.state_dir or default_state_dir()).add_user(args.name, args.cap)
    except (UserExistsError, ValueError) as e:
        sys.stderr.write(f"adduser: {e}\n")
        return 1
    sys.stdout.write(token + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["adduser"]:
        return adduser(argv[1:])
    return runtime.serve("security", register, argv)


if __name__ == "__main__":
    sys.exit(main())
