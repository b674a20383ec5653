"""The kernel's pager: unit tests per operation, and a hypothesis state machine that drives
random operation sequences against a model of the physical pool's contents."""

import copy

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llmasos.kernel.block_pool import BlockPool
from llmasos.kernel.pager import OutOfBlocks, Pager
from llmasos.kernel.prefix_cache import ROOT, block_digest, block_key

BS = 4


def computed_pager(pager: Pager, pid: int, user: str, tokens: list[int]) -> int:
    """Admit and 'run' the whole prompt: its KV is now in the pool."""
    cached = pager.admit(pid, user, tokens)
    pager.mark_computed(pid, len(tokens))
    return cached


def snapshot(pager: Pager) -> tuple:
    p = pager.pool
    return (
        list(p.ref), list(p.free_queue), dict(p.cached), list(p.digest),
        copy.deepcopy(pager.seqs),
    )


# --- admit / block tables ----------------------------------------------------------------


def test_admit_cold_allocates_whole_prompt():
    pager = Pager(8, BS)
    assert pager.admit(1, "alice", list(range(10))) == 0
    table = pager.block_table(1)
    assert len(table) == 3 and len(set(table)) == 3
    assert pager.free_blocks == 5
    assert pager.num_tokens(1) == 10 and pager.num_computed(1) == 0
    assert all(pager.pool.ref[b] == 1 for b in table)


