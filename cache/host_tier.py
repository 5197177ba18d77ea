"""The host-memory tier of the prefix cache: which host block holds which prefix hash.

Bookkeeping only. The bytes live in KVPool's host tensor and are moved by the model runner, from
the (device, host) and (host, device) pairs the cache manager queues each step. A prefix is found
here by the same chained block hashes as in the device pool; within the tier the least recently
stored or read block is replaced first.
"""
from __future__ import annotations

import time
from collections import OrderedDict


class HostTier:
    def __init__(self, num_blocks: int):
        assert num_blocks > 0
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))   # pop() hands out 0, 1, ... first
        self.lru: OrderedDict[bytes, int] = OrderedDict()           # hash -> host block, oldest first
        self.touched_at: list[float | None] = [None] * num_blocks
        # read by a reload or written by an offload queued this step: not handed out again before the
        # step's copies ran (a second write to one host block in a step would race the first)
        self.pinned: set[int] = set()
        self.num_stored = 0              # device -> host copies queued, cumulative
        self.num_loaded = 0              # host -> device copies queued, cumulative

    @property
    def num_cached(self) -> int:
        return len(self.lru)

    def lookup(self, block_hash: bytes) -> int | None:
        return self.lru.get(block_hash)

    def store(self, block_hash: bytes) -> int | None:
        """A device block with this hash is being evicted: the host block to copy it into, or None
        when no copy is needed (the tier has it already) or possible (every host block is taken by this
        step's copies)."""
        host_block = self.lru.get(block_hash)
        if host_block is not None:
            self._touch(block_hash, host_block)
            return None
        if self.free:
            host_block = self.free.pop()
        else:
            victim = next((h for h, b in self.lru.items() if b not in self.pinned), None)
            if victim is None:
                return None
            host_block = self.lru.pop(victim)
        self.lru[block_hash] = host_block
        self.touched_at[host_block] = time.monotonic()
        self.pinned.add(host_block)
        self.num_stored += 1
        return host_block

    def load(self, block_hash: bytes) -> int:
        """A prefix hit in this tier: the host block to copy back, kept until this step's copies ran."""
        host_block = self.lru[block_hash]
        self._touch(block_hash, host_block)
        self.pinned.add(host_block)
        self.num_loaded += 1
        return host_block

    def _touch(self, block_hash: bytes, host_block: int) -> None:
        self.lru.move_to_end(block_hash)
        self.touched_at[host_block] = time.monotonic()

    def unpin(self) -> None:
        """This step's copies are handed to the runner: every host block may be replaced again."""
        self.pinned.clear()

    def reset(self) -> None:
        self.free = list(range(self.num_blocks - 1, -1, -1))
        self.lru.clear()
        self.pinned.clear()
        self.touched_at = [None] * self.num_blocks

    def snapshot(self, now: float) -> dict:
        """Per host block: state (cached / free), seconds since last stored or read, LRU position."""
        state = ["free"] * self.num_blocks
        age: list[float | None] = [None] * self.num_blocks
        order: list[int | None] = [None] * self.num_blocks
        for i, host_block in enumerate(self.lru.values()):
            state[host_block] = "cached"
            age[host_block] = round(now - self.touched_at[host_block], 3)
            order[host_block] = i
        return {"num_blocks": self.num_blocks, "blocks_cached": self.num_cached,
                "blocks_free": self.num_blocks - self.num_cached,
                "usage": self.num_cached / self.num_blocks,
                "blocks": {"state": state, "age_s": age, "evict_order": order}}
