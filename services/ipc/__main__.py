"""`python -m llmasos.services.ipc` serves llmasos.v1.Ipc (see services/runtime.py).

Options (`--option KEY=VALUE`): max_bytes (payload bytes held in all mailboxes, default 256 MiB),
max_mailboxes (default 4096), sync (normal or full: see store.py). Mailboxes are kept in
<state-dir>/ipc/mailboxes.db; without a state dir they live in memory only.
"""

from __future__ import annotations

import argparse
import sys

import grpc

from llmasos.services import runtime
from llmasos.services.ipc import servicer
from llmasos.services.ipc.mailboxes import MAX_BYTES, MAX_MAILBOXES, Mailboxes
from llmasos.services.ipc.store import Store, db_path

# Blocked receivers each hold a server thread: serve with more threads than runtime's default,
# and keep a few free for Send, so receivers can never starve the senders they wait for.
WORKERS = 128
SPARE_WORKERS = 4


def register(server: grpc.Server, args: argparse.Namespace) -> list[str]:
    opts = runtime.options(args)
    mailboxes = Mailboxes(max_bytes=int(opts.get("max_bytes", MAX_BYTES)),
                          max_mailboxes=int(opts.get("max_mailboxes", MAX_MAILBOXES)),
                          max_waiters=max(1, args.workers - SPARE_WORKERS),
                          store=Store(db_path(args.state_dir), opts.get("sync", "normal")))
    return servicer.register(server, mailboxes)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Our default goes first; a --workers given on the command line comes later and wins.
    return runtime.serve("ipc", register, ["--workers", str(WORKERS), *argv])


if __name__ == "__main__":
    sys.exit(main())