def test_slot_mapping_follows_block_table():
    pager = Pager(8, BS)
    pager.admit(1, "alice", [5, 6, 7])
    pager.admit(2, "alice", list(range(9)))
    table = pager.block_table(2)
    slots = pager.slot_mapping(2, 2, 9)
    assert slots == [table[p // BS] * BS + p % BS for p in range(2, 9)]
    assert slots[2] == table[1] * BS  # position 4 opens the second block
    with pytest.raises(ValueError):
        pager.slot_mapping(2, 0, 10)


def test_admit_rejects_duplicates_and_empty_prompts():
    pager = Pager(8, BS)
    pager.admit(1, "alice", [1, 2])
    with pytest.raises(ValueError):
        pager.admit(1, "alice", [1, 2])
    with pytest.raises(ValueError):
        pager.admit(2, "alice", [])
    with pytest.raises(KeyError):
        pager.block_table(99)


def test_out_of_blocks_has_no_side_effects_and_carries_counts():
    pager = Pager(4, BS)
    pager.admit(1, "alice", list(range(9)))  # 3 blocks
    before = snapshot(pager)
    with pytest.raises(OutOfBlocks) as err:
        pager.admit(2, "alice", list(range(100, 108)))  # 2 blocks, 1 free
    assert (err.value.needed, err.value.free) == (2, 1)
    assert "2 blocks needed, 1 free" in str(err.value)
    assert snapshot(pager) == before
    assert 2 not in pager
    assert not pager.can_admit(8) and pager.can_admit(4)


# --- prefix cache ----------------------------------------------------------------------------


def test_prefix_hit_shares_full_computed_blocks():
    pager = Pager(16, BS)
    prompt = list(range(10))  # blocks [0..3] [4..7] [8 9]
    assert computed_pager(pager, 1, "alice", prompt) == 0
    assert pager.admit(2, "alice", prompt[:8] + [42, 43]) == 8
    t1, t2 = pager.block_table(1), pager.block_table(2)
    assert t1[:2] == t2[:2] and t1[2] != t2[2]
    assert [pager.pool.ref[b] for b in t1] == [2, 2, 1]
    assert pager.num_computed(2) == 8


def test_prefix_hit_never_covers_the_whole_prompt():
    pager = Pager(16, BS)
    prompt = list(range(8))  # exactly two full blocks
    computed_pager(pager, 1, "alice", prompt)
    assert pager.admit(2, "alice", prompt) == 4  # the last block is recomputed for logits
    assert pager.block_table(2)[0] == pager.block_table(1)[0]
    assert pager.block_table(2)[1] != pager.block_table(1)[1]


def test_uncomputed_blocks_are_not_cached():
    pager = Pager(16, BS)
    pager.admit(1, "alice", list(range(10)))
    pager.mark_computed(1, 6)  # only the first block is full and computed
    assert pager.admit(2, "alice", list(range(10))) == 4


def test_users_never_share_blocks():
    pager = Pager(16, BS)
    prompt = list(range(12))
    computed_pager(pager, 1, "alice", prompt)
    assert pager.admit(2, "bob", prompt) == 0
    assert not set(pager.block_table(1)) & set(pager.block_table(2))
    assert pager.admit(3, "alice", prompt) == 8


def test_decoded_blocks_are_cached_once_computed():
    pager = Pager(16, BS)
    computed_pager(pager, 1, "alice", [1, 2, 3])
    pager.append(1, [4])  # block 0 full, but token 4's KV is not computed yet
    assert pager.admit(2, "alice", [1, 2, 3, 4, 5]) == 0
    pager.mark_computed(1, 4)
    assert pager.admit(3, "alice", [1, 2, 3, 4, 5]) == 4


def test_freed_blocks_keep_their_prefix_until_reused():
    pager = Pager(4, BS)
    prompt = list(range(13))  # 3 full blocks + 1 token: the whole pool
    computed_pager(pager, 1, "alice", prompt)
    first = pager.block_table(1)
    pager.free(1)
    assert pager.free_blocks == 4 and pager.usage().cached_blocks == 3
    assert pager.admit(2, "alice", prompt) == 12  # revived from the free queue
    assert pager.block_table(2)[:3] == first[:3]
    pager.free(2)
    # freed in reverse: the partial block, then the third full one, are evicted first
    pager.admit(3, "alice", [99] * 5)
    assert set(pager.block_table(3)) == {first[3], first[2]}
    pager.free(3)
    assert pager.admit(4, "alice", prompt) == 8


def test_revived_blocks_count_against_free_space():
    pager = Pager(4, BS)
    prompt = list(range(9))
    computed_pager(pager, 1, "alice", prompt)
    pager.free(1)
    pager.admit(2, "bob", [7] * 4)  # takes one free block (the uncached one)
    assert pager.admit(3, "alice", prompt) == 8  # two revived + one fresh = three blocks
    assert pager.free_blocks == 0


def test_digest_collision_never_matches():
    pool = BlockPool(4)
    key = block_key(ROOT, "alice", [1, 2, 3, 4])
    digest = block_digest(key)
    pool.cache(0, digest, key)
    assert pool.lookup(digest, key) == 0
    # same digest, different content: as if the hash collided
    assert pool.lookup(digest, block_key(ROOT, "alice", [1, 2, 3, 5])) is None
    assert pool.lookup(digest, block_key(ROOT, "bob", [1, 2, 3, 4])) is None
    assert pool.lookup(digest, block_key(b"x" * 16, "alice", [1, 2, 3, 4])) is None


def test_digest_depends_on_parent_user_and_tokens():
    base = block_digest(block_key(ROOT, "alice", [1, 2]))
    assert base == block_digest(block_key(ROOT, "alice", (1, 2)))
    assert base != block_digest(block_key(ROOT, "bob", [1, 2]))
    assert base != block_digest(block_key(ROOT, "alice", [2, 1]))
    assert base != block_digest(block_key(base, "alice", [1, 2]))


# --- append / copy-on-write / fork ------------------------------------------------------------


def test_append_grows_a_block_at_a_time():
    pager = Pager(8, BS)
    pager.admit(1, "alice", [1, 2, 3])
    assert pager.blocks_to_append(1) == 0
    assert pager.append(1, [4]) == []
    assert len(pager.block_table(1)) == 1
    assert pager.blocks_to_append(1) == 1 and pager.blocks_to_append(1, 5) == 2
    assert pager.append(1, [5]) == []
    assert len(pager.block_table(1)) == 2 and pager.num_tokens(1) == 5
    assert pager.slot_mapping(1, 4, 5) == [pager.block_table(1)[1] * BS]


def test_append_out_of_blocks_is_atomic():
    pager = Pager(2, BS)
    pager.admit(1, "alice", [1, 2, 3, 4])
    before = snapshot(pager)
    with pytest.raises(OutOfBlocks) as err:
        pager.append(1, list(range(9)))  # 13 tokens need 4 blocks
    assert (err.value.needed, err.value.free) == (3, 1)
    assert snapshot(pager) == before


def test_fork_shares_and_copies_the_partial_block_on_write():
    pager = Pager(8, BS)
    computed_pager(pager, 1, "alice", [1, 2, 3, 4, 5, 6])
    pager.fork(1, 2)
    parent = pager.block_table(1)
    assert pager.block_table(2) == parent
    assert all(pager.pool.ref[b] == 2 for b in parent)
    assert pager.blocks_to_append(2) == 1  # the copy
    copies = pager.append(2, [7])
    child = pager.block_table(2)
    assert copies == [(parent[1], child[1])]
    assert child[0] == parent[0] and child[1] != parent[1]
    assert pager.block_table(1) == parent  # the parent's view is intact
    assert pager.pool.ref[parent[1]] == 1
    assert pager.append(1, [8]) == []  # now private: written in place
    assert pager.num_tokens(1) == pager.num_tokens(2) == 7


def test_fork_at_a_block_boundary_needs_no_copy():
    pager = Pager(8, BS)
    computed_pager(pager, 1, "alice", [1, 2, 3, 4])
    pager.fork(1, 2)
    assert pager.append(2, [5]) == [] and pager.append(1, [6]) == []
    assert pager.block_table(1)[0] == pager.block_table(2)[0]
    assert pager.block_table(1)[1] != pager.block_table(2)[1]
    with pytest.raises(ValueError):
        pager.fork(1, 2)


def test_free_releases_everything_and_is_idempotent():
    pager = Pager(8, BS)
    pager.admit(1, "alice", list(range(6)))
    pager.fork(1, 2)
    assert pager.free(1) == 2
    assert pager.free_blocks == 6  # the child still holds both
    assert pager.free(2) == 2 and pager.free(2) == 0
    assert pager.free_blocks == 8 and not any(pager.pool.ref)


# --- swap / reset / usage ------------------------------------------------------------------


def test_swap_out_and_in_restores_the_sequence():
    pager = Pager(7, BS)
    computed_pager(pager, 1, "alice", list(range(10)))
    pager.append(1, [10])
    table = pager.block_table(1)
    assert pager.swap_out(1) == table
    assert pager.is_swapped(1) and pager.free_blocks == 7
    assert pager.usage().blocks_by_pid == {1: 0}
    with pytest.raises(ValueError):
        pager.append(1, [11])
    pager.admit(2, "bob", list(range(12)))  # reuse the swapped blocks meanwhile
    new = pager.swap_in(1)
    assert len(new) == 3 and not set(new) & set(pager.block_table(2))
    assert pager.block_table(1) == new
    assert (pager.num_tokens(1), pager.num_computed(1)) == (11, 10)
    assert pager.admit(3, "alice", list(range(10))) == 8  # republished after swap-in
    with pytest.raises(ValueError):
        pager.swap_in(1)


def test_swap_in_out_of_blocks_keeps_it_swapped():
    pager = Pager(3, BS)
    pager.admit(1, "alice", list(range(8)))
    pager.swap_out(1)
    pager.admit(2, "alice", list(range(100, 112)))
    with pytest.raises(OutOfBlocks):
        pager.swap_in(1)
    assert pager.is_swapped(1)
    pager.free(2)
    assert len(pager.swap_in(1)) == 2


def test_reset_forgets_all_contents():
    pager = Pager(8, BS)
    computed_pager(pager, 1, "alice", list(range(9)))
    pager.admit(2, "bob", [1])
    pager.admit(3, "bob", [2])
    pager.swap_out(3)
    assert pager.reset() == [1, 2, 3]
    assert pager.free_blocks == 8 and 1 not in pager
    assert pager.usage().cached_blocks == 0
    assert pager.admit(4, "alice", list(range(9))) == 0


def test_usage_counts_per_pid_and_per_user():
    pager = Pager(16, BS)
    pager.admit(1, "alice", list(range(6)))
    pager.fork(1, 2)
    pager.append(2, [9])  # copy of the partial block: alice now holds 3 distinct blocks
    pager.admit(3, "bob", [1])
    u = pager.usage()
    assert u.blocks_by_pid == {1: 2, 2: 2, 3: 1}
    assert u.blocks_by_user == {"alice": 3, "bob": 1}
    assert (u.total_blocks, u.free_blocks, u.block_size) == (16, 12, BS)


# --- random operation sequences ----------------------------------------------------------------

BASES = [list(range(1, 13)), list(range(1, 7)) + [20, 21, 22, 23, 24, 25], [30] * 12]
USERS = ["alice", "bob"]


class PagerMachine(RuleBasedStateMachine):
    """Drives the pager and plays the inference service: `kv` is the physical pool, one entry
    per slot, holding what a real KV would depend on (the token prefix up to that position)."""

    def __init__(self) -> None:
        super().__init__()
        self.pager = Pager(16, BS)
        self.kv: dict[int, tuple[int, ...]] = {}
        self.host: dict[int, list[tuple[int, ...] | None]] = {}
        self.next_pid = 1

    # -- helpers
    def resident(self) -> list[int]:
        return sorted(p for p, s in self.pager.seqs.items() if not s.swapped)

    def swapped(self) -> list[int]:
        return sorted(p for p, s in self.pager.seqs.items() if s.swapped)

    def new_pid(self) -> int:
        self.next_pid += 1
        return self.next_pid

    def attempt(self, op, *args):
        before = snapshot(self.pager)
        try:
            return op(*args)
        except OutOfBlocks as err:
            event("out of blocks")
            assert err.needed > err.free == self.pager.free_blocks
            assert snapshot(self.pager) == before
            return None

    # -- rules
    @rule(
        user=st.sampled_from(USERS),
        base=st.sampled_from(BASES),
        cut=st.integers(0, 12),
        tail=st.lists(st.integers(0, 3), max_size=6),
        run=st.booleans(),
    )
    def admit(self, user, base, cut, tail, run=False):
        prompt = list(base[:cut]) + tail
        if not prompt:
            return
        pid = self.new_pid()
        cached = self.attempt(self.pager.admit, pid, user, prompt)
        if cached is None:
            return
        assert cached % BS == 0 and 0 <= cached < len(prompt)
        if cached:
            event("prefix hit")
        if any(self.pager.seqs[p].user != user for p in self.pager.seqs if p != pid) and cached:
            event("prefix hit with another user resident")
        slots = self.pager.slot_mapping(pid, 0, cached)
        assert [self.kv.get(s) for s in slots] == [tuple(prompt[: p + 1]) for p in range(cached)]
        if run:  # the prefill runs at once
            self.compute_pid(pid, len(prompt))

    @precondition(lambda self: self.pager.seqs)
    @rule(
        data=st.data(),
        other_user=st.booleans(),
        tail=st.lists(st.integers(0, 3), max_size=3),
        run=st.booleans(),
    )
    def readmit(self, data, other_user, tail, run):
        # a known history again (recompute after preemption, a shared system prompt)
        seq = self.pager.seqs[data.draw(st.sampled_from(sorted(self.pager.seqs)))]
        user = USERS[1 - USERS.index(seq.user)] if other_user else seq.user
        self.admit(user, seq.tokens, len(seq.tokens), tail, run)

    @precondition(lambda self: self.resident())
    @rule(data=st.data(), tokens=st.lists(st.integers(0, 3), min_size=1, max_size=6))
    def append(self, data, tokens):
        self.append_pid(data.draw(st.sampled_from(self.resident())), tokens)

    def append_pid(self, pid: int, tokens: list[int]) -> None:
        need = self.pager.blocks_to_append(pid, len(tokens))
        free = self.pager.free_blocks
        copies = self.attempt(self.pager.append, pid, tokens)
        if copies is None:
            assert need > free
            return
        assert self.pager.free_blocks == free - need
        if copies:
            event("copy-on-write")
        for src, dst in copies:  # what the inference service does with the descriptors
            for off in range(BS):
                value = self.kv.get(src * BS + off)
                if value is None:
                    self.kv.pop(dst * BS + off, None)
                else:
                    self.kv[dst * BS + off] = value

    @precondition(lambda self: self.resident())
    @rule(data=st.data(), k=st.integers(1, 10))
    def compute(self, data, k):
        self.compute_pid(data.draw(st.sampled_from(self.resident())), k)

    @precondition(lambda self: self.resident())
    @rule(k=st.integers(1, 4))
    def step(self, k):
        # what the scheduler does: every resident process advances in one batch
        for pid in self.resident():
            self.compute_pid(pid, k)

    def compute_pid(self, pid: int, k: int) -> None:
        """Play a step: write the KV of pid's next k uncomputed tokens."""
        seq = self.pager.seqs[pid]
        start, end = seq.computed, min(seq.computed + k, len(seq.tokens))
        slots = self.pager.slot_mapping(pid, start, end)
        for p, slot in zip(range(start, end), slots, strict=True):
            self.kv[slot] = tuple(seq.tokens[: p + 1])
        self.pager.mark_computed(pid, end)

    @precondition(lambda self: self.resident())
    @rule(data=st.data(), samples=st.lists(st.integers(0, 3), max_size=2, unique=True))
    def fork(self, data, samples):
        parent = data.draw(st.sampled_from(self.resident()))
        child = self.new_pid()
        self.pager.fork(parent, child)
        assert self.pager.block_table(child) == self.pager.block_table(parent)
        # n > 1 sampling: each sibling goes on with its own (distinct) next token
        for pid, token in zip((child, parent), samples, strict=False):
            self.append_pid(pid, [token])

    @precondition(lambda self: self.pager.seqs)
    @rule(data=st.data())
    def free(self, data):
        pid = data.draw(st.sampled_from(sorted(self.pager.seqs)))
        held = len(self.pager.seqs[pid].blocks)
        assert self.pager.free(pid) == held
        self.host.pop(pid, None)

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def swap_out(self, data):
        pid = data.draw(st.sampled_from(self.resident()))
        blocks = self.pager.swap_out(pid)
        self.host[pid] = [self.kv.get(b * BS + off) for b in blocks for off in range(BS)]

    @precondition(lambda self: self.swapped())
    @rule(data=st.data())
    def swap_in(self, data):
        pid = data.draw(st.sampled_from(self.swapped()))
        blocks = self.attempt(self.pager.swap_in, pid)
        if blocks is None:
            return
        saved = self.host.pop(pid)
        event("swap in")
        for i, value in enumerate(saved):
            slot = blocks[i // BS] * BS + i % BS
            if value is None:
                self.kv.pop(slot, None)
            else:
                self.kv[slot] = value

    @rule()
    def reset(self):
        known = sorted(self.pager.seqs)
        assert self.pager.reset() == known
        self.kv.clear()
        self.host.clear()

    # -- invariants
    @invariant()
    def refcounts_equal_references(self):
        refs = [0] * self.pager.num_blocks
        for seq in self.pager.seqs.values():
            assert len(set(seq.blocks)) == len(seq.blocks)  # no block twice in one table
            for b in seq.blocks:
                refs[b] += 1
        assert refs == self.pager.pool.ref

    @invariant()
    def free_plus_used_is_total(self):
        pool = self.pager.pool
        used = {b for b in range(pool.num_blocks) if pool.ref[b] > 0}
        free = set(pool.free_queue)
        assert not used & free  # a free block is never also handed out
        assert len(used) + len(free) == pool.num_blocks
        assert self.pager.free_blocks == len(pool.free_queue)

    @invariant()
    def users_never_share(self):
        owner: dict[int, str] = {}
        for seq in self.pager.seqs.values():
            for b in seq.blocks:
                assert owner.setdefault(b, seq.user) == seq.user

    @invariant()
    def tables_cover_tokens(self):
        for seq in self.pager.seqs.values():
            if seq.swapped:
                assert seq.blocks == []
            else:
                assert len(seq.blocks) == self.pager.blocks_for(len(seq.tokens))
            assert 0 <= seq.computed <= len(seq.tokens)

    @invariant()
    def computed_kv_is_intact(self):
        # every process reads exactly its own history: sharing, COW and eviction broke nothing
        for pid in self.resident():
            seq = self.pager.seqs[pid]
            slots = self.pager.slot_mapping(pid, 0, seq.computed)
            assert [self.kv.get(s) for s in slots] == [
                tuple(seq.tokens[: p + 1]) for p in range(seq.computed)
            ]

    @invariant()
    def cached_blocks_hold_their_tokens(self):
        pool = self.pager.pool
        for digest, b in pool.cached.items():
            assert pool.digest[b] == digest
            _, _, tokens = pool.key[b]
            last = self.kv.get(b * BS + BS - 1)
            assert last is not None and last[-BS:] == tokens
        assert sum(d is not None for d in pool.digest) == len(pool.cached)

    def teardown(self):
        for pid in sorted(self.pager.seqs):
            self.pager.free(pid)
        assert self.pager.free_blocks == self.pager.num_blocks
        assert not any(self.pager.pool.ref)
        assert self.pager.usage().blocks_by_user == {}


PagerMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_pager_machine = PagerMachine.TestCase


def test_a_token_appended_before_it_is_known_is_filled_in_or_rolled_back() -> None:
    """The overlapped step: the next input is appended while the step that samples it runs."""
    pager = Pager(num_blocks=8, block_size=4)
    pager.admit(1, "u", [1, 2, 3, 4])
    pager.mark_computed(1, 4)
    pager.append(1, [0])                       # placeholder for the token being sampled
    assert pager.free_blocks == 6
    pager.set_token(1, 4, 42)
    pager.mark_computed(1, 5)
    assert pager.seqs[1].tokens == [1, 2, 3, 4, 42]
    pager.append(1, [0])
    pager.truncate(1, 5)                       # the job ended: roll the placeholder back
    assert pager.seqs[1].tokens == [1, 2, 3, 4, 42] and pager.free_blocks == 6
    pager.append(1, [0, 0, 0, 0])              # a new block, then dropped with its tokens
    assert pager.free_blocks == 5
    pager.truncate(1, 5)
    assert pager.free_blocks == 6 and len(pager.block_table(1)) == 2
    with pytest.raises(ValueError):
        pager.set_token(1, 2, 7)               # computed tokens never change
    with pytest.raises(ValueError):
        pager.truncate(1, 3)
