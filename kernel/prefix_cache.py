"""Prefix caching over the block pool: chained content digests of full blocks.

A full block's digest is blake2b(parent digest, user salt, token ids): it names the whole prefix
up to and including the block, for one user only, so users never share blocks. A hit also
compares the stored (parent digest, user, token ids), so a collision gives a miss, never a
wrong match. Only blocks whose KV is fully computed are published.
"""

import hashlib
from array import array
from collections.abc import Sequence

from llmasos.kernel.block_pool import BlockKey, BlockPool

ROOT = b""  # the parent digest of a sequence's first block


def block_key(parent: bytes, user: str, token_ids: Sequence[int]) -> BlockKey:
    return (parent, user, tuple(token_ids))


def block_digest(key: BlockKey) -> bytes:
    parent, user, token_ids = key
    h = hashlib.blake2b(digest_size=16)
    h.update(len(parent).to_bytes(1, "little") + parent)
    salt = user.encode()
    h.update(len(salt).to_bytes(4, "little") + salt)  # length-prefixed: no ambiguous splits
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def match_prefix(
    pool: BlockPool, user: str, token_ids: Sequence[int], block_size: int, max_blocks: int
) -> tuple[list[int], list[bytes]]:
    """The longest run of cached leading blocks (at most max_blocks): their ids and digests."""
    blocks: list[int] = []
    digests: list[bytes] = []
    parent = ROOT
    for i in range(max_blocks):
        key = block_key(parent, user, token_ids[i * block_size : (i + 1) * block_size])
        digest = block_digest(key)
        block = pool.lookup(digest, key)
        if block is None:
            break
        blocks.append(block)
        digests.append(digest)
        parent = digest
    return blocks, digests


def publish_full_blocks(
    pool: BlockPool,
    user: str,
    token_ids: Sequence[int],
    blocks: Sequence[int],
    digests: list[bytes],
    num_computed: int,
    block_size: int,
) -> None:
    """Digest and publish every full block below num_computed; digests grows in place."""
    while (len(digests) + 1) * block_size <= num_computed:
        i = len(digests)
        parent = digests[-1] if digests else ROOT
        key = block_key(parent, user, token_ids[i * block_size : (i + 1) * block_size])
        digest = block_digest(key)
        pool.cache(blocks[i], digest, key)
        digests.append(digest)
