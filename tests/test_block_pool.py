"""Property-based tests of the block allocator and prefix cache (hypothesis state machines).

A model of the KV contents rides along: every slot records the token written there, so a prefix
hit must hand back blocks that hold exactly the tokens of the prefix it claims to match. The same
machine runs with a host tier: evicted blocks move to host blocks and prefix hits there come back,
through the copies the manager queues (applied in its order, before the step's writes).
"""
from __future__ import annotations

from hypothesis import settings, strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

from kvserve.cache.block_pool import BlockPool
from kvserve.cache.kv_cache_manager import HostHit, KVCacheManager

BLOCK = 4
NUM_BLOCKS = 16
BASES = ([], [1, 2, 3, 0, 1, 2], [3, 3, 1, 0, 2, 2, 1, 3, 0])
# prompts built on a few shared bases, so repeated prompts and shared prefixes come up often
TOKENS = st.builds(lambda base, tail: BASES[base] + tail, st.integers(0, len(BASES) - 1),
                   st.lists(st.integers(0, 3), max_size=8)).filter(bool)


class KVCacheMachine(RuleBasedStateMachine):
    seqs = Bundle("seqs")
    NUM_BLOCKS = NUM_BLOCKS
    HOST_BLOCKS = 0

    def __init__(self):
        super().__init__()
        self.kv = KVCacheManager(self.NUM_BLOCKS, BLOCK, enable_caching=True, hash_seed=b"model",
                                 num_host_blocks=self.HOST_BLOCKS)
        self.content: dict[int, list[int | None]] = {b: [None] * BLOCK for b in range(self.NUM_BLOCKS)}
        self.host_content: dict[int, list[int | None]] = {b: [None] * BLOCK for b in range(self.HOST_BLOCKS)}
        self.tokens: dict[int, list[int]] = {}
        self.computed: dict[int, int] = {}
        self.next_id = 0

    def _write(self, sid: int, start: int, end: int) -> None:
        """What the runner does: write K/V (here: the token) of positions [start, end)."""
        table = self.kv.block_ids(sid)
        for pos in range(start, end):
            block = table[pos // BLOCK]
            assert self.kv.pool.blocks[block].ref_cnt == 1, "wrote into a shared block"
            self.content[block][pos % BLOCK] = self.tokens[sid][pos]
        self.computed[sid] = end
        self.kv.cache_full_blocks(sid, self.tokens[sid], end)

    def _apply_copies(self) -> None:
        """What the runner does before a forward: the step's copies, in the manager's order."""
        offloads, reloads, copies = self.kv.take_moves()
        for dev, host in offloads:
            self.host_content[host] = list(self.content[dev])
        for host, dev in reloads:
            self.content[dev] = list(self.host_content[host])
        for src, dst in copies:
            self.content[dst] = list(self.content[src])

    @rule(target=seqs, prompt=TOKENS, chunk=st.integers(1, 14))
    def add(self, prompt, chunk):
        sid, self.next_id = self.next_id, self.next_id + 1
        hits = self.kv.find_cached_prefix(sid, prompt)
        num_hit = len(hits) * BLOCK
        assert num_hit < len(prompt), "the last prompt token must always be recomputed"
        for i, hit in enumerate(hits):
            held = (self.host_content[self.kv.host.lookup(hit.block_hash)] if isinstance(hit, HostHit)
                    else self.content[hit.block_id])
            assert held == prompt[i * BLOCK:(i + 1) * BLOCK], "stale prefix hit"
        self.tokens[sid] = list(prompt)
        end = min(len(prompt), num_hit + chunk)   # chunked prefill: maybe only part of the prompt
        if not self.kv.allocate_slots(sid, num_hit, end - num_hit, hits):
            assert sid not in self.kv.block_tables
            del self.tokens[sid]
            return None
        self._apply_copies()
        table = self.kv.block_ids(sid)
        for i in range(len(hits)):
            assert self.content[table[i]] == prompt[i * BLOCK:(i + 1) * BLOCK], "a reloaded block is stale"
        self._write(sid, num_hit, end)
        return sid

    @rule(sid=seqs, token=st.integers(0, 3))
    def append(self, sid, token):
        if sid is None or sid not in self.kv.block_tables:
            return
        start = self.computed[sid]
        if start < len(self.tokens[sid]):          # finish a chunked prefill first
            if self.kv.allocate_slots(sid, start, len(self.tokens[sid]) - start):
                self._apply_copies()
                self._write(sid, start, len(self.tokens[sid]))
            return
        self.tokens[sid].append(token)
        if self.kv.allocate_slots(sid, self.computed[sid], 1):
            self._apply_copies()
            self._write(sid, self.computed[sid], self.computed[sid] + 1)
        else:
            self.tokens[sid].pop()

    @rule(target=seqs, parent=seqs)
    def fork(self, parent):
        if parent is None or parent not in self.kv.block_tables:
            return None
        sid, self.next_id = self.next_id, self.next_id + 1
        self.kv.fork(parent, sid)
        self.tokens[sid] = list(self.tokens[parent])
        self.computed[sid] = self.computed[parent]
        return sid

    @rule(sid=consumes(seqs))
    def free(self, sid):
        if sid is not None and sid in self.kv.block_tables:
            self.kv.free(sid)

    @rule()
    @precondition(lambda self: self.kv.pool.num_free > 0)
    def evict_one(self):
        """Take a fresh block the way any allocation would, then give it back."""
        block = self.kv.pool.allocate()
        self._apply_copies()
        self.content[block.block_id] = [None] * BLOCK
        self.kv.pool.free(block)

    @invariant()
    def refcounts_match_tables(self):
        holders = [0] * self.NUM_BLOCKS
        for table in self.kv.block_tables.values():
            for block in table:
                holders[block.block_id] += 1
        pool = self.kv.pool
        for block in pool.blocks:
            assert block.ref_cnt == holders[block.block_id], "a block is held by more tables than its count"
            assert (block.ref_cnt == 0) == (block.block_id in pool.free_queue)
        assert pool.num_used + pool.num_free == self.NUM_BLOCKS
        assert pool.num_cached_free == sum(1 for b in pool.free_queue if pool.blocks[b].block_hash)
        for h, block_id in pool.cached.items():
            assert pool.blocks[block_id].block_hash == h

    @invariant()
    def tables_cover_computed_tokens(self):
        for sid, table in self.kv.block_tables.items():
            assert len(table) * BLOCK >= self.computed[sid]

    @invariant()
    def block_ids_mirror_the_tables(self):
        """The ids kept beside each table (so a step copies a list instead of walking Blocks) follow
        it through allocation, prefix hits, reloads, copy-on-write, forks and frees."""
        assert self.kv.table_ids.keys() == self.kv.block_tables.keys()
        for sid, table in self.kv.block_tables.items():
            assert self.kv.block_ids(sid) == [block.block_id for block in table]
            assert self.kv.num_published.get(sid, 0) <= self.computed[sid] // BLOCK

    def teardown(self):
        for sid in list(self.kv.block_tables):
            self.kv.free(sid)
        pool = self.kv.pool
        assert pool.num_free == self.NUM_BLOCKS and pool.num_used == 0
        assert all(b.ref_cnt == 0 for b in pool.blocks)


    @invariant()
    def host_tier_is_consistent(self):
        host = self.kv.host
        if host is None:
            return
        held = list(host.lru.values())
        assert len(set(held)) == len(held) and not set(held) & set(host.free)
        assert len(held) + len(host.free) == self.HOST_BLOCKS


class HostTierMachine(KVCacheMachine):
    NUM_BLOCKS = 8    # a small device pool: prefixes are evicted often
    HOST_BLOCKS = 6   # and the tier itself evicts too


TestKVCacheManager = KVCacheMachine.TestCase
TestKVCacheManager.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestKVCacheManagerWithHostTier = HostTierMachine.TestCase
TestKVCacheManagerWithHostTier.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


def test_lru_evicts_least_recently_freed_first():
    pool = BlockPool(3)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    for block, h in ((a, b"a"), (b, b"b"), (c, b"c")):
        pool.cache(block, h)
    pool.free(b)
    pool.free(a)
    pool.free(c)
    assert pool.allocate() is b and pool.lookup(b"b") is None
    assert pool.lookup(b"a") is a and pool.lookup(b"c") is c
    pool.touch(a)                      # a prefix hit takes a back out of the free queue
    assert pool.allocate() is c and pool.num_free == 0


def test_allocation_is_all_or_nothing():
    kv = KVCacheManager(4, BLOCK)
    assert kv.allocate_slots("a", 0, 3 * BLOCK)
    assert not kv.allocate_slots("b", 0, 2 * BLOCK + 1)
    assert "b" not in kv.block_tables and kv.num_free_blocks == 1
    kv.free("a")
    assert kv.num_free_blocks == 4


def test_prefix_caching_off_finds_nothing():
    kv = KVCacheManager(8, BLOCK, enable_caching=False)
    tokens = list(range(12))
    assert kv.allocate_slots("a", 0, 12)
    kv.cache_full_blocks("a", tokens, 12)
    kv.free("a")
    assert kv.find_cached_prefix("b", tokens) == []


def test_evicted_prefix_moves_to_the_host_tier_and_comes_back():
    kv = KVCacheManager(4, BLOCK, num_host_blocks=4)
    tokens = list(range(9))                       # two full blocks and one token
    assert kv.allocate_slots("a", 0, 9)
    kv.cache_full_blocks("a", tokens, 9)
    kv.free("a")
    assert kv.allocate_slots("b", 0, 4 * BLOCK)   # takes every block: both cached ones are evicted
    offloads, reloads, copies = kv.take_moves()
    assert len(offloads) == 2 and not reloads and not copies
    assert kv.host.num_cached == 2
    kv.free("b")
    hits = kv.find_cached_prefix("c", tokens)
    assert [type(h) for h in hits] == [HostHit, HostHit]
    assert kv.allocate_slots("c", 2 * BLOCK, 1, hits)
    offloads, reloads, _ = kv.take_moves()
    table = kv.block_ids("c")
    assert [dev for _, dev in reloads] == table[:2] and not offloads
    assert kv.find_cached_prefix("d", tokens) == kv.block_tables["c"][:2]   # published on the device at once
    kv.record_prefix_query(9, hits)
    usage = kv.usage()
    assert usage["prefix_hit_tokens_host"] == 2 * BLOCK and usage["offload_blocks_loaded"] == 2


def test_a_host_block_read_this_step_is_never_replaced_before_its_copy():
    kv = KVCacheManager(2, BLOCK, num_host_blocks=1)
    host = kv.host
    assert host.store(b"x") == 0
    assert host.load(b"x") == 0            # pinned until take_moves()
    assert host.store(b"y") is None        # the only host block is pinned: y is dropped, not copied
    kv.take_moves()
    assert host.store(b"y") == 0 and host.lookup(b"x") is None
    assert host.store(b"z") is None        # nor written twice in one step (the two copies would race)
    kv.take_moves()
    assert host.store(b"z") == 0 and host.lookup(b"y") is None


def test_one_step_never_queues_two_copies_into_one_host_block():
    kv = KVCacheManager(4, BLOCK, num_host_blocks=1)
    tokens = list(range(2 * BLOCK + 1))
    assert kv.allocate_slots("a", 0, len(tokens))
    kv.cache_full_blocks("a", tokens, len(tokens))
    kv.free("a")
    assert kv.allocate_slots("b", 0, 4 * BLOCK)   # evicts both cached blocks in one step
    offloads, _, _ = kv.take_moves()
    assert len(offloads) == 1 and len({h for _, h in offloads}) == 1


def test_blocks_filled_a_token_at_a_time_are_all_published():
    """Decode steps publish each block as it fills (incrementally: a step does not walk the whole
    table), also after a fork whose first write copies the shared partial block."""
    kv = KVCacheManager(32, BLOCK, enable_caching=True, hash_seed=b"m")
    tokens = [1, 2, 3, 0, 1]
    assert kv.allocate_slots("a", 0, len(tokens))
    kv.cache_full_blocks("a", tokens, len(tokens))
    while len(tokens) < 5 * BLOCK + 2:        # decode: one token per step
        tokens.append(len(tokens) % 4)
        assert kv.allocate_slots("a", len(tokens) - 1, 1)
        kv.cache_full_blocks("a", tokens, len(tokens))
    kv.fork("a", "b")                         # b shares a's blocks, its partial last one too
    other = tokens + [3, 3, 3]
    assert kv.allocate_slots("b", len(tokens), 3)
    assert kv.take_pending_copies(), "b's first write into the shared partial block copies it"
    kv.cache_full_blocks("b", other, len(other))
    assert kv.block_ids("b")[:5] == kv.block_ids("a")[:5] and kv.block_ids("b")[5] != kv.block_ids("a")[5]
    for seq, toks in (("a", tokens), ("b", other)):
        hits = kv.find_cached_prefix(f"probe-{seq}", toks + [0])
        assert [h.block_id for h in hits] == kv.block_ids(seq)[:len(toks) // BLOCK], seq
