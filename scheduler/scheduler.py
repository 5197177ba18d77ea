"""FCFS continuous batching: decodes first, then chunked prefill within the token budget."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from kvserve.cache.kv_cache_manager import KVCacheManager
from kvserve.scheduler.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """One step's work: each scheduled sequence computes `num_tokens[i]` new tokens."""
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # decodes before prefill chunks, so a long prompt never holds up running sequences
        ordered = sorted(self.running, key=lambda s: len(s) - s.num_computed_tokens > 1)
        for seq in ordered:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(len(seq) - seq.num_computed_tokens, budget)
            while not self.kv.allocate_slots(seq.request_id, seq.num_computed_tokens, n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim in out.seqs:
                    i = out.seqs.index(victim)
                    budget += out.num_tokens.pop(i)
                    out.seqs.pop(i)
                if victim is seq:
                    break
            else:
                out.seqs.append(seq)
                out.num_tokens.append(n)
                budget -= n
        preempted_now = any(s.status is SequenceStatus.WAITING for s in ordered)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted_now:
            seq = self.waiting[0]
            hits = self.kv.find_cached_prefix(seq.request_id, seq.token_ids)
            num_hit = len(hits) * self.kv.block_size
            n = min(len(seq) - num_hit, budget)
            if not self.kv.allocate_slots(seq.request_id, num_hit, n, hits):
                break
            self.kv.record_prefix_query(len(seq), num_hit)
            self.waiting.popleft()
            seq.num_computed_tokens = num_hit
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = num_hit
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_tokens.append(n)
            budget -= n
        out.block_copies = self.kv.take_pending_copies()
        return out

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: free its blocks, put it back at the head of the queue."""
        self.running.remove(seq)
        self.kv.free(seq.request_id)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def update_computed(self, out: SchedulerOutput) -> None:
        """After the forward: advance num_computed_tokens and publish full blocks to the prefix cache."""
        for seq, n in zip(out.seqs, out.num_tokens):
            seq.num_computed_tokens += n
            self.kv.cache_full_blocks(seq.request_id, seq.token_ids, seq.num_computed_tokens)

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        if seq.is_finished:
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.kv.free(seq.request_id)
