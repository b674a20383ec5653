"""The KV pool's bookkeeping: reference counts, the LRU free queue and the cached-block map.

Blocks are ints 0..num_blocks-1 (the inference service's pool holds their contents). A block
is free when its refcount is 0. The free queue is an OrderedDict used as a doubly-linked list:
its head is the least recently freed block, so it is reused (evicted) first, and a cached block
is revived from the middle in O(1). A freed block keeps its digest until it is reused (lazy
eviction), so a later request with the same prefix can take it back.

Invariant: digest[b] is not None  <=>  cached[digest[b]] == b.
"""

from collections import OrderedDict

# What a cached block holds, compared on every hit so a digest collision can never match:
# (parent block's digest, user salt, token ids of the block).
BlockKey = tuple[bytes, str, tuple[int, ...]]


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.reset()

    def reset(self) -> None:
        """Forget everything: all blocks free, no refcounts, nothing cached."""
        self.ref: list[int] = [0] * self.num_blocks
        self.digest: list[bytes | None] = [None] * self.num_blocks
        self.key: list[BlockKey | None] = [None] * self.num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(self.num_blocks))
        self.cached: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def allocate(self) -> int:
        """Take the least recently used free block; its cached content (if any) is evicted."""
        block, _ = self.free_queue.popitem(last=False)
        self._uncache(block)
        self.ref[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more reference; a free (cached) block is revived out of the free queue."""
        if self.ref[block] == 0:
            del self.free_queue[block]
        self.ref[block] += 1

    def release(self, block: int) -> None:
        """One reference fewer; at zero the block goes to the queue's tail, still cached."""
        assert self.ref[block] > 0, f"block {block} released more often than taken"
        self.ref[block] -= 1
        if self.ref[block] == 0:
            self.free_queue[block] = None

    def lookup(self, digest: bytes, key: BlockKey) -> int | None:
        """The cached block with this digest, only if its key matches exactly."""
        block = self.cached.get(digest)
        if block is None or self.key[block] != key:
            return None
        return block

    def cache(self, block: int, digest: bytes, key: BlockKey) -> None:
        """Publish a full, computed block. A digest already held by a block in use keeps it;
        one held only by a free block moves here, so hits share live blocks, not revive copies."""
        if self.digest[block] is not None:
            return
        holder = self.cached.get(digest)
        if holder is not None:
            if self.ref[holder] > 0:
                return
            self._uncache(holder)
        self.digest[block] = digest
        self.key[block] = key
        self.cached[digest] = block

    def forget(self, block: int) -> None:
        """Unpublish a block whose contents are about to change."""
        if self.digest[block] is not None:
            self._uncache(block)

    def num_cached_free(self) -> int:
        """Free blocks whose content is still reusable (O(free blocks); for usage reports)."""
        return sum(1 for b in self.free_queue if self.digest[b] is not None)

    def _uncache(self, block: int) -> None:
        digest = self.digest[block]
        if digest is not None:
            del self.cached[digest]
            self.digest[block] = None
            self.key[block] = None
