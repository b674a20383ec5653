"""`python -m llmasos.services.security` serves llmasos.v1.Security (see services/runtime.py).

`python -m llmasos.services.security adduser NAME [--state-dir DIR] [--cap CAP ...]` edits the
store directly (under its file lock) and prints the new token once on stdout; this is what
`llmosd adduser NAME` runs.

`python -m llmasos.services.security quota NAME [--max-jobs N] [--max-tokens N] [--kv-share F]
[--reset]` changes (or, given no change, shows) a user's quota the same way; `llmosd quota` runs it.
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc

from llmasos.services import runtime
from llmasos.services.security import servicer
from llmasos.services.security.identity import CAPABILITIES, UnknownUserError, UserExistsError
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


def quota(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="llmosd quota",
                                 description="Show or change a user's quota (0: no limit).")
    ap.add_argument("name")
    ap.add_argument("--state-dir", default="", help="default: $LLMASOS_HOME or "
                    "~/.local/state/llmasos")
    ap.add_argument("--max-jobs", dest="max_jobs", type=int, help="most live jobs at once")
    ap.add_argument("--max-tokens", dest="max_tokens", type=int,
                    help="most tokens in flight (prompt + max_tokens of every live job)")
    ap.add_argument("--kv-share", dest="kv_share", type=float,
                    help="most KV blocks, as a share 0..1 of each model's pool")
    ap.add_argument("--reset", action="store_true", help="back to the defaults first")
    args = ap.parse_args(argv)
    runtime.configure_logging("security")
    changes = {f: getattr(args, f) for f in ("max_jobs", "max_tokens", "kv_share")
               if getattr(args, f) is not None}
    sec = Security(args.state_dir or default_state_dir())
    try:
        if changes or args.reset:
            ident = sec.set_quota(args.name, changes, reset=args.reset)
        else:
            ident = next((i for i in sec.list_users() if i.user == args.name), None)
            if ident is None:
                raise UnknownUserError(f"no user {args.name!r}")
    except (UnknownUserError, ValueError) as e:
        sys.stderr.write(f"quota: {e}\n")
        return 1
    sys.stdout.write(json.dumps({"user": ident.user, **vars(ident.quota)}) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["adduser"]:
        return adduser(argv[1:])
    if argv[:1] == ["quota"]:
        return quota(argv[1:])
    return runtime.serve("security", register, argv)


if __name__ == "__main__":
    sys.exit(main())
