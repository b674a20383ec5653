"""The kernel's pager: per-process block tables over the inference service's KV pool.

The pager only does accounting. It never touches tensors: where contents must move it returns
descriptors (block copies, blocks to swap) that the kernel forwards to the inference service.
Not thread-safe: the kernel calls it under its own lock.

A process's sequence is its token ids (prompt, then generated tokens); slot p (token position p)
lives at block_table[p // block_size] * block_size + p % block_size. `computed` counts the
leading tokens whose KV is written in the pool; only full, computed blocks enter the prefix cache.

The life of a process, as the scheduler drives it:

    cached = pager.admit(pid, user, prompt)      # blocks for the whole prompt; KV of the first
                                                 # `cached` tokens is already there (prefix hit)
    slots = pager.slot_mapping(pid, start, end)  # where a prefill chunk / decode token writes
    pager.mark_computed(pid, end)                # after the step: KV of tokens < end is written
    copies = pager.append(pid, [next_token])     # grow by sampled tokens; copy-on-write pairs
    pager.fork(pid, child)                       # n > 1: the child shares every block
    host = pager.swap_out(pid); new = pager.swap_in(pid)   # STOP/CONT, memory pressure
    pager.free(pid)                              # exit, kill, or preemption by recompute
    lost = pager.reset()                         # the inference service restarted

Errors: OutOfBlocks (nothing changed; retry later), KeyError for an unknown pid, ValueError
for a malformed request (pid already present, empty prompt, swapped process used, ...).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from llmasos.kernel.block_pool import BlockPool
from llmasos.kernel.prefix_cache import match_prefix, publish_full_blocks

log = structlog.get_logger()


class OutOfBlocks(Exception):
    """Not enough free KV blocks (maps to RESOURCE_EXHAUSTED); the pager is left unchanged."""

    def __init__(self, needed: int, free: int) -> None:
        super().__init__(f"KV memory exhausted: {needed} blocks needed, {free} free")
        self.needed = needed
        self.free = free


@dataclass
class Seq:
    user: str
    tokens: list[int]
    blocks: list[int]  # the block table; empty while swapped out
    computed: int  # leading tokens whose KV is in the pool (or on the host, when swapped)
    digests: list[bytes] = field(default_factory=list)  # chain digests of full computed blocks
    swapped: bool = False


@dataclass(frozen=True)
class PagerUsage:
    total_blocks: int
    free_blocks: int  # includes cached_blocks: they are evicted on demand
    cached_blocks: int  # free blocks still holding a reusable prefix
    block_size: int
    blocks_by_pid: dict[int, int]  # every known pid; 0 while swapped out
    blocks_by_user: dict[str, int]  # distinct blocks held (a block shared by a fork counts once)


class Pager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.seqs: dict[int, Seq] = {}

    # --- questions -----------------------------------------------------------------------

    @property
    def free_blocks(self) -> int:
        return self.pool.num_free

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def can_admit(self, num_tokens: int) -> bool:
        """Whether a prompt of num_tokens fits now, even without a prefix hit."""
        return self.blocks_for(num_tokens) <= self.free_blocks

    def blocks_to_append(self, pid: int, num_tokens: int = 1) -> int:
        """Free blocks that append(pid, <num_tokens tokens>) would take (copy-on-write included)."""
        seq = self._resident(pid)
        grow = self.blocks_for(len(seq.tokens) + num_tokens) - len(seq.blocks)
        return grow + (num_tokens > 0 and self._last_shared(seq))

    def blocks_to_admit(self, user: str, token_ids: Sequence[int]) -> int:
        """Free blocks that admit(pid, user, token_ids) would take: fresh ones plus cached
        prefix blocks it would revive from the free list (hits still in use cost nothing)."""
        bs = self.block_size
        hits, _ = match_prefix(self.pool, user, token_ids, bs, (len(token_ids) - 1) // bs)
        revived = sum(1 for b in hits if self.pool.ref[b] == 0)
        return self.blocks_for(len(token_ids)) - len(hits) + revived

    def cached_blocks(self, user: str, token_ids: Sequence[int]) -> int:
        """Leading blocks of token_ids this pool's prefix cache holds for the user now."""
        if not token_ids:
            return 0
        bs = self.block_size
        return len(match_prefix(self.pool, user, token_ids, bs, (len(token_ids) - 1) // bs)[0])

    def blocks_needed(self, pid: int, user: str, token_ids: Sequence[int]) -> int:
        """Exact free blocks pid needs to run up to len(token_ids): admission (prefix hits
        counted), swap-in, or growth plus copy-on-write."""
        seq = self.seqs.get(pid)
        if seq is None:
            return self.blocks_to_admit(user, token_ids)
        if seq.swapped:
            return self.blocks_for(len(seq.tokens))
        return self.blocks_to_append(pid, max(0, len(token_ids) - len(seq.tokens)))

    def __contains__(self, pid: int) -> bool:
        return pid in self.seqs

    def is_swapped(self, pid: int) -> bool:
        return self.seqs[pid].swapped

    def num_tokens(self, pid: int) -> int:
        return len(self.seqs[pid].tokens)

    def num_computed(self, pid: int) -> int:
        return self.seqs[pid].computed

    def block_table(self, pid: int) -> list[int]:
        return list(self._resident(pid).blocks)

    def slot_mapping(self, pid: int, start: int, end: int) -> list[int]:
        """Pool slots of token positions start..end-1 (slot = block * block_size + offset)."""
        seq = self._resident(pid)
        if not 0 <= start <= end <= len(seq.tokens):
            raise ValueError(f"pid {pid}: positions {start}..{end} outside 0..{len(seq.tokens)}")
        bs, table = self.block_size, seq.blocks
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def usage(self) -> PagerUsage:
        by_user: dict[str, set[int]] = {}
        for seq in self.seqs.values():
            by_user.setdefault(seq.user, set()).update(seq.blocks)
        return PagerUsage(
            total_blocks=self.num_blocks,
            free_blocks=self.free_blocks,
            cached_blocks=self.pool.num_cached_free(),
            block_size=self.block_size,
            blocks_by_pid={pid: len(seq.blocks) for pid, seq in self.seqs.items()},
            blocks_by_user={user: len(blocks) for user, blocks in by_user.items()},
        )

    # --- operations ------------------------------------------------------------------------

    def admit(self, pid: int, user: str, token_ids: Sequence[int]) -> int:
        """Give pid blocks for its whole prompt; return how many leading tokens are cached.

        The cached count is whole blocks of this user's earlier computed prefixes and always
        leaves at least one token to compute, so the step has logits to sample from.
        """
        if pid in self.seqs:
            raise ValueError(f"pid {pid} already holds a sequence")
        if not token_ids:
            raise ValueError(f"pid {pid}: empty prompt")
        tokens = list(token_ids)
        bs = self.block_size
        hits, digests = match_prefix(self.pool, user, tokens, bs, (len(tokens) - 1) // bs)
        revived = sum(1 for b in hits if self.pool.ref[b] == 0)
        fresh = self.blocks_for(len(tokens)) - len(hits)
        self._reserve(fresh + revived)
        for b in hits:
            self.pool.share(b)
        blocks = hits + [self.pool.allocate() for _ in range(fresh)]
        cached = len(hits) * bs
        self.seqs[pid] = Seq(user, tokens, blocks, cached, digests)
        return cached

    def append(self, pid: int, token_ids: Sequence[int]) -> list[tuple[int, int]]:
        """Grow pid by tokens (their KV is computed later); return (src, dst) block copies.

        A shared, partly filled last block (after fork) is first replaced by a fresh private
        block; the inference service must copy src to dst before writing into it.
        """
        seq = self._resident(pid)
        if not token_ids:
            return []
        cow = self._last_shared(seq)
        grow = self.blocks_for(len(seq.tokens) + len(token_ids)) - len(seq.blocks)
        self._reserve(grow + cow)
        copies: list[tuple[int, int]] = []
        if cow:
            src, dst = seq.blocks[-1], self.pool.allocate()
            self.pool.release(src)
            seq.blocks[-1] = dst
            copies.append((src, dst))
        seq.blocks.extend(self.pool.allocate() for _ in range(grow))
        seq.tokens.extend(token_ids)
        return copies

    def set_token(self, pid: int, position: int, token_id: int) -> None:
        """Fill in a token appended before it was known (the overlapped step appends the next
        input while the step that samples it is still running); its KV is not computed yet."""
        seq = self._resident(pid)
        if not seq.computed <= position < len(seq.tokens):
            raise ValueError(f"pid {pid}: position {position} is computed or past the end")
        seq.tokens[position] = token_id

    def truncate(self, pid: int, num_tokens: int) -> None:
        """Drop tokens past num_tokens (none computed) and the blocks only they used."""
        seq = self._resident(pid)
        if not seq.computed <= num_tokens <= len(seq.tokens):
            raise ValueError(f"pid {pid}: cannot truncate to {num_tokens}")
        keep = self.blocks_for(num_tokens)
        self._release(seq.blocks[keep:])
        del seq.blocks[keep:], seq.tokens[num_tokens:]

    def rewind(self, pid: int, num_tokens: int) -> None:
        """Forget everything past num_tokens, computed or not (a pipe's reader whose input
        tokenized differently at the end): the KV past it is recomputed."""
        seq = self._resident(pid)
        if not 0 <= num_tokens <= len(seq.tokens):
            raise ValueError(f"pid {pid}: cannot rewind to {num_tokens}")
        seq.computed = min(seq.computed, num_tokens)
        del seq.digests[seq.computed // self.block_size:]
        keep = self.blocks_for(num_tokens)
        if num_tokens % self.block_size and self.pool.ref[seq.blocks[keep - 1]] == 1:
            self.pool.forget(seq.blocks[keep - 1])   # to be rewritten: no longer that prefix
        self._release(seq.blocks[keep:])
        del seq.blocks[keep:], seq.tokens[num_tokens:]

    def mark_computed(self, pid: int, num_tokens: int) -> None:
        """The KV of pid's first num_tokens tokens is now written; publish its full blocks."""
        seq = self._resident(pid)
        if not seq.computed <= num_tokens <= len(seq.tokens):
            raise ValueError(
                f"pid {pid}: computed {num_tokens} outside {seq.computed}..{len(seq.tokens)}"
            )
        seq.computed = num_tokens
        publish_full_blocks(
            self.pool, seq.user, seq.tokens, seq.blocks, seq.digests, num_tokens, self.block_size
        )

    def fork(self, parent_pid: int, child_pid: int) -> None:
        """The child shares every block of the parent; the last partial one is copied on write."""
        parent = self._resident(parent_pid)
        if child_pid in self.seqs:
            raise ValueError(f"pid {child_pid} already holds a sequence")
        for b in parent.blocks:
            self.pool.share(b)
        self.seqs[child_pid] = Seq(
            parent.user, list(parent.tokens), list(parent.blocks), parent.computed,
            list(parent.digests),
        )

    def free(self, pid: int) -> int:
        """Release everything pid holds (unknown pids are fine); return the blocks released."""
        seq = self.seqs.pop(pid, None)
        if seq is None:
            return 0
        self._release(seq.blocks)
        return len(seq.blocks)

    def swap_out(self, pid: int) -> list[int]:
        """Free pid's blocks, keeping its tokens; return the blocks to copy to host first."""
        seq = self._resident(pid)
        blocks, seq.blocks, seq.swapped = seq.blocks, [], True
        self._release(blocks)
        log.debug("pager.swap_out", pid=pid, blocks=len(blocks))
        return blocks

    def swap_in(self, pid: int) -> list[int]:
        """Give a swapped-out pid fresh blocks; return them, to copy the host contents into."""
        seq = self.seqs[pid]
        if not seq.swapped:
            raise ValueError(f"pid {pid} is not swapped out")
        need = self.blocks_for(len(seq.tokens))
        self._reserve(need)
        seq.blocks = [self.pool.allocate() for _ in range(need)]
        seq.swapped = False
        seq.digests = []  # the new blocks hold the same prefix: publish them again
        publish_full_blocks(
            self.pool, seq.user, seq.tokens, seq.blocks, seq.digests, seq.computed,
            self.block_size,
        )
        log.debug("pager.swap_in", pid=pid, blocks=need)
        return list(seq.blocks)

    def reset(self) -> list[int]:
        """The inference service restarted: every block (and swapped copy) is gone.

        Drops all tables and the prefix cache; returns the pids that must be recomputed.
        """
        lost = sorted(self.seqs)
        self.seqs.clear()
        self.pool.reset()
        log.info("pager.reset", lost=len(lost))
        return lost

    # --- helpers ---------------------------------------------------------------------------

    def _resident(self, pid: int) -> Seq:
        seq = self.seqs[pid]
        if seq.swapped:
            raise ValueError(f"pid {pid} is swapped out")
        return seq

    def _last_shared(self, seq: Seq) -> bool:
        # only a partly filled last block is ever written into; full blocks are read-only
        return len(seq.tokens) % self.block_size != 0 and self.pool.ref[seq.blocks[-1]] > 1

    def _reserve(self, needed: int) -> None:
        if needed > self.free_blocks:
            raise OutOfBlocks(needed, self.free_blocks)

    def _release(self, blocks: list[int]) -> None:
        # last blocks first: they reach the LRU head first, so they are evicted first
        for b in reversed(blocks):
            self.pool.release(b)
