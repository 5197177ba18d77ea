"""The CPU attention's decode groups: every decode row gathers exactly the blocks holding the keys it
attends (its whole context, or its sliding window), and the mask (or the key span) leaves exactly
those keys, for block tables given as the scheduler's array("i") or as plain lists."""
from __future__ import annotations

import random
from array import array

import pytest
import torch

from kvserve.cache.attention import AttentionMetadata, _group_decodes


@pytest.mark.parametrize("seed", range(4))
def test_each_row_gathers_its_blocks_and_attends_exactly_its_keys(seed):
    rng = random.Random(seed)
    runs = 0
    for _ in range(60):
        bs = rng.choice([4, 16])
        lens = [rng.randint(1, 400) for _ in range(rng.randint(1, 10))]
        tables = [rng.sample(range(2000), -(-n // bs)) for n in lens]
        for t in tables:            # some are runs of consecutive ids, as a fresh pool hands them out
            if rng.random() < 0.4:
                t[:] = range(t[0], t[0] + len(t))
        window = rng.choice([None, 3, 40, 200])
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(len(lens), dtype=torch.long), prefills=[], decode_index=torch.arange(len(lens)),
            decode_ctx_lens=lens, decode_tables=[array("i", t) if rng.random() < 0.7 else list(t) for t in tables],
            kv_caches=[(torch.zeros(1, bs, 1, 1), torch.zeros(1, bs, 1, 1))])
        seen = []
        for group in _group_decodes(meta, window):
            rows = (list(range(group.rows.start, group.rows.stop)) if isinstance(group.rows, slice)
                    else group.rows.tolist())
            if isinstance(group.blocks, slice):      # a view of the pool: one row, its blocks consecutive
                assert len(rows) == 1 and group.mask is None
                blocks = list(range(group.blocks.start, group.blocks.stop))
                runs += 1
            else:
                blocks = group.blocks.tolist()
            width = len(blocks) // len(rows)
            for j, r in enumerate(rows):
                slots = [b * bs + o for b in blocks[j * width:(j + 1) * width] for o in range(bs)]
                if group.mask is not None:
                    attended = [s for s, masked in zip(slots, group.mask[j, 0].tolist()) if not masked]
                else:
                    attended = slots[group.keys]
                start = max(0, lens[r] - window) if window else 0
                want = [tables[r][p // bs] * bs + p % bs for p in range(start, lens[r])]
                assert attended == want, (r, window)
                seen.append(r)
        assert sorted(seen) == list(range(len(lens)))
    assert runs                                    # the view path was met


@pytest.mark.parametrize("window", [None, 20])
def test_a_run_of_blocks_read_in_place_gives_the_gathered_result(window):
    """One decode whose blocks are consecutive attends a view of the pool: the same output, to the bit, as
    gathering the same blocks."""
    from kvserve.cache.attention import DecodeGroup, _attend_decode
    torch.manual_seed(0)
    bs, kvh, heads, d, ctx = 16, 2, 4, 8, 70
    k_cache, v_cache = torch.randn(40, bs, kvh, d), torch.randn(40, bs, kvh, d)
    table = array("i", range(7, 7 + -(-ctx // bs)))
    meta = AttentionMetadata(slot_mapping=torch.zeros(1, dtype=torch.long), prefills=[],
                             decode_index=torch.arange(1), decode_ctx_lens=[ctx], decode_tables=[table],
                             kv_caches=[(k_cache, v_cache)])
    group, = _group_decodes(meta, window)
    assert isinstance(group.blocks, slice)
    gathered = DecodeGroup(group.rows, torch.arange(group.blocks.start, group.blocks.stop), None, group.keys)
    q = torch.randn(1, heads, d)
    for softcap in (None, 30.0):
        assert torch.equal(_attend_decode(q, k_cache, v_cache, group, 0.125, softcap),
                           _attend_decode(q, k_cache, v_cache, gathered, 0.125, softcap))
