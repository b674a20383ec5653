"""kernel/quota.py: the pure checks the kernel makes against a user's quota, and the security
service's quota store (defaults, overrides, validation)."""

from __future__ import annotations

import pytest

from llmasos.kernel.auth import Identity
from llmasos.kernel.proctable import ProcessTable
from llmasos.kernel.quota import Quota, check_spawn, in_flight, kv_limit_blocks
from llmasos.services.security.identity import DEFAULT_QUOTA, UnknownUserError
from llmasos.services.security.security import Security
from llmasos.syscalls import SyscallError

USER = Identity("alice", 1000, False, frozenset({"proc"}), Quota(4, 1000, 0.25))
ROOT = Identity("root", 0, True, frozenset({"admin"}), Quota(1, 1, 0.1))
FREE = Identity("bob", 1001, False, frozenset({"proc"}), Quota())


def refusal(*args: object, **kw: object) -> SyscallError:
    with pytest.raises(SyscallError) as err:
        check_spawn(*args, **kw)
    assert err.value.code == "RESOURCE_EXHAUSTED"
    return err.value


def test_check_spawn_within_limits_passes() -> None:
    check_spawn(USER, 3, 500, 500)           # exactly at both limits
    check_spawn(USER, 0, 0, 1000, new_jobs=4)


def test_check_spawn_names_the_limit_and_the_fix() -> None:
    e = refusal(USER, 4, 0, 10)
    assert "at most 4 live jobs" in e.message and "--max-jobs" in e.message
    e = refusal(USER, 2, 0, 10, new_jobs=3)
    assert "adds 3" in e.message
    e = refusal(USER, 0, 900, 101)
    assert "1000 tokens in flight" in e.message and "--max-tokens" in e.message


def test_root_and_zero_limits_are_unlimited() -> None:
    check_spawn(ROOT, 10**6, 10**9, 10**9, new_jobs=100)
    check_spawn(FREE, 10**6, 10**9, 10**9)
    assert kv_limit_blocks(ROOT, 1000) == 1000
    assert kv_limit_blocks(FREE, 1000) == 1000


def test_kv_limit_is_a_share_of_the_pool_and_at_least_one_block() -> None:
    assert kv_limit_blocks(USER, 1000) == 250
    assert kv_limit_blocks(USER, 3) == 1
    full = Identity("c", 1002, False, frozenset(), Quota(0, 0, 1.0))
    assert kv_limit_blocks(full, 77) == 77


def test_in_flight_counts_one_users_live_jobs_and_their_token_reservations() -> None:
    table = ProcessTable(zombie_ttl=60)
    for user, prompt, most in [("alice", 5, 10), ("alice", 3, 100), ("bob", 7, 1)]:
        table.spawn(user=user, uid=1, ppid=0, model="m", nice=0, prompt_ids=list(range(prompt)),
                    max_tokens=most)
    assert in_flight(table.live(), "alice") == (2, 118)
    assert in_flight(table.live(), "bob") == (1, 8)
    assert in_flight(table.live(), "carol") == (0, 0)


def test_store_defaults_overrides_and_reset(tmp_path) -> None:
    sec = Security(tmp_path)
    ident, token = sec.add_user("carol")
    assert ident.quota == DEFAULT_QUOTA
    root = next(i for i in sec.list_users() if i.user == "root")
    assert (root.quota.max_jobs, root.quota.max_tokens, root.quota.kv_share) == (0, 0, 0.0)
    got = sec.set_quota("carol", {"max_jobs": 2})
    assert (got.quota.max_jobs, got.quota.max_tokens) == (2, DEFAULT_QUOTA.max_tokens)
    assert sec.authenticate(token).quota.max_jobs == 2          # the cache saw the change
    assert Security(tmp_path).authenticate(token).quota.max_jobs == 2   # and it is on disk
    got = sec.set_quota("carol", {"kv_share": 0.1}, reset=True)
    assert got.quota.max_jobs == DEFAULT_QUOTA.max_jobs and got.quota.kv_share == 0.1
    with pytest.raises(UnknownUserError):
        sec.set_quota("nobody", {"max_jobs": 1})
    for bad in ({"max_jobs": -1}, {"kv_share": 1.5}, {"max_tokens": 1.5}, {"cpu": 1}):
        with pytest.raises(ValueError):
            sec.set_quota("carol", bad)
