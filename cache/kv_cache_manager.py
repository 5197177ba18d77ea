"""Per-sequence block tables on top of the BlockPool: prefix lookup, slot allocation, forks."""
from __future__ import annotations

from typing import Hashable, Sequence

from kvserve.cache.block_pool import Block, BlockPool, hash_block_tokens


class KVCacheManager:
    """Owns every sequence's block table. Sequences are identified by any hashable id.

    A shared block (reference count > 1) is never written in place: appending into one first
    copies it to a fresh block (copy-on-write); the copies are queued in `pending_copies` for
    the model runner to apply before the next forward.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 hash_seed: bytes = b""):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.enable_caching = enable_caching
        self.hash_seed = hash_seed
        self.block_tables: dict[Hashable, list[Block]] = {}
        self.block_hashes: dict[Hashable, list[bytes]] = {}
        self.pending_copies: list[tuple[int, int]] = []
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # prefix cache
    def _hashes(self, seq_id: Hashable, token_ids: Sequence[int], num_tokens: int) -> list[bytes]:
        """Chained hashes of the full blocks within the first num_tokens tokens."""
        hashes = self.block_hashes.setdefault(seq_id, [])
        bs = self.block_size
        while (len(hashes) + 1) * bs <= num_tokens:
            i = len(hashes)
            parent = hashes[-1] if hashes else self.hash_seed
            hashes.append(hash_block_tokens(parent, token_ids[i * bs:(i + 1) * bs]))
        return hashes

    def find_cached_prefix(self, seq_id: Hashable, token_ids: Sequence[int]) -> list[Block]:
        """The longest run of cached full blocks, always leaving the last token to compute."""
        if not self.enable_caching:
            return []
        hits = []
        for block_hash in self._hashes(seq_id, token_ids, len(token_ids) - 1):
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_prefix_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_query_tokens += num_query_tokens
        self.prefix_hit_tokens += num_hit_tokens

    # allocation
    def allocate_slots(self, seq_id: Hashable, num_computed: int, num_new: int,
                       cached_prefix: Sequence[Block] = ()) -> bool:
        """Make room for tokens [num_computed, num_computed + num_new). All or nothing."""
        table = self.block_tables.setdefault(seq_id, [])
        if cached_prefix:
            assert not table, "a cached prefix is only taken by a sequence without blocks"
        bs = self.block_size
        num_have = len(table) + len(cached_prefix)
        num_needed = -(-(num_computed + num_new) // bs) - num_have
        cow = self._needs_copy(table, num_computed)
        revived = sum(1 for b in cached_prefix if b.ref_cnt == 0)
        if max(num_needed, 0) + cow + revived > self.pool.num_free:
            if not table:
                del self.block_tables[seq_id]
            return False
        for block in cached_prefix:
            self.pool.touch(block)
            table.append(block)
        if cow:
            self._copy_on_write(table, num_computed // bs)
        for _ in range(num_needed):
            table.append(self.pool.allocate())
        return True

    def _needs_copy(self, table: list[Block], num_computed: int) -> bool:
        idx = num_computed // self.block_size
        return idx < len(table) and table[idx].ref_cnt > 1

    def _copy_on_write(self, table: list[Block], idx: int) -> None:
        old = table[idx]
        new = self.pool.allocate()
        self.pending_copies.append((old.block_id, new.block_id))
        self.pool.free(old)
        table[idx] = new

    def cache_full_blocks(self, seq_id: Hashable, token_ids: Sequence[int], num_computed: int) -> None:
        """Publish the sequence's full, computed blocks in the prefix cache."""
        if not self.enable_caching:
            return
        num_full = num_computed // self.block_size
        table = self.block_tables[seq_id][:num_full]
        for block, block_hash in zip(table, self._hashes(seq_id, token_ids, num_computed)[:num_full]):
            if block.block_hash is None:
                self.pool.cache(block, block_hash)

    def free(self, seq_id: Hashable) -> None:
        """Release a sequence's blocks, tail first so its prefix outlives its tail in the LRU."""
        for block in reversed(self.block_tables.pop(seq_id, [])):
            self.pool.free(block)
        self.block_hashes.pop(seq_id, None)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """The child shares every block of the parent; writes trigger copy-on-write."""
        assert child_id not in self.block_tables
        table = self.block_tables[parent_id]
        for block in table:
            self.pool.touch(block)
        self.block_tables[child_id] = list(table)
        self.block_hashes[child_id] = list(self.block_hashes.get(parent_id, []))

    def block_ids(self, seq_id: Hashable) -> list[int]:
        return [b.block_id for b in self.block_tables.get(seq_id, ())]


    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def usage(self) -> dict[str, int]:
        """Block counts by state (used: referenced; cached: free but holding a prefix; free: empty) and
        the prefix cache's cumulative query and hit tokens."""
        pool = self.pool
        return {"num_blocks": pool.num_blocks, "block_size": self.block_size, "blocks_used": pool.num_used,
                "blocks_cached": pool.num_cached_free, "blocks_free": pool.num_free - pool.num_cached_free,
                "prefix_query_tokens": self.prefix_query_tokens, "prefix_hit_tokens": self.prefix_hit_tokens}


def slot_mapping(block_ids: list[int], block_size: int, start: int, end: int) -> list[int]:
    """The pool slot of each position in [start, end) of a sequence with these blocks."""
    if end - start == 1:
        return [block_ids[start // block_size] * block_size + start % block_size]
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]
