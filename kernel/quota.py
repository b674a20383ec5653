"""Per-user quotas: the limits the security service keeps for each user and the pure checks the
kernel makes against them (sys_spawn, the step loop). 0 means "no limit" in every field."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmasos.syscalls import SyscallError

if TYPE_CHECKING:
    from llmasos.kernel.auth import Identity


@dataclass(frozen=True)
class Quota:
    max_jobs: int = 0        # most live jobs at once
    max_tokens: int = 0      # most tokens in flight: prompt + max_tokens of every live job
    kv_share: float = 0.0    # most KV blocks, as a share (0..1] of a model's pool

    @classmethod
    def from_pb(cls, pb: object) -> Quota:
        return cls(int(pb.max_jobs), int(pb.max_tokens), float(pb.kv_share))

    def to_dict(self) -> dict[str, float]:
        return {"max_jobs": self.max_jobs, "max_tokens": self.max_tokens,
                "kv_share": self.kv_share}


UNLIMITED = Quota()
FIX = "ask root to raise it with `llmosd quota {user} {flag} N` (or the SetQuota syscall)"


def in_flight(live_procs: Iterable[Any], user: str) -> tuple[int, int]:
    """(live jobs, tokens in flight) of one user; a job's tokens are its prompt plus the
    max_tokens it may still produce, the KV it may come to hold."""
    jobs = tokens = 0
    for p in live_procs:
        if p.user == user:
            jobs += 1
            tokens += len(p.prompt_ids) + p.max_tokens
    return jobs, tokens


def check_spawn(ident: Identity, live_jobs_of_user: int, tokens_in_flight_of_user: int,
                new_tokens: int, new_jobs: int = 1) -> None:
    """Refuse a Spawn that would take the caller past a quota (RESOURCE_EXHAUSTED)."""
    q = ident.quota
    if ident.root:
        return
    if q.max_jobs and live_jobs_of_user + new_jobs > q.max_jobs:
        raise SyscallError("RESOURCE_EXHAUSTED", (
            f"quota: {ident.user} may have at most {q.max_jobs} live jobs and has "
            f"{live_jobs_of_user} (this request adds {new_jobs}); wait for some to end, or "
            + FIX.format(user=ident.user, flag="--max-jobs")))
    if q.max_tokens and tokens_in_flight_of_user + new_tokens > q.max_tokens:
        raise SyscallError("RESOURCE_EXHAUSTED", (
            f"quota: {ident.user} may have at most {q.max_tokens} tokens in flight and has "
            f"{tokens_in_flight_of_user} (this request adds {new_tokens}); lower max_tokens, "
            "wait for jobs to end, or " + FIX.format(user=ident.user, flag="--max-tokens")))


def kv_limit_blocks(ident: Identity, pool_blocks: int) -> int:
    """The most KV blocks of a pool of pool_blocks the caller may hold at once (at least one)."""
    share = ident.quota.kv_share
    if ident.root or share <= 0 or share >= 1:
        return pool_blocks
    return max(1, int(share * pool_blocks))
