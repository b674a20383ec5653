"""The audit log: one JSON line per privileged or refused call in `$LLMASOS_HOME/audit.log`
(mode 0600, rotated by size into audit.log.1 .. audit.log.N). Written by the Kernel's syscall
wrapper (kernel/server.py), its auth interceptor (kernel/auth.py) and llmosd's admin commands
(adduser, quota). Arguments are recorded only as short scalars, never tokens or prompts."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

MAX_BYTES = 10 << 20      # rotate past this size ...
BACKUPS = 5               # ... keeping this many old files
SECRET_FIELDS = {"token", "secret", "prompt", "messages", "payload", "text", "password"}
MAX_ARG_CHARS = 256


def scalar_args(request: Any) -> dict[str, Any]:
    """The arguments worth recording: the request's set scalar fields, minus anything secret
    or user content, strings cut short."""
    out: dict[str, Any] = {}
    if request is None or not hasattr(request, "ListFields"):
        return out
    for desc, value in request.ListFields():
        if desc.name in SECRET_FIELDS or not isinstance(value, (str, int, float, bool)):
            continue   # messages, repeated fields and bytes are content, not arguments
        out[desc.name] = value[:MAX_ARG_CHARS] if isinstance(value, str) else value
    return out


class AuditLog:
    def __init__(self, path: str | os.PathLike, max_bytes: int = MAX_BYTES,
                 backups: int = BACKUPS) -> None:
        self.path = Path(path)
        self.max_bytes, self.backups = max_bytes, backups
        self.lock = threading.Lock()

    def record(self, call: str, code: str = "OK", message: str = "", user: str = "",
               uid: int = -1, args: dict[str, Any] | None = None, peer: str = "") -> None:
        entry = {"time": round(time.time(), 6), "user": user, "uid": uid, "call": call,
                 "args": args or {}, "code": code, "message": message[:1000], "peer": peer}
        line = (json.dumps(entry, sort_keys=True, default=str) + "\n").encode()
        with self.lock:
            self._rotate_if_full(len(line))
            # O_APPEND from several processes (llmosd, `llmosd adduser`) keeps lines whole
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.fchmod(fd, 0o600)
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line   # a torn line from a crash stays apart from ours
                os.write(fd, line)
            finally:
                os.close(fd)

    def _rotate_if_full(self, incoming: int) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size + incoming <= self.max_bytes:
            return
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def tail(self, limit: int, user: str = "", call: str = "") -> list[dict[str, Any]]:
        """The last `limit` entries matching user and call, oldest first; older files are read
        only when the newer ones hold too few."""
        found: list[dict[str, Any]] = []
        files = [self.path] + [self.path.with_name(f"{self.path.name}.{i}")
                               for i in range(1, self.backups + 1)]
        for path in files:
            try:
                lines = path.read_text(errors="replace").splitlines()
            except FileNotFoundError:
                continue
            for line in reversed(lines):
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue   # a torn line from a crash: skip it, keep the rest
                if (not user or entry.get("user") == user) and \
                        (not call or entry.get("call") == call):
                    found.append(entry)
                    if len(found) >= limit:
                        return found[::-1]
        return found[::-1]
