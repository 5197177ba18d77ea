"""Per-sequence block tables on top of the BlockPool: prefix lookup, slot allocation, forks."""
from __future__ import annotations

import time
from array import array
from typing import Hashable, NamedTuple, Sequence, Union

from kvserve.cache.block_pool import Block, BlockPool, hash_block_tokens
from kvserve.cache.host_tier import HostTier


class HostHit(NamedTuple):
    """A prefix block found in the host tier: it comes back into a fresh device block."""
    block_hash: bytes


PrefixHit = Union[Block, HostHit]


class KVMoves(NamedTuple):
    """The block copies a step needs before its forward, in this order: device blocks being evicted
    out to the host tier (device, host), host-tier hits back into the device pool (host, device),
    then copy-on-write copies (source, destination) within the device pool."""
    offloads: list[tuple[int, int]]
    reloads: list[tuple[int, int]]
    copies: list[tuple[int, int]]

    def __bool__(self) -> bool:
        return bool(self.offloads or self.reloads or self.copies)


class KVCacheManager:
    """Owns every sequence's block table. Sequences are identified by any hashable id.

    A shared block (reference count > 1) is never written in place: appending into one first
    copies it to a fresh block (copy-on-write); the copies are queued in `pending_copies` for
    the model runner to apply before the next forward.

    With a host tier (num_host_blocks > 0), a cached block evicted from the device pool is queued to
    be copied to the host tier instead of being lost, and a prefix lookup that misses the device pool
    continues in the host tier: such blocks are queued to be copied back into fresh device blocks.
    Every copy queued while a step is scheduled runs before that step's forward (take_moves).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 hash_seed: bytes = b"", num_host_blocks: int = 0):
        self.block_size = block_size
        self.host = HostTier(num_host_blocks) if enable_caching and num_host_blocks > 0 else None
        self.pool = BlockPool(num_blocks, enable_caching, on_evict=self._offload if self.host else None)
        self.enable_caching = enable_caching
        self.hash_seed = hash_seed
        self.block_tables: dict[Hashable, list[Block]] = {}
        # per sequence, kept beside its table so that no step walks a whole table in Python (a decode
        # step's host work would grow with the context): the block ids (a C int array: a step copies
        # and packs it at memcpy speed), and how many leading blocks are in the prefix cache already
        self.table_ids: dict[Hashable, array] = {}
        self.num_published: dict[Hashable, int] = {}
        self.block_hashes: dict[Hashable, list[bytes]] = {}
        self.pending_copies: list[tuple[int, int]] = []
        self.pending_offloads: list[tuple[int, int]] = []
        self.pending_reloads: list[tuple[int, int]] = []
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0         # both tiers
        self.prefix_host_hit_tokens = 0    # of which found in the host tier

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

    def find_cached_prefix(self, seq_id: Hashable, token_ids: Sequence[int]) -> list[PrefixHit]:
        """The longest run of cached full blocks, always leaving the last token to compute: device
        blocks, or HostHits where only the host tier has the block."""
        if not self.enable_caching:
            return []
        hits: list[PrefixHit] = []
        for block_hash in self._hashes(seq_id, token_ids, len(token_ids) - 1):
            block = self.pool.lookup(block_hash)
            if block is None:
                if self.host is None or self.host.lookup(block_hash) is None:
                    break
                block = HostHit(block_hash)
            hits.append(block)
        return hits

    def record_prefix_query(self, num_query_tokens: int, hits: Sequence[PrefixHit]) -> None:
        self.prefix_query_tokens += num_query_tokens
        self.prefix_hit_tokens += len(hits) * self.block_size
        self.prefix_host_hit_tokens += sum(isinstance(h, HostHit) for h in hits) * self.block_size

    # allocation
    def allocate_slots(self, seq_id: Hashable, num_computed: int, num_new: int,
                       cached_prefix: Sequence[PrefixHit] = ()) -> bool:
        """Make room for tokens [num_computed, num_computed + num_new). All or nothing."""
        table = self.block_tables.get(seq_id)
        if table is not None and not cached_prefix:   # a running sequence's step: mostly nothing to do
            needed = -(-(num_computed + num_new) // self.block_size) > len(table)
            if not needed and not self._needs_copy(table, num_computed):
                return True
        table = self.block_tables.setdefault(seq_id, [])
        ids = self.table_ids.setdefault(seq_id, array("i"))
        if cached_prefix:
            assert not table, "a cached prefix is only taken by a sequence without blocks"
        bs = self.block_size
        num_have = len(table) + len(cached_prefix)
        num_needed = -(-(num_computed + num_new) // bs) - num_have
        cow = self._needs_copy(table, num_computed)
        on_device = [b for b in cached_prefix if isinstance(b, Block)]
        revived = sum(1 for b in on_device if b.ref_cnt == 0)
        from_host = len(cached_prefix) - len(on_device)
        if max(num_needed, 0) + cow + revived + from_host > self.pool.num_free:
            if not table:
                del self.block_tables[seq_id], self.table_ids[seq_id]
            return False
        # take the device hits and pin the host hits before allocating anything: an allocation may
        # evict a cached device block, and that eviction may replace a host block
        for block in on_device:
            self.pool.touch(block)
        host_blocks = [self.host.load(h.block_hash) for h in cached_prefix if isinstance(h, HostHit)]
        host_blocks.reverse()
        for hit in cached_prefix:
            table.append(hit if isinstance(hit, Block) else self._reload(hit.block_hash, host_blocks.pop()))
        if cow:
            self._copy_on_write(seq_id, num_computed // bs)
        for _ in range(num_needed):
            table.append(self.pool.allocate())
        ids.extend(block.block_id for block in table[len(ids):])
        return True

    def _needs_copy(self, table: list[Block], num_computed: int) -> bool:
        idx = num_computed // self.block_size
        return idx < len(table) and table[idx].ref_cnt > 1

    def _copy_on_write(self, seq_id: Hashable, idx: int) -> None:
        table = self.block_tables[seq_id]
        old = table[idx]
        new = self.pool.allocate()
        self.pending_copies.append((old.block_id, new.block_id))
        self.pool.free(old)
        table[idx] = new
        self.table_ids[seq_id][idx] = new.block_id
        if self.num_published.get(seq_id, 0) > idx:     # (a block being written into is not full: never so far)
            self.num_published[seq_id] = idx

    def _reload(self, block_hash: bytes, host_block: int) -> Block:
        """A fresh device block for a host-tier hit, published under its hash at once (the copy runs
        before the forward of the step being scheduled, so any request of that step may share it)."""
        block = self.pool.allocate()
        self.pending_reloads.append((host_block, block.block_id))
        self.pool.cache(block, block_hash)
        return block

    def _offload(self, block: Block) -> None:
        """BlockPool's eviction hook: keep the evicted block's content in the host tier."""
        host_block = self.host.store(block.block_hash)
        if host_block is not None:
            self.pending_offloads.append((block.block_id, host_block))

    def cache_full_blocks(self, seq_id: Hashable, token_ids: Sequence[int], num_computed: int) -> None:
        """Publish the sequence's full, computed blocks in the prefix cache: those not published by
        an earlier call (a decode step costs O(1), not O(its blocks))."""
        if not self.enable_caching:
            return
        num_full = num_computed // self.block_size
        start = self.num_published.get(seq_id, 0)
        if num_full <= start:
            return
        table = self.block_tables[seq_id]
        hashes = self._hashes(seq_id, token_ids, num_computed)
        for i in range(start, num_full):
            block = table[i]
            if block.block_hash is None:
                self.pool.cache(block, hashes[i])
        self.num_published[seq_id] = num_full

    def free(self, seq_id: Hashable) -> None:
        """Release a sequence's blocks, tail first so its prefix outlives its tail in the LRU."""
        for block in reversed(self.block_tables.pop(seq_id, [])):
            self.pool.free(block)
        self.table_ids.pop(seq_id, None)
        self.num_published.pop(seq_id, None)
        self.block_hashes.pop(seq_id, None)

    def fork(self, parent_id: Hashable, child_id: Hashable, num_tokens: int | None = None) -> None:
        """The child shares the parent's blocks (those holding its first num_tokens tokens, or all of
        them); a write into a shared block copies it first (copy-on-write)."""
        assert child_id not in self.block_tables
        table = self.block_tables[parent_id]
        if num_tokens is not None:
            table = table[:-(-num_tokens // self.block_size)]
        for block in table:
            self.pool.touch(block)
        self.block_tables[child_id] = list(table)
        self.table_ids[child_id] = array("i", (block.block_id for block in table))
        self.num_published[child_id] = min(self.num_published.get(parent_id, 0), len(table))
        hashes = self.block_hashes.get(parent_id, [])
        self.block_hashes[child_id] = list(hashes if num_tokens is None else hashes[:num_tokens // self.block_size])

    def block_ids(self, seq_id: Hashable) -> list[int]:
        """The sequence's block ids, as a list."""
        ids = self.table_ids.get(seq_id)
        return ids.tolist() if ids is not None else []

    def block_table(self, seq_id: Hashable) -> array:
        """A copy of the sequence's block ids as array("i"): what a step's row carries (a memcpy, where
        walking its Blocks would cost ~40 ns a block, every step)."""
        ids = self.table_ids.get(seq_id)
        return ids[:] if ids is not None else array("i")


    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def take_moves(self) -> KVMoves:
        """Every copy queued since the last call, for the runner to apply before the next forward."""
        moves = KVMoves(self.pending_offloads, self.pending_reloads, self.take_pending_copies())
        self.pending_offloads, self.pending_reloads = [], []
        if self.host is not None:
            self.host.unpin()
        return moves

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix, in both tiers (blocks in use keep their content)."""
        self.pool.reset_prefix_cache()
        if self.host is not None:
            self.host.reset()

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def usage(self) -> dict[str, int]:
        """Block counts by state (used: referenced; cached: free but holding a prefix; free: empty),
        the prefix cache's cumulative query and hit tokens, and the host tier's counts."""
        pool, host = self.pool, self.host
        return {"num_blocks": pool.num_blocks, "block_size": self.block_size, "blocks_used": pool.num_used,
                "blocks_cached": pool.num_cached_free, "blocks_free": pool.num_free - pool.num_cached_free,
                "prefix_query_tokens": self.prefix_query_tokens, "prefix_hit_tokens": self.prefix_hit_tokens,
                "prefix_hit_tokens_host": self.prefix_host_hit_tokens,
                "offload_num_blocks": host.num_blocks if host else 0,
                "offload_blocks_cached": host.num_cached if host else 0,
                "offload_blocks_stored": host.num_stored if host else 0,
                "offload_blocks_loaded": host.num_loaded if host else 0}

    def snapshot(self) -> dict:
        """Both tiers block by block (what GET /kv shows): state, reference count, seconds since
        freed, LRU position, and which sequences hold each used block. Ids and counts only.
        Vectorized over the pool's flat arrays: a 100,000-block pool takes a few tens of ms."""
        import numpy as np   # here, not at the top: `import kvserve` loads only the standard library
        pool, now = self.pool, time.monotonic()
        n = pool.num_blocks
        codes = np.frombuffer(pool.state, dtype=np.uint8)
        ref_cnt = np.zeros(n, dtype=np.int64)
        owners: dict[str, list] = {}
        for seq_id, table in self.block_tables.items():
            ids = [block.block_id for block in table]
            np.add.at(ref_cnt, ids, 1)
            for block_id in ids:
                owners.setdefault(str(block_id), []).append(seq_id)
        order = np.full(n, -1, dtype=np.int64)
        queue = np.fromiter(pool.free_queue, dtype=np.int64, count=len(pool.free_queue))
        order[queue] = np.arange(len(queue))
        freed_at = np.frombuffer(pool.freed_at, dtype=np.float64)
        age = np.round(now - freed_at, 1)
        state = np.array(_STATE_NAMES, dtype=object)[codes].tolist()
        idle = codes != BlockPool.USED
        usage = self.usage()
        return {"block_size": self.block_size,
                "device": {"num_blocks": n, "blocks_used": usage["blocks_used"],
                           "blocks_cached": usage["blocks_cached"], "blocks_free": usage["blocks_free"],
                           "usage": usage["blocks_used"] / n,
                           "blocks": {"state": state, "ref_cnt": ref_cnt.tolist(),
                                      "age_s": _with_nulls(age, idle & (freed_at > 0)),
                                      "evict_order": _with_nulls(order, idle)},
                           "owners": owners},
                "host": self.host.snapshot(now) if self.host else None,
                "prefix_cache": {"query_tokens": self.prefix_query_tokens, "hit_tokens": self.prefix_hit_tokens,
                                 "hit_tokens_device": self.prefix_hit_tokens - self.prefix_host_hit_tokens,
                                 "hit_tokens_host": self.prefix_host_hit_tokens,
                                 "hit_rate": (self.prefix_hit_tokens / self.prefix_query_tokens
                                              if self.prefix_query_tokens else 0.0)},
                "offload": {"blocks_offloaded": usage["offload_blocks_stored"],
                            "blocks_reloaded": usage["offload_blocks_loaded"]}}


_STATE_NAMES = ("free", "cached", "used")   # indexed by BlockPool's state codes


def _with_nulls(values, keep) -> list:
    """values (a numpy array) as a list, None where keep (a boolean array) is False."""
    out = values.astype(object)
    out[~keep] = None
    return out.tolist()


def slot_mapping(block_ids: list[int], block_size: int, start: int, end: int) -> list[int]:
    """The pool slot of each position in [start, end) of a sequence with these blocks."""
    if end - start == 1:
        return [block_ids[start // block_size] * block_size + start % block_size]
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]
