"""Who a caller is and what it may do: the capability names, the user name rule, Identity."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Capability names are fixed: the kernel's syscall table refers to them by these strings.
CAPABILITIES: dict[str, str] = {
    "proc": "spawn/wait/read/kill/nice/stat/ps on one's own jobs",
    "models": "list models",
    "system": "whoami, services",
    "admin": "deploy/undeploy, act on others' jobs, see all jobs, negative nice",
}
ROOT_CAPABILITIES: tuple[str, ...] = ("proc", "models", "system", "admin")
DEFAULT_CAPABILITIES: tuple[str, ...] = ("proc", "models", "system")

ROOT_NAME = "root"
ROOT_UID = 0
FIRST_USER_UID = 1000

NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")


class UserExistsError(KeyError):
    """The user name is taken (maps to ALREADY_EXISTS)."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else "user exists"


@dataclass(frozen=True)
class Identity:
    user: str
    uid: int
    capabilities: tuple[str, ...]

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
