"""Security: the core of the security service. Resolves bearer tokens to identities and adds
users, over the shared on-disk store.

Authenticate is on the kernel's path for every new token, and scrypt costs ~35 ms, so a verified
token is cached (keyed by its SHA-256, not the token itself) until the store changes on disk.
Unknown tokens are rejected by the key_id index without any scrypt.
"""

from __future__ import annotations

import hashlib
import os
import threading

import structlog

from llmasos.services.security.identity import (
    DEFAULT_QUOTA,
    FIRST_USER_UID,
    ROOT_CAPABILITIES,
    ROOT_NAME,
    ROOT_QUOTA,
    ROOT_UID,
    Identity,
    Quota,
    UnknownUserError,
    UserExistsError,
    check_capabilities,
    check_name,
)
from llmasos.services.security.store import (
    MAX_TOKEN_LEN,
    TOKEN_PREFIX,
    Signature,
    Store,
    StoreData,
    UserRecord,
    key_id,
    new_token,
)

log = structlog.get_logger()


def default_state_dir() -> str:
    """$LLMASOS_HOME, else ~/.local/state/llmasos."""
    return os.environ.get("LLMASOS_HOME") or os.path.expanduser("~/.local/state/llmasos")


def quota_of(rec: UserRecord) -> Quota:
    """The quota in force: root's is unlimited, everyone else's the default, then root's
    overrides for this user."""
    base = ROOT_QUOTA if rec.uid == ROOT_UID else DEFAULT_QUOTA
    return base.updated(rec.quota)


def to_identity(rec: UserRecord) -> Identity:
    return Identity(user=rec.name, uid=rec.uid, capabilities=tuple(rec.capabilities),
                    quota=quota_of(rec))


class Security:
    def __init__(self, state_dir: str | os.PathLike) -> None:
        self.store = Store(state_dir)
        self._mu = threading.Lock()          # guards everything below
        self._sig: Signature | None = None
        self._generation = 0                 # bumps on every reload; stale verifications drop
        self._by_key: dict[str, UserRecord] = {}
        self._by_name: dict[str, UserRecord] = {}
        self._cache: dict[bytes, Identity] = {}
        self._first_boot()
        self._refresh()

    # -- store ---------------------------------------------------------------------------

    def _first_boot(self) -> None:
        """No store yet: create root, its token file first (a crash in between leaves no root
        without a token), then users.json."""
        if self.store.signature() is not None:
            return
        with self.store.lock():
            if self.store.signature() is not None:
                return  # another process booted while we waited
            token = new_token()
            root = UserRecord.create(ROOT_NAME, ROOT_UID, list(ROOT_CAPABILITIES), token)
            self.store.write_root_token(token)
            self.store.write(StoreData(next_uid=FIRST_USER_UID, users=[root]))
        log.info("security_first_boot", state_dir=str(self.store.dir),
                 root_token=str(self.store.root_token_path))

    def _refresh(self) -> None:
        """Reload if users.json changed on disk since we last read it."""
        sig = self.store.signature()
        if sig is None or sig == self._sig:
            return  # a vanished store keeps the last known users rather than locking all out
        try:
            data, sig = self.store.read()
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("security_store_unreadable", path=str(self.store.users_path), error=str(e))
            return
        self._load(data, sig)

    def _load(self, data: StoreData, sig: Signature) -> None:
        self._by_key = {u.key_id: u for u in data.users}
        self._by_name = {u.name: u for u in data.users}
        self._cache.clear()
        self._sig = sig
        self._generation += 1

    # -- the interface -------------------------------------------------------------------

    def authenticate(self, token: str) -> Identity | None:
        """The identity a bearer token belongs to, or None."""
        if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX) \
                or len(token) > MAX_TOKEN_LEN:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        with self._mu:
            self._refresh()
            if (hit := self._cache.get(digest)) is not None:
                return hit
            rec, generation = self._by_key.get(key_id(token)), self._generation
        if rec is None or not rec.verify(token):  # scrypt outside the lock
            return None
        ident = to_identity(rec)
        with self._mu:
            if generation == self._generation:
                self._cache[digest] = ident
        return ident

    def add_user(self, name: str, capabilities: list[str] | tuple[str, ...] | None = None,
                 ) -> tuple[Identity, str]:
        """Create a user; return its identity and its token (the only time it is seen).
        ValueError on a bad name or capability, UserExistsError when the name is taken."""
        check_name(name)
        caps = check_capabilities(capabilities)
        token = new_token()
        with self.store.lock():
            data, _ = self.store.read()
            if data.find(name) is not None:
                raise UserExistsError(f"user {name!r} already exists")
            rec = UserRecord.create(name, data.next_uid, list(caps), token)
            data.users.append(rec)
            data.next_uid += 1
            self.store.write(data)
            data, sig = self.store.read()
        with self._mu:
            self._load(data, sig)
        log.info("user_added", user=name, uid=rec.uid, capabilities=list(caps))
        return to_identity(rec), token

    def set_quota(self, name: str, changes: dict[str, float], reset: bool = False) -> Identity:
        """Change a user's quota overrides (reset: drop them first); return the new identity.
        UnknownUserError for an unknown user, ValueError for a bad value."""
        DEFAULT_QUOTA.updated(changes)   # validate before taking the lock
        with self.store.lock():
            data, _ = self.store.read()
            rec = data.find(name)
            if rec is None:
                raise UnknownUserError(f"no user {name!r}; add one with `llmosd adduser {name}`")
            rec.quota = {**({} if reset else rec.quota), **changes}
            self.store.write(data)
            data, sig = self.store.read()
        with self._mu:
            self._load(data, sig)
        ident = to_identity(data.find(name))
        log.info("quota_set", user=name, quota=vars(ident.quota))
        return ident

    def list_users(self) -> list[Identity]:
        with self._mu:
            self._refresh()
            users = list(self._by_name.values())
        return sorted((to_identity(u) for u in users), key=lambda i: i.uid)
