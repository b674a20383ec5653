"""Join tokens: what a node shows the head to join it (`llmosd node token` makes one). Only an
admin who can write the head's state directory can make one, as with `llmosd adduser`. The
file keeps each token's SHA-256 and expiry, never the token; a token serves any number of
joins until it expires (a node that lost its head joins again with it).

    HOME/nodes/join-tokens.json   {"<sha256 hex>": <expiry, seconds since the epoch>, ...}
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

DEFAULT_TTL = 24 * 3600.0   # a day, as kubeadm's join tokens
PREFIX = "llmj-"            # tells a join token from a user's token at a glance


def path(home: str) -> Path:
    return Path(home) / "nodes" / "join-tokens.json"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@contextlib.contextmanager
def locked(home: str) -> Iterator[dict[str, float]]:
    """The token table under an exclusive lock; written back (0600) when the block ends."""
    where = path(home)
    where.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(where.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = read(home)
        yield table
        tmp = where.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(table, f)
        os.replace(tmp, where)


def read(home: str) -> dict[str, float]:
    try:
        return {k: float(v) for k, v in json.loads(path(home).read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def create(home: str, ttl: float = DEFAULT_TTL, now: float | None = None) -> tuple[str, float]:
    """A new token and its expiry; expired ones are dropped from the file meanwhile."""
    now = time.time() if now is None else now
    token = PREFIX + secrets.token_urlsafe(32)
    with locked(home) as table:
        for key in [k for k, exp in table.items() if exp <= now]:
            del table[key]
        table[digest(token)] = now + ttl
    return token, now + ttl


def check(home: str, token: str, now: float | None = None) -> str:
    """"" when the token admits a node; else why not, for an UNAUTHENTICATED answer."""
    now = time.time() if now is None else now
    expiry = read(home).get(digest(token))
    if expiry is None:
        return "unknown join token; make one on the head with `llmosd node token`"
    if expiry <= now:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expiry))
        return f"the join token expired at {when}; make a new one with `llmosd node token`"
    return ""
