"""llmasos-http: serve the OpenAI-compatible API and /metrics for a running llmosd.

    python -m llmasos.http [--listen 127.0.0.1:8080] [--kernel 127.0.0.1:7070]

Exits 2 when it cannot listen (llmosd then leaves it stopped instead of restarting it)."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import sys

import uvicorn

from llmasos import connect
from llmasos.version import version_string

DEFAULT_LISTEN = "127.0.0.1:8080"
EXIT_CANNOT_LISTEN = 2
PR_SET_PDEATHSIG = 1


def listen_socket(addr: str) -> socket.socket:
    host, _, port = addr.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except (OSError, ValueError) as e:
        sock.close()
        raise SystemExit(f"llmasos-http: cannot listen on {addr}: {e}; choose another address "
                         "with `llmosd run --http ADDR` or turn it off with --no-http") from None
    return sock


def follow_parent(pid: int) -> None:
    """Die with llmosd even if it is killed outright (Linux: PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != pid:   # it died before we asked
        raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llmasos-http", description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default=DEFAULT_LISTEN, help=f"default {DEFAULT_LISTEN}")
    ap.add_argument("--kernel", default=None, help="llmosd's address (default $LLMASOS_ADDR "
                    f"or {connect.DEFAULT_ADDR})")
    ap.add_argument("--log-level", default="warning")
    ap.add_argument("--parent", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--version", action="version", version=version_string("llmasos-http"))
    args = ap.parse_args(argv)
    if args.parent:
        follow_parent(args.parent)
    try:
        sock = listen_socket(args.listen)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return EXIT_CANNOT_LISTEN
    from llmasos.http.app import build
    config = uvicorn.Config(build(connect.address(args.kernel)), log_level=args.log_level,
                            access_log=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    print(f"llmasos-http ready {host}:{port}", flush=True)
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
