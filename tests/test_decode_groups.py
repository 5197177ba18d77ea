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
    for _ in range(60):
        bs = rng.choice([4, 16])
        lens = [rng.randint(1, 400) for _ in range(rng.randint(1, 10))]
        tables = [rng.sample(range(2000), -(-n // bs)) for n in lens]
        window = rng.choice([None, 3, 40, 200])
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(len(lens), dtype=torch.long), prefills=[], decode_index=torch.arange(len(lens)),
            decode_ctx_lens=lens, decode_tables=[array("i", t) if rng.random() < 0.7 else list(t) for t in tables],
            kv_caches=[(torch.zeros(1, bs, 1, 1), torch.zeros(1, bs, 1, 1))])
        seen = []
        for group in _group_decodes(meta, window):
            rows = (list(range(group.rows.start, group.rows.stop)) if isinstance(group.rows, slice)
                    else group.rows.tolist())
            width = group.blocks.numel() // len(rows)
            for j, r in enumerate(rows):
                slots = [b * bs + o for b in group.blocks[j * width:(j + 1) * width].tolist() for o in range(bs)]
                if group.mask is not None:
                    attended = [s for s, masked in zip(slots, group.mask[j, 0].tolist()) if not masked]
                else:
                    attended = slots[group.keys]
                start = max(0, lens[r] - window) if window else 0
                want = [tables[r][p // bs] * bs + p % bs for p in range(start, lens[r])]
                assert attended == want, (r, window)
                seen.append(r)
        assert sorted(seen) == list(range(len(lens)))
