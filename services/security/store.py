"""The user store: `<state_dir>/users.json` (mode 0600) holding users and salted token hashes.

Writers take an fcntl lock on `users.lock`, re-read the file, and replace it atomically
(tmp + rename), so the service and `llmosd adduser` can edit it at the same time. Readers never
lock: a rename is atomic, and a changed (inode, mtime, size) signature tells them to reload.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

TOKEN_PREFIX = "llmos_"
MAX_TOKEN_LEN = 128
# scrypt cost: ~35 ms per hash on the reference CPU; 16 MiB of memory.
KDF = {"name": "scrypt", "n": 1 << 14, "r": 8, "p": 1, "dklen": 32}
FORMAT_VERSION = 1

Signature = tuple[int, int, int]  # (inode, mtime_ns, size) of users.json


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def key_id(token: str) -> str:
    """A short public index from token to user, so a lookup costs one scrypt, not one per user.
    64 bits of SHA-256 of a 256-bit random token reveal nothing usable about it."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def hash_token(token: str, salt: bytes, kdf: dict | None = None) -> bytes:
    k = kdf or KDF
    return hashlib.scrypt(token.encode(), salt=salt, n=k["n"], r=k["r"], p=k["p"],
                          dklen=k["dklen"])


@dataclass
class UserRecord:
    name: str
    uid: int
    capabilities: list[str]
    key_id: str
    salt: str        # hex
    hash: str        # hex, scrypt(token, salt)
    kdf: dict = field(default_factory=lambda: dict(KDF))
    created: float = 0.0
    quota: dict = field(default_factory=dict)   # overrides of the default quota set by root

    @classmethod
    def create(cls, name: str, uid: int, capabilities: list[str], token: str) -> UserRecord:
        salt = secrets.token_bytes(16)
        return cls(name=name, uid=uid, capabilities=list(capabilities), key_id=key_id(token),
                   salt=salt.hex(), hash=hash_token(token, salt).hex(), created=time.time())

    def verify(self, token: str) -> bool:
        digest = hash_token(token, bytes.fromhex(self.salt), self.kdf)
        return hmac.compare_digest(digest, bytes.fromhex(self.hash))


@dataclass
class StoreData:
    next_uid: int
    users: list[UserRecord]

    def find(self, name: str) -> UserRecord | None:
        return next((u for u in self.users if u.name == name), None)


class Store:
    """The files under the state directory; knows nothing of caching or identities."""

    def __init__(self, state_dir: str | os.PathLike) -> None:
        self.dir = Path(state_dir)
        self.users_path = self.dir / "users.json"
        self.lock_path = self.dir / "users.lock"
        self.root_token_path = self.dir / "root.token"
        make_private_dir(self.dir)

    def signature(self) -> Signature | None:
        try:
            st = os.stat(self.users_path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def read(self) -> tuple[StoreData, Signature]:
        """Load the store and the signature of the exact file that was read."""
        with open(self.users_path, encoding="utf-8") as f:
            st = os.fstat(f.fileno())
            raw = json.load(f)
        data = StoreData(next_uid=int(raw["next_uid"]),
                         users=[UserRecord(**u) for u in raw["users"]])
        return data, (st.st_ino, st.st_mtime_ns, st.st_size)

    def write(self, data: StoreData) -> None:
        """Replace users.json atomically; call with lock() held."""
        body = {"version": FORMAT_VERSION, "next_uid": data.next_uid,
                "users": [asdict(u) for u in data.users]}
        tmp = self.dir / f".users.json.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            write_private(tmp, json.dumps(body, indent=1).encode() + b"\n")
            os.replace(tmp, self.users_path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        fsync_dir(self.dir)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive writer lock, across processes and threads (each call opens its own fd)."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def write_root_token(self, token: str) -> None:
        """Create root.token 0600 from the first byte (O_EXCL: never an older, looser file)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.root_token_path)  # a leftover from a store that no longer exists
        write_private(self.root_token_path, token.encode() + b"\n")


def make_private_dir(path: Path) -> None:
    """Create the state directory 0700 (parents with the default mode)."""
    if path.is_dir():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # a umask like 0o277 would leave us a dir we cannot write


def write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
