"""Who a caller is and what it may do: the capability names, the user name rule, Identity."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

# Capability names are fixed: the kernel's syscall table refers to them by these strings.
CAPABILITIES: dict[str, str] = {
    "proc": "spawn/wait/read/kill/nice/stat/ps on one's own jobs",
    "models": "list models",
    "system": "whoami, services",
    "admin": "deploy/undeploy, act on others' jobs, see all jobs, negative nice, quotas, audit",
}
ROOT_CAPABILITIES: tuple[str, ...] = ("proc", "models", "system", "admin")
DEFAULT_CAPABILITIES: tuple[str, ...] = ("proc", "models", "system")

ROOT_NAME = "root"
ROOT_UID = 0
FIRST_USER_UID = 1000

NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")


@dataclass(frozen=True)
class Quota:
    """A user's limits; 0 means no limit. The kernel enforces them (kernel/quota.py)."""

    max_jobs: int = 0        # most live jobs at once
    max_tokens: int = 0      # most tokens in flight (prompt + max_tokens of each live job)
    kv_share: float = 0.0    # most KV blocks as a share (0..1] of a model's pool

    def updated(self, changes: dict[str, float]) -> Quota:
        """This quota with `changes` applied; ValueError on a bad field or value."""
        unknown = set(changes) - QUOTA_FIELDS
        if unknown:
            raise ValueError(f"unknown quota fields {sorted(unknown)}; known: "
                             f"{sorted(QUOTA_FIELDS)}")
        for name in ("max_jobs", "max_tokens"):
            if name in changes and (int(changes[name]) != changes[name] or changes[name] < 0):
                raise ValueError(f"{name} must be a whole number >= 0 (0: no limit), "
                                 f"got {changes[name]}")
        if "kv_share" in changes and not 0.0 <= changes["kv_share"] <= 1.0:
            raise ValueError(f"kv_share must be in [0, 1] (0: no limit), "
                             f"got {changes['kv_share']}")
        return replace(self, **{k: type(getattr(self, k))(v) for k, v in changes.items()})


QUOTA_FIELDS = {"max_jobs", "max_tokens", "kv_share"}
# Enough for real work, small enough that one user cannot take the whole queue or pool.
DEFAULT_QUOTA = Quota(max_jobs=64, max_tokens=65536, kv_share=0.5)
ROOT_QUOTA = Quota()   # unlimited


class UnknownUserError(KeyError):
    """No such user (maps to NOT_FOUND)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown user"


class UserExistsError(KeyError):
    """The user name is taken (maps to ALREADY_EXISTS)."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else "user exists"


@dataclass(frozen=True)
class Identity:
    user: str
    uid: int
    capabilities: tuple[str, ...]
    quota: Quota = field(default=ROOT_QUOTA)

    @property
    def root(self) -> bool:
        return self.uid == ROOT_UID

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


def check_name(name: str) -> str:
    """Return name if it is a legal user name, else raise ValueError."""
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise ValueError(
            f"bad user name {name!r}: 1..32 chars of [a-z0-9_-], starting with a letter")
    return name


def check_capabilities(capabilities: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Normalise a capability list (None or empty: the default user set); unknown → ValueError."""
    if not capabilities:
        return DEFAULT_CAPABILITIES
    unknown = [c for c in capabilities if c not in CAPABILITIES]
    if unknown:
        raise ValueError(f"unknown capabilities {unknown}; known: {sorted(CAPABILITIES)}")
    return tuple(c for c in ROOT_CAPABILITIES if c in capabilities)  # canonical order, no dups
