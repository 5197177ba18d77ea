"""Fixed-size KV blocks with reference counts, an LRU free queue and a hash -> block prefix index."""
from __future__ import annotations

import hashlib
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence


def hash_block_tokens(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
    """Hash a full block's tokens chained over everything before it (the parent's hash)."""
    h = hashlib.blake2b(parent_hash, digest_size=16)
    h.update(b"".join(t.to_bytes(4, "little", signed=True) for t in token_ids))
    return h.digest()


@dataclass(slots=True)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


class BlockPool:
    """Blocks are allocated from the front of the free queue (least recently freed first).

    A block whose reference count drops to zero joins the back of the free queue but keeps its
    hash, so a later request can take it back (a prefix hit) until it is evicted for a fresh one.
    Every operation is O(1): the free queue is an OrderedDict used as a doubly linked list.
    `on_evict(block)` runs when a cached block is taken for fresh content, before its hash is dropped
    (the host-memory tier copies it out then). `state` and `freed_at` keep every block's state and the
    time it was last freed in flat arrays, so the live map (GET /kv) reads them without a loop.
    """

    FREE, CACHED, USED = 0, 1, 2     # codes in `state`

    def __init__(self, num_blocks: int, enable_caching: bool = True,
                 on_evict: Callable[[Block], None] | None = None):
        assert num_blocks > 0
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.on_evict = on_evict
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}
        self.num_cached_free = 0
        self.state = bytearray(num_blocks)                  # FREE / CACHED / USED per block
        self.freed_at = array("d", bytes(8 * num_blocks))   # time.monotonic() of its last free (0: never)

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def allocate(self) -> Block:
        """Take a fresh block, evicting the least recently used cached one if needed."""
        if not self.free_queue:
            raise MemoryError("no free KV blocks")
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        assert block.ref_cnt == 0
        if block.block_hash is not None:
            if self.on_evict is not None:
                self.on_evict(block)
            self._uncache(block)
            self.num_cached_free -= 1
        block.ref_cnt = 1
        self.state[block_id] = self.USED
        return block

    def lookup(self, block_hash: bytes) -> Block | None:
        block_id = self.cached.get(block_hash)
        return None if block_id is None else self.blocks[block_id]

    def touch(self, block: Block) -> None:
        """Take one more reference to a block (a prefix hit or a fork)."""
        if block.ref_cnt == 0:
            del self.free_queue[block.block_id]
            self.state[block.block_id] = self.USED
            if block.block_hash is not None:
                self.num_cached_free -= 1
        block.ref_cnt += 1

    def free(self, block: Block) -> None:
        assert block.ref_cnt > 0, f"double free of block {block.block_id}"
        block.ref_cnt -= 1
        if block.ref_cnt == 0:
            self.free_queue[block.block_id] = None
            self.freed_at[block.block_id] = time.monotonic()
            if block.block_hash is not None:
                self.num_cached_free += 1
                self.state[block.block_id] = self.CACHED
            else:
                self.state[block.block_id] = self.FREE

    def cache(self, block: Block, block_hash: bytes) -> None:
        """Publish a full, computed block under its prefix hash (first writer wins)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:
            return  # an identical block is already cached; this one stays private
        block.block_hash = block_hash
        self.cached[block_hash] = block.block_id
        if block.ref_cnt == 0:
            self.state[block.block_id] = self.CACHED
            self.num_cached_free += 1

    def _uncache(self, block: Block) -> None:
        del self.cached[block.block_hash]
        block.block_hash = None

    def reset_prefix_cache(self) -> None:
        for block_id in self.free_queue:
            block = self.blocks[block_id]
            if block.block_hash is not None:
                self._uncache(block)
                self.state[block_id] = self.FREE
        self.num_cached_free = 0
